"""Gradient clipping by value, per-tensor norm and global norm.

Every function returns the clipped gradients *and* the factor `c` it applied
(docs/design.md §1), because the "micro" second moment of Adam scales the
within-update variance by `c**2` (docs/design.md §2). The factor is a scalar for
the norm modes and elementwise for clipping by value. The norm modes accept
the tensors' squared norms when the step has already computed them.
"""

from collections.abc import Sequence

from keras import ops

from keras_gradtools import backends
from keras_gradtools.transforms.reductions import flat_scaled_norm
from keras_gradtools.transforms.reductions import norms_without_overflow
from keras_gradtools.transforms.reductions import square_norms as _square_norms
from keras_gradtools.transforms.reductions import total
from keras_gradtools.types import TensorLike

Clipped = tuple[list[TensorLike], list[TensorLike | None]]


def clip_by_value(tensors: Sequence[TensorLike], clipvalue: float) -> Clipped:
    """Clips every element of every tensor to `[-clipvalue, clipvalue]`."""
    clipped = [ops.clip(t, -clipvalue, clipvalue) for t in tensors]
    factors = [_elementwise_factor(t, c) for t, c in zip(tensors, clipped)]
    return clipped, factors


def clip_by_norm(
    tensors: Sequence[TensorLike],
    clipnorm: float,
    square_norms: Sequence[TensorLike] | None = None,
) -> Clipped:
    """Rescales each tensor on its own so that its L2 norm is at most
    `clipnorm` (the rule of `tf.clip_by_norm` and Keras's `clipnorm`)."""
    if square_norms is None:
        square_norms = _square_norms(tensors)
    clipped, factors = [], []
    norms = norms_without_overflow(tensors, square_norms)
    for t, norm in zip(tensors, norms):
        factor = clipnorm / ops.maximum(norm, clipnorm)
        clipped.append(ops.multiply(t, factor))
        factors.append(factor)
    return clipped, factors


def clip_by_global_norm(
    tensors: Sequence[TensorLike],
    clipnorm: float,
    square_norms: Sequence[TensorLike] | None = None,
) -> Clipped:
    """Rescales all tensors by one factor so that their global norm is at
    most `clipnorm` (the rule `keras.optimizers` uses).

    A non-finite global norm gives a NaN factor, as in Keras, so that a
    non-finite gradient is never silently turned into a finite one. A
    finite gradient whose squared norm overflows float32 (elements beyond
    ~1.8e19; Keras's global norm is then inf and its factor NaN) keeps a
    finite norm (`norms_without_overflow`) and is clipped.
    """
    if square_norms is None:
        square_norms = _square_norms(tensors)
    squares = total(square_norms)

    def plain():
        return ops.sqrt(squares)

    def scaled():
        # One scaled norm of all the tensors together: a branch of one
        # fused reduction, not one per tensor (compile time; see
        # `reductions.all_finite`).
        return flat_scaled_norm(tensors)

    norm = backends.cond(ops.isfinite(squares), plain, scaled)
    factor = clipnorm * ops.minimum(1.0 / norm, 1.0 / clipnorm)
    factor = factor + (norm - norm)
    return [ops.multiply(t, factor) for t in tensors], [factor] * len(tensors)


def clip_gradients(
    gradients: Sequence[TensorLike],
    clipvalue: float | None = None,
    clipnorm: float | None = None,
    global_clipnorm: float | None = None,
    square_norms: Sequence[TensorLike] | None = None,
) -> Clipped:
    """Applies at most one clipping mode to a list of gradients.

    Args:
        gradients: A list of gradient tensors.
        clipvalue: Optional float. Clip each element to `[-v, v]`.
        clipnorm: Optional float. Clip each tensor's L2 norm to this value.
        global_clipnorm: Optional float. Clip the global L2 norm of all
            tensors to this value.
        square_norms: Optional per-tensor squared L2 norms of `gradients`,
            if the caller has them (saves a pass over the gradients).

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
        return clip_by_global_norm(gradients, global_clipnorm, square_norms)
    if clipnorm is not None:
        return clip_by_norm(gradients, clipnorm, square_norms)
    if clipvalue is not None:
        return clip_by_value(gradients, clipvalue)
    return list(gradients), [None] * len(gradients)


def needs_square_norms(
    clipnorm: float | None, global_clipnorm: float | None
) -> bool:
    """Whether a clipping mode reads the gradients' squared norms."""
    return clipnorm is not None or global_clipnorm is not None


def _elementwise_factor(original, clipped):
    nonzero = ops.not_equal(original, 0)
    safe = ops.where(nonzero, original, 1.0)
    return ops.where(nonzero, ops.divide(clipped, safe), 1.0)
