"""Accumulation maths: the within-update variance and Adam's "micro" input.

With `count` micro-batch gradients g_i accumulated as `G = sum g_i` and
`S = sum g_i**2`, the mean is `g_bar = G / count` and the within-update
variance of the micro-batch gradients is `W = S / count - g_bar**2`
(DESIGN.md §2).
"""

from keras import ops

from keras_gradtools.types import TensorLike


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
    update_gradient: TensorLike,
    variance: TensorLike,
    clip_factor: TensorLike | None = None,
) -> TensorLike:
    """Returns `u = g_tilde**2 + c**2 * W`, the per-update input to Adam's
    second moment in "micro" mode.

    Args:
        update_gradient: `g_tilde`, the clipped, noised mean gradient.
        variance: `W`, from `micro_batch_variance`.
        clip_factor: The clipping factor `c` (scalar or elementwise), or
            `None` when nothing was clipped.

    Returns:
        The tensor `u` of the same shape as `update_gradient`.
    """
    if clip_factor is not None:
        variance = ops.multiply(ops.square(clip_factor), variance)
    return ops.add(ops.square(update_gradient), variance)
