"""The gradient statistics as the optimizer's public methods: switching
them on (also after `build`) and reading them. The statistics themselves
(their state, what an update measures and records) are the pipeline's
stage, `pipeline/statistics.py`."""

import contextlib
from typing import Any

from keras_gradtools import validation


class GradientStatisticsMethods:
    """Mixin of `GradientPipelineOptimizer`: `enable_gradient_statistics`,
    `gradient_statistics`, `running_gradient_statistics`."""

    def enable_gradient_statistics(self, per_coordinate: bool = False) -> None:
        """Switches `track_gradient_statistics` on, also after `build`.

        Used by `GradientVarianceMonitor` at the start of `fit`. The missing
        state is created; a function that already traced the update must be
        traced again (`model.make_train_function(force=True)`). Switched on
        in the middle of an accumulation cycle, the statistics start with
        the next cycle (the current one's earlier micro-batches were not
        measured), unless the per-coordinate sums of squares already hold
        them.

        Args:
            per_coordinate: Also keep the per-coordinate sums of squares
                (4 bytes per parameter) where the update rule does not, for
                per-coordinate variances (the monitor's histograms).
        """
        pipeline = self.pipeline
        strategy = pipeline.hooks.strategy
        scope = contextlib.nullcontext()
        if strategy is not None:
            scope = strategy.scope()
        with scope:
            pipeline.enable_statistics(per_coordinate)

    def _require_statistics(self, method):
        if not self.track_gradient_statistics:
            raise ValueError(
                f"`{method}()` needs gradient statistics, which this "
                "optimizer does not measure: create it with "
                "track_gradient_statistics=True, call "
                "enable_gradient_statistics(), or attach a "
                "GradientVarianceMonitor to fit. (The current noise level is "
                "`optimizer.noise_std`.)"
            )
        validation.require_built(self, method + "()")

    def gradient_statistics(self) -> dict[str, Any]:
        """Returns a snapshot of the gradient statistics of the last update.

        Needs `track_gradient_statistics=True`. Values read NaN until the
        first update has measured them; `variance`, `mean_norm_sq`,
        `noise_scale`, `snr` and `signal_resolved` need at least two
        gradient samples per update (`accumulation_steps >= 2`, or two or
        more replicas) and stay NaN otherwise.

        Returns:
            A dict of float32 scalar tensors:
            - `variance`: tr(Sigma_M), the summed per-coordinate variance of
              one micro-batch gradient.
            - `mean_norm_sq`: unbiased estimate of |E g|**2 (negative when
              the signal is below the noise).
            - `noise_scale`: B_simple = tr(Sigma_M) / |E g|**2, in
              micro-batches (multiply by the micro-batch size for samples);
              a lower bound when `signal_resolved` is 0.
            - `snr`: |E g|**2 / (tr(Sigma_M) / n), the signal-to-noise ratio
              of the update's mean gradient over n micro-batches (>= 0).
            - `signal_resolved`: 1.0 when |E g|**2 was measured above zero.
            - `grad_norm`: the L2 norm of the mean gradient before clipping.
            - `noise_std`: the standard deviation of the injected noise.

        Raises:
            ValueError: if statistics are off or the optimizer is not built.

        Example:

        >>> opt = keras_gradtools.SGD(0.1, accumulation_steps=4,
        ...                           track_gradient_statistics=True)
        >>> # ... after some updates:
        >>> float(opt.gradient_statistics()["noise_scale"])
        """
        self._require_statistics("gradient_statistics")
        return self.pipeline.statistics.snapshot()

    def running_gradient_statistics(self) -> dict[str, Any]:
        """Returns bias-corrected running averages of the statistics.

        The variance tr(Sigma_M) and the squared mean |E g|**2 are averaged
        over updates with decay 0.95 and corrected for their start at zero;
        the noise scale and signal-to-noise ratio are ratios of the
        averages, never averages of ratios (McCandlish et al., 2018). Values
        read NaN until an update has measured them.

        Returns:
            A dict of float32 tensors: scalars `variance`, `mean_norm_sq`,
            `noise_scale` (micro-batches; a lower bound where
            `signal_resolved` is 0), `snr`, `signal_resolved`,
            `updates_averaged` (the bias-correction weight), and
            per-variable vectors `variable_variance` and
            `variable_mean_sq`, in the order of the variables the optimizer
            was built with.

        Raises:
            ValueError: if statistics are off or the optimizer is not built.
        """
        self._require_statistics("running_gradient_statistics")
        return self.pipeline.statistics.running_averages(
            self.accumulation_steps
        )
