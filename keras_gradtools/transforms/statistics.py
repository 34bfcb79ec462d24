"""Gradient-noise statistics from one accumulation cycle (docs/design.md §3).

From `n >= 2` micro-batch gradients g_i at fixed weights, with mean
`g_bar = sum g_i / n`:

    s2           = (sum g_i**2 / n - g_bar**2) * n / (n - 1)   per coordinate
    variance     = sum(s2)                            tr(Sigma_M)
    mean_norm_sq = |g_bar|**2 - variance / n          unbiased |E g|**2
    noise_scale  = variance / mean_norm_sq            B_simple, in micro-batches
    snr          = mean_norm_sq / (variance / n)

`variance` needs only the per-tensor scalars `Q = sum_i |g_i|**2` and
`|g_bar|**2` (sum s2 = (Q / n - |g_bar|**2) * n / (n - 1)); the same
function gives the per-coordinate s2 from the per-coordinate sums.

When the signal is weaker than the noise, the unbiased `mean_norm_sq` can
come out negative: B_simple is then not measurable, but bounded below by
`variance / |g_bar|**2` (|g_bar|**2 over-estimates |E g|**2 by the noise
variance / n), a bound of about `n`; that is what `noise_scale` reports,
with `signal_resolved` false and `snr` clamped at 0.
"""

from keras import ops

from keras_gradtools.types import TensorLike


def micro_batch_variance_from_sums(
    square_sum: TensorLike,
    mean_square: TensorLike,
    count: TensorLike,
    replicas: float = 1.0,
) -> TensorLike:
    """Returns the unbiased variance of one micro-batch gradient.

    Works per coordinate (`square_sum = S`, `mean_square = g_bar**2`) and
    per tensor (`square_sum = Q`, `mean_square = |g_bar|**2`).

    Args:
        square_sum: The sum of the squared micro-batch gradients, added up
            over the replicas that computed them.
        mean_square: The square of the mean gradient `g_bar = G / count`.
        count: Scalar float32, the micro-batches `n` in the cycle.
        replicas: R, the replicas whose gradients are separate samples at
            1 / R of the micro-batch (1 on a single device, or when the
            micro-batch gradients were summed over replicas first). The
            n * R samples are then `h = R * g_r`, of mean square
            `R * square_sum / n`, and the variance is reported at the
            micro-batch size (divided by R).

    Returns:
        `max(R * square_sum / n - mean_square, 0) * nR / (nR - 1) / R`,
        the clamp removing float rounding only.
    """
    count = ops.cast(count, "float32")
    replicas = ops.cast(replicas, "float32")
    samples = ops.multiply(count, replicas)
    mean_square_of_samples = ops.divide(
        ops.multiply(square_sum, replicas), count
    )
    within = ops.maximum(ops.subtract(mean_square_of_samples, mean_square), 0)
    bessel = ops.divide(samples, ops.maximum(ops.subtract(samples, 1.0), 1.0))
    return ops.multiply(within, ops.divide(bessel, replicas))


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
        A dict with `variance`, `mean_norm_sq` (unbiased, may be negative),
        `noise_scale` (in micro-batches; a lower bound when the signal is
        not resolved), `snr` (>= 0) and `signal_resolved` (1.0 or 0.0).

    Example:

    >>> stats = gradient_statistics_from_sums(4.0, 2.0, 4.0)
    >>> float(stats["noise_scale"])  # 4 / (2 - 4 / 4)
    4.0
    """
    variance = ops.cast(variance, "float32")
    count = ops.cast(count, "float32")
    mean_norm_sq = ops.subtract(mean_square_norm, ops.divide(variance, count))
    noise_scale, snr, resolved = noise_scale_and_snr(
        variance, mean_norm_sq, count
    )
    stats = {
        "variance": variance,
        "mean_norm_sq": mean_norm_sq,
        "noise_scale": noise_scale,
        "snr": snr,
        "signal_resolved": resolved,
    }
    nan = ops.cast(float("nan"), "float32")
    samples = count if samples is None else ops.cast(samples, "float32")
    valid = samples >= 2.0
    return {k: ops.where(valid, v, nan) for k, v in stats.items()}


def noise_scale_and_snr(
    variance: TensorLike, mean_norm_sq: TensorLike, count: TensorLike
) -> tuple[TensorLike, TensorLike, TensorLike]:
    """Returns `(noise_scale, snr, signal_resolved)`.

    `noise_scale = variance / mean_norm_sq` in micro-batches and
    `snr = mean_norm_sq / (variance / count)`: ratios taken last, so pass
    averaged numerators and denominators, never average the ratios. Where
    `mean_norm_sq <= 0` (the signal is not resolved above the noise), the
    noise scale is its lower bound `variance / (mean_norm_sq + variance /
    count)` (at most `count`), `snr` is 0 and `signal_resolved` is 0.0.
    `snr` is `inf` when there is no variance.
    """
    count = ops.cast(count, "float32")
    resolved = mean_norm_sq > 0
    biased_mean = ops.add(mean_norm_sq, ops.divide(variance, count))
    denominator = ops.where(resolved, mean_norm_sq, biased_mean)
    positive = denominator > 0
    inf = ops.cast(float("inf"), "float32")
    noise_scale = ops.where(
        positive, variance / ops.where(positive, denominator, 1.0), inf
    )
    has_noise = variance > 0
    snr = ops.where(
        has_noise,
        ops.maximum(mean_norm_sq, 0.0)
        * count
        / ops.where(has_noise, variance, 1.0),
        inf,
    )
    return noise_scale, snr, ops.cast(resolved, "float32")


def smoothed(average: TensorLike, value: TensorLike, decay: float):
    """One step of an exponential moving average: `decay * average +
    (1 - decay) * value` (bias-corrected by dividing by the average of 1)."""
    return ops.add(
        ops.multiply(decay, average), ops.multiply(1.0 - decay, value)
    )
