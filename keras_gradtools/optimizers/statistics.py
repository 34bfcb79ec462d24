"""Gradient statistics measured inside the update (DESIGN.md §3).

The mixin owns what the statistics add to an optimizer: the scalars of the
last update, the bias-corrected running averages, and switching them on
after `build`. The pipeline calls `_measure` inside the update, where the
accumulated sums are read anyway, and `_record_statistics` with the writes
of the update (so a skipped update records nothing).
"""

import contextlib
from typing import Any

from keras import ops

from keras_gradtools import transforms

STATISTICS = (
    "variance",
    "mean_norm_sq",
    "noise_scale",
    "snr",
    "grad_norm",
    "noise_std",
)
# Smoothing of the running statistics, per update (McCandlish et al. 2018
# average the numerator and denominator of B_simple, then take the ratio).
STATISTICS_SMOOTHING = 0.95


class GradientStatisticsMixin:
    """Statistics for `GradientPipelineOptimizer` (not used on its own)."""

    def _add_running_statistics(self):
        """Bias-corrected running averages of the variance and squared mean
        (overall and per variable), and the sum of squares if missing."""
        count = len(self._trainable_variables)
        self._running_statistics = {
            "variance": self._add_scalar(
                "running_variance", "float32", 0.0, "running_statistic"
            ),
            "mean_norm_sq": self._add_scalar(
                "running_mean_norm_sq", "float32", 0.0, "running_statistic"
            ),
            "weight": self._add_scalar(
                "running_weight", "float32", 0.0, "running_statistic"
            ),
            "variable_variance": self._add_scalar(
                "running_variable_variance",
                "float32",
                0.0,
                "running_statistic",
                shape=(count,),
            ),
            "variable_mean_sq": self._add_scalar(
                "running_variable_mean_sq",
                "float32",
                0.0,
                "running_statistic",
                shape=(count,),
            ),
        }
        if self.accumulation_steps > 1 and not self._square_sums:
            self._add_square_sums(self._trainable_variables)

    def enable_gradient_statistics(self) -> None:
        """Switches `track_gradient_statistics` on, also after `build`.

        Used by `GradientVarianceMonitor` at the start of `fit`. The missing
        state (the sum of squares, the running averages) is created; a
        function that already traced the update must be traced again.

        Raises:
            ValueError: if called in the middle of an accumulation cycle,
                where the new sum of squares would miss micro-batches.
        """
        if self.track_gradient_statistics:
            return
        if self.built:
            position = int(self._micro_steps.numpy()) % self.accumulation_steps
            if position:
                raise ValueError(
                    "Gradient statistics can only be switched on between "
                    f"accumulation cycles; this optimizer is {position} "
                    f"micro-batches into a cycle of {self.accumulation_steps}."
                    " Create it with track_gradient_statistics=True instead."
                )
            self.track_gradient_statistics = True
            scope = contextlib.nullcontext()
            if self._strategy is not None:
                scope = self._strategy.scope()
            with scope:
                self._add_running_statistics()
        else:
            self.track_gradient_statistics = True

    def gradient_statistics(self) -> dict[str, Any]:
        """Returns a snapshot of the gradient statistics of the last update.

        With `track_gradient_statistics=True`, statistics are measured
        inside the update from the accumulators it reads anyway (DESIGN.md
        §3). `variance`, `mean_norm_sq`, `noise_scale` and `snr` also need
        `accumulation_steps >= 2`. What is not measured reads NaN, as does
        everything before the first update; `noise_std` is always kept.

        Returns:
            A dict of float32 scalar tensors:
            - `variance`: tr(Sigma_M), the summed per-coordinate variance of
              one micro-batch gradient.
            - `mean_norm_sq`: unbiased estimate of |E g|**2.
            - `noise_scale`: B_simple = tr(Sigma_M) / |E g|**2, in
              micro-batches (multiply by the micro-batch size for samples).
            - `snr`: |E g|**2 / (tr(Sigma_M) / n), the signal-to-noise ratio
              of the update's mean gradient over n micro-batches.
            - `grad_norm`: the L2 norm of the mean gradient before clipping.
            - `noise_std`: the standard deviation of the injected noise.

        Example:

        >>> opt = keras_gradtools.SGD(0.1, accumulation_steps=4,
        ...                           track_gradient_statistics=True)
        >>> # ... after some updates:
        >>> float(opt.gradient_statistics()["noise_scale"])
        """
        if not self.built:
            raise ValueError(
                "`gradient_statistics()` needs a built optimizer: call "
                "`apply` (or `model.fit`) or `build(variables)` first."
            )
        return {name: ops.copy(var) for name, var in self._statistics.items()}

    def _measure(self, means, variables, mean_squares, count, replicas=1):
        """The statistics of this update (DESIGN.md §3), plus per-variable
        parts for the running averages.

        With `replicas > 1` the mean squares are over `count * replicas`
        samples taken at 1 / `replicas` of the micro-batch size (one per
        replica and micro-batch); their variance is `replicas` times that
        of a micro-batch gradient, which is what is reported.
        """
        mean_sq_parts = [transforms.flat_sum(ops.square(g)) for g in means]
        norm_sq = ops.sum(ops.stack(mean_sq_parts))
        stats = {"grad_norm": ops.sqrt(norm_sq)}
        if mean_squares is None:
            return stats, None
        samples = ops.multiply(count, float(replicas))
        variance_parts = [
            transforms.variance_and_square_norm(g, q, samples)[0] / replicas
            for g, q in zip(means, mean_squares)
        ]
        variance = ops.sum(ops.stack(variance_parts))
        stats.update(
            transforms.gradient_statistics_from_sums(
                variance, norm_sq, count, samples=samples
            )
        )
        indices = [self._get_variable_index(v) for v in variables]
        parts = {
            "variable_variance": dict(zip(indices, variance_parts)),
            "variable_mean_sq": dict(zip(indices, mean_sq_parts)),
        }
        return stats, parts

    def _record_statistics(self, measured, sigma):
        if sigma is not None:
            self.assign(self._statistics["noise_std"], sigma)
        if measured is None:
            return
        stats, parts = measured
        for name, value in stats.items():
            self.assign(self._statistics[name], value)
        if parts is None or not self._running_statistics:
            return
        running = self._running_statistics
        valid = ops.logical_and(
            ops.isfinite(stats["variance"]), ops.isfinite(stats["mean_norm_sq"])
        )
        decay = STATISTICS_SMOOTHING

        def smooth(variable, value):
            new = decay * variable + (1.0 - decay) * value
            self.assign(variable, ops.where(valid, new, variable))

        smooth(running["variance"], stats["variance"])
        smooth(running["mean_norm_sq"], stats["mean_norm_sq"])
        smooth(running["weight"], 1.0)
        for name in ("variable_variance", "variable_mean_sq"):
            old = running[name]
            value = ops.stack(
                [
                    parts[name].get(i, old[i])
                    for i in range(len(self._trainable_variables))
                ]
            )
            smooth(old, value)

    def running_gradient_statistics(self) -> dict[str, Any]:
        """Returns bias-corrected running averages of the statistics.

        The variance tr(Sigma_M) and the squared mean |E g|**2 are averaged
        over updates with decay `STATISTICS_SMOOTHING` (0.95) and corrected
        for their start at zero; the noise scale and signal-to-noise ratio
        are ratios of the averages, never averages of ratios (McCandlish et
        al., 2018). Needs `track_gradient_statistics=True`.

        Returns:
            A dict of float32 tensors: scalars `variance`, `mean_norm_sq`,
            `noise_scale` (micro-batches), `snr`, `updates_averaged` (the
            bias-correction weight's effective count), and per-variable
            vectors `variable_variance` and `variable_mean_sq`, in the
            order of the variables the optimizer was built with.
        """
        if not self._running_statistics:
            raise ValueError(
                "Running gradient statistics need "
                "track_gradient_statistics=True (or a GradientVarianceMonitor "
                "attached to fit)."
            )
        running = self._running_statistics
        weight = ops.convert_to_tensor(running["weight"])
        safe = ops.where(weight > 0, weight, 1.0)
        corrected = {
            name: ops.divide(ops.convert_to_tensor(running[name]), safe)
            for name in (
                "variance",
                "mean_norm_sq",
                "variable_variance",
                "variable_mean_sq",
            )
        }
        result = dict(corrected)
        ratios = transforms.noise_scale_and_snr(
            corrected["variance"],
            corrected["mean_norm_sq"],
            float(self.accumulation_steps),
        )
        nan = ops.cast(float("nan"), "float32")
        for name, value in zip(("noise_scale", "snr"), ratios):
            result[name] = ops.where(weight > 0, value, nan)
        result["updates_averaged"] = weight
        return result
