"""Accumulation maths (docs/design.md §1-2).

A cycle of micro-batch gradients g_i is kept as sums: `G = sum g_i`, and
where read `S = sum g_i**2` (per coordinate) or `Q = sum |g_i|**2` (per
tensor). The first micro-batch of a cycle overwrites the sums instead of
adding to them, so that the update never has to zero them. With `count`
micro-batches, `g_bar = G / count` and the within-update variance is
`W = S / count - g_bar**2`.
"""

from keras import ops

from keras_gradtools.types import TensorLike


def restart_or_add(
    accumulated: TensorLike,
    value: TensorLike,
    first: TensorLike,
    finite: TensorLike | None = None,
) -> TensorLike:
    """Returns `(0 if first else accumulated) + value`, leaving out a
    non-finite `value` (when `finite` is given and false).

    Selects rather than multiplies, so that a NaN in `value` (or in a stale
    sum) never reaches the result.
    """
    accumulated = ops.convert_to_tensor(accumulated)
    previous = ops.where(first, ops.zeros_like(accumulated), accumulated)
    if finite is not None:
        value = ops.where(finite, value, ops.zeros_like(value))
    return ops.add(previous, ops.cast(value, accumulated.dtype))


def restart_or_maximum(
    accumulated: TensorLike, value: TensorLike, first: TensorLike
) -> TensorLike:
    """Returns `maximum(value, 0 if first else accumulated)`: the running
    maximum of a cycle that Keras keeps for variables overwritten with
    their gradient (float8 scales), zero at the start of every cycle."""
    accumulated = ops.convert_to_tensor(accumulated)
    previous = ops.where(first, ops.zeros_like(accumulated), accumulated)
    return ops.maximum(ops.cast(value, accumulated.dtype), previous)


def micro_batch_variance(
    mean_square: TensorLike, mean: TensorLike
) -> TensorLike:
    """Returns the elementwise within-update variance `W >= 0`.

    Args:
        mean_square: `S / count`, the mean of the squared micro-gradients.
        mean: `G / count`, the mean micro-gradient.

    Returns:
        `max(mean_square - mean**2, 0)`. The clamp only removes float
        rounding: the exact value is a variance and never negative.
    """
    return ops.maximum(ops.subtract(mean_square, ops.square(mean)), 0.0)


def micro_second_moment_input(
    update_gradient: TensorLike, variance: TensorLike
) -> TensorLike:
    """Returns `u = g_tilde**2 + W`, the per-update input to Adam's second
    moment in "micro" mode (`W` already scaled by the clip factor `c**2`).

    Args:
        update_gradient: `g_tilde`, the clipped, noised mean gradient.
        variance: `c**2 * W`.

    Returns:
        The tensor `u` of the same shape as `update_gradient`.
    """
    return ops.add(ops.square(update_gradient), variance)
