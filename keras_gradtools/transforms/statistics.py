"""Gradient-noise statistics from one accumulation cycle (DESIGN.md §3).

From `n >= 2` micro-batch gradients g_i at fixed weights, with mean
`g_bar = sum g_i / n` and mean square `q = sum g_i**2 / n`:

    s2           = (q - g_bar**2) * n / (n - 1)      per coordinate
    variance     = sum(s2)                            tr(Sigma_M)
    mean_norm_sq = |g_bar|**2 - variance / n          unbiased |E g|**2
    noise_scale  = variance / mean_norm_sq            B_simple, in micro-batches
    snr          = mean_norm_sq / (variance / n)

The per-tensor parts are plain sums, so they are taken inside the update
where `g_bar` and `q` are read anyway: no extra pass over the parameters.
"""

from keras import ops

from keras_gradtools.transforms.clipping import flat_sum
from keras_gradtools.types import TensorLike


def variance_and_square_norm(
    mean: TensorLike, mean_square: TensorLike, count: TensorLike
) -> tuple[TensorLike, TensorLike]:
    """Per-tensor partial sums `(sum(s2), sum(g_bar**2))`.

    Args:
        mean: `g_bar` for one tensor.
        mean_square: `q`, the mean of the squared micro-gradients.
        count: Scalar float32 tensor `n`, the number of micro-batches.

    Returns:
        Two scalar tensors, to be added up over all tensors.
    """
    within = ops.maximum(ops.subtract(mean_square, ops.square(mean)), 0.0)
    bessel = ops.divide(count, ops.maximum(ops.subtract(count, 1.0), 1.0))
    return (
        ops.multiply(flat_sum(within), bessel),
        flat_sum(ops.square(mean)),
    )


def gradient_statistics_from_sums(
    variance: TensorLike,
    mean_square_norm: TensorLike,
    count: TensorLike,
    samples: TensorLike | None = None,
) -> dict[str, TensorLike]:
    """Turns the summed per-tensor parts into the reported statistics.

    Args:
        variance: Scalar, `tr(Sigma_M)` summed over all tensors.
        mean_square_norm: Scalar, `|g_bar|**2` summed over all tensors.
        count: Scalar float32 tensor `n`, the micro-batches in the mean.
        samples: The gradient samples the variance was estimated from
            (the statistics are NaN below 2); defaults to `count`. Under a
            strategy each replica's micro-batch is a sample.

    Returns:
        A dict with `variance`, `mean_norm_sq`, `noise_scale` (in
        micro-batches) and `snr`. `noise_scale` is `inf` when the unbiased
        squared mean is not positive (the measured gradient is all noise).

    Example:

    >>> stats = gradient_statistics_from_sums(4.0, 2.0, 4.0)
    >>> float(stats["noise_scale"])  # 4 / (2 - 4 / 4)
    4.0
    """
    variance = ops.cast(variance, "float32")
    count = ops.cast(count, "float32")
    mean_norm_sq = ops.subtract(mean_square_norm, ops.divide(variance, count))
    noise_scale, snr = noise_scale_and_snr(variance, mean_norm_sq, count)
    stats = {
        "variance": variance,
        "mean_norm_sq": mean_norm_sq,
        "noise_scale": noise_scale,
        "snr": snr,
    }
    nan = ops.cast(float("nan"), "float32")
    samples = count if samples is None else ops.cast(samples, "float32")
    valid = samples >= 2.0
    return {k: ops.where(valid, v, nan) for k, v in stats.items()}


def noise_scale_and_snr(
    variance: TensorLike, mean_norm_sq: TensorLike, count: TensorLike
) -> tuple[TensorLike, TensorLike]:
    """`B_simple = variance / mean_norm_sq` (micro-batches) and
    `snr = mean_norm_sq / (variance / count)`.

    Both are ratios taken last: pass averaged numerators and denominators,
    never average the ratios. `noise_scale` is `inf` when `mean_norm_sq` is
    not positive, `snr` is `inf` when there is no variance.
    """
    inf = ops.cast(float("inf"), "float32")
    positive = mean_norm_sq > 0
    noise_scale = ops.where(
        positive, variance / ops.where(positive, mean_norm_sq, 1.0), inf
    )
    has_noise = variance > 0
    snr = ops.where(
        has_noise,
        mean_norm_sq * count / ops.where(has_noise, variance, 1.0),
        inf,
    )
    return noise_scale, snr
