"""Gradient clipping by value, per-tensor norm and global norm.

Every function returns the clipped gradients *and* the factor `c` it applied
(DESIGN.md §1), because the "micro" second moment of Adam scales the
within-update variance by `c²` (DESIGN.md §2). The factor is a scalar for the
norm modes and elementwise for clipping by value.
"""

from collections.abc import Sequence

from keras import ops

from keras_gradtools.types import TensorLike


def global_norm(tensors: Sequence[TensorLike]) -> TensorLike:
    """Returns the L2 norm of all `tensors` taken together.

    Args:
        tensors: A list of tensors.

    Returns:
        A scalar tensor: `sqrt(sum_i sum(tensors[i] ** 2))`.
    """
    squared = [flat_sum(ops.square(t)) for t in tensors]
    return ops.sqrt(ops.sum(ops.stack(squared)))


def flat_sum(tensor: TensorLike) -> TensorLike:
    """`sum(tensor)` over a 1-D view: XLA on CPU reduces a flat array in one
    pass but an N-D one through a tree of reduce-windows (measured 2x)."""
    return ops.sum(ops.reshape(tensor, (-1,)))


def clip_by_value(
    tensors: Sequence[TensorLike], clipvalue: float
) -> tuple[list[TensorLike], list[TensorLike]]:
    """Clips every element of every tensor to `[-clipvalue, clipvalue]`."""
    clipped = [ops.clip(t, -clipvalue, clipvalue) for t in tensors]
    factors = [_elementwise_factor(t, c) for t, c in zip(tensors, clipped)]
    return clipped, factors


def clip_by_norm(
    tensors: Sequence[TensorLike], clipnorm: float
) -> tuple[list[TensorLike], list[TensorLike]]:
    """Rescales each tensor on its own so that its L2 norm is at most
    `clipnorm` (the same rule as `tf.clip_by_norm`)."""
    clipped, factors = [], []
    for t in tensors:
        l2sum = flat_sum(ops.square(t))
        nonzero = l2sum > 0
        # Two-sided where: the sqrt of a zero sum never reaches a gradient.
        norm = ops.where(
            nonzero, ops.sqrt(ops.where(nonzero, l2sum, 1.0)), l2sum
        )
        factor = clipnorm / ops.maximum(norm, clipnorm)
        clipped.append(ops.multiply(t, factor))
        factors.append(factor)
    return clipped, factors


def clip_by_global_norm(
    tensors: Sequence[TensorLike], clipnorm: float
) -> tuple[list[TensorLike], list[TensorLike]]:
    """Rescales all tensors by one factor so that their global norm is at
    most `clipnorm` (the same rule as `keras.optimizers` uses).

    A non-finite global norm gives a NaN factor, as in Keras, so that a
    non-finite gradient is never silently turned into a finite one.
    """
    norm = global_norm(tensors)
    factor = clipnorm * ops.minimum(1.0 / norm, 1.0 / clipnorm)
    factor = factor + (norm - norm)
    return [ops.multiply(t, factor) for t in tensors], [factor] * len(tensors)


def clip_gradients(
    gradients: Sequence[TensorLike],
    clipvalue: float | None = None,
    clipnorm: float | None = None,
    global_clipnorm: float | None = None,
) -> tuple[list[TensorLike], list[TensorLike | None]]:
    """Applies at most one clipping mode to a list of gradients.

    Args:
        gradients: A list of gradient tensors.
        clipvalue: Optional float. Clip each element to `[-v, v]`.
        clipnorm: Optional float. Clip each tensor's L2 norm to this value.
        global_clipnorm: Optional float. Clip the global L2 norm of all
            tensors to this value.

    Returns:
        A tuple `(clipped, factors)`. `factors[i]` is the factor that was
        applied to `gradients[i]` (a scalar, or a tensor of the same shape
        for clipping by value), or `None` when no clipping was requested.

    Example:

    >>> clipped, factors = clip_gradients([ops.array([3.0, 4.0])],
    ...                                   global_clipnorm=1.0)
    >>> ops.convert_to_numpy(clipped[0])
    array([0.6, 0.8], dtype=float32)
    """
    if global_clipnorm is not None:
        return clip_by_global_norm(gradients, global_clipnorm)
    if clipnorm is not None:
        return clip_by_norm(gradients, clipnorm)
    if clipvalue is not None:
        return clip_by_value(gradients, clipvalue)
    return list(gradients), [None] * len(gradients)


def _elementwise_factor(original, clipped):
    nonzero = ops.not_equal(original, 0)
    safe = ops.where(nonzero, original, 1.0)
    return ops.where(nonzero, ops.divide(clipped, safe), 1.0)
