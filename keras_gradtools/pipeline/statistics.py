"""Gradient statistics measured inside the update (docs/design.md §3).

The statistics object owns the statistics' state: the values measured by
the last update and bias-corrected running averages of their numerators
and denominators. The pipeline asks it to `measure` from what the update
reads anyway (the mean gradient's per-variable squared norms, which global
clipping also uses, and the accumulator's per-variable Σ|g|²), and to
`record` with the update's other writes, so a skipped update records
nothing.
"""

from keras import ops

from keras_gradtools import transforms

STATISTICS = (
    "variance",
    "mean_norm_sq",
    "noise_scale",
    "snr",
    "signal_resolved",
    "grad_norm",
    "noise_std",
)
# Smoothing of the running statistics, per update (McCandlish et al. 2018
# average the numerator and denominator of B_simple, then take the ratio).
STATISTICS_SMOOTHING = 0.95
_RUNNING = ("variance", "mean_norm_sq", "weight")
_RUNNING_PER_VARIABLE = ("variable_variance", "variable_mean_sq")


class GradientStatistics:
    """The statistics of each update and their running averages.

    Args:
        make_state: The update rule's hook that creates a variable of the
            pipeline's state (`make_state(name, **options)`).
        variable_count: The number of model variables.
    """

    def __init__(self, make_state, variable_count):
        self._variable_count = variable_count
        # Zeros, not NaN, until measured (`snapshot` reads NaN then): JAX
        # checks that a multi-process run starts every process from equal
        # values, and NaN equals nothing.
        self.last = {
            name: make_state(f"statistic_{name}", role="statistic")
            for name in STATISTICS
        }
        self.recorded = make_state(
            "statistic_updates", role="statistic", dtype="int32"
        )
        self.running = {
            name: make_state(f"running_{name}", role="running_statistic")
            for name in _RUNNING
        }
        for name in _RUNNING_PER_VARIABLE:
            self.running[name] = make_state(
                f"running_{name}",
                role="running_statistic",
                shape=(variable_count,),
            )

    def measure(self, mean_norms, norm_sums, count, samples, indices, valid):
        """The statistics of this update, plus per-variable parts.

        Args:
            mean_norms: `|g_bar|**2` per variable of this update (a list
                of scalars or one vector).
            norm_sums: `Q = sum |g_i|**2` per variable (summed over the
                replicas; a list of scalars or one vector), or `None` when
                there are no micro-batch sums.
            count: Scalar float32, the micro-batches in the mean.
            samples: Gradient samples per micro-batch (R under a strategy
                whose replicas' gradients are samples, else 1).
            indices: The variables' indices (for the per-variable vectors).
            valid: Scalar boolean: whether the sums belong to one cycle at
                one batch size (statistics switched on mid-cycle, or a
                checkpoint restored onto another replica count, are not).

        Returns:
            A measurement to pass to `record`.
        """
        # One vector per quantity, not one small graph per variable: XLA
        # compiles each distinct kernel separately, and per-variable
        # scalars picked out of a vector by a constant index are distinct
        # kernels (docs/performance.md).
        mean_norms = _vector(mean_norms)
        grad_norm = ops.sqrt(ops.sum(mean_norms))
        if norm_sums is None:
            return {"grad_norm": grad_norm}, None, None
        replicas = ops.cast(samples, "float32")
        variances = transforms.micro_batch_variance_from_sums(
            _vector(norm_sums), mean_norms, count, replicas
        )
        stats = transforms.gradient_statistics_from_sums(
            ops.sum(variances),
            ops.sum(mean_norms),
            count,
            samples=ops.multiply(count, replicas),
        )
        stats["grad_norm"] = grad_norm
        parts = {
            "variable_variance": variances,
            "variable_mean_sq": mean_norms,
            "indices": list(indices),
        }
        return stats, parts, valid

    def record(self, assign, measured, sigma):
        """Writes a measurement through `assign` (the rule's gated write, so
        that a skipped update records nothing)."""
        assign(self.recorded, ops.add(self.recorded, 1))
        assign(
            self.last["noise_std"],
            ops.zeros(()) if sigma is None else sigma,
        )
        stats, parts, valid = measured
        assign(self.last["grad_norm"], stats["grad_norm"])
        if parts is None:
            return
        for name, value in stats.items():
            if name == "grad_norm":
                continue
            previous = ops.convert_to_tensor(self.last[name])
            assign(self.last[name], ops.where(valid, value, previous))
        usable = ops.logical_and(
            valid,
            ops.logical_and(
                ops.isfinite(stats["variance"]),
                ops.isfinite(stats["mean_norm_sq"]),
            ),
        )

        def smooth(variable, value):
            old = ops.convert_to_tensor(variable)
            new = transforms.smoothed(old, value, STATISTICS_SMOOTHING)
            assign(variable, ops.where(usable, new, old))

        smooth(self.running["variance"], stats["variance"])
        smooth(self.running["mean_norm_sq"], stats["mean_norm_sq"])
        smooth(self.running["weight"], ops.ones(()))
        indices = parts["indices"]
        for name in _RUNNING_PER_VARIABLE:
            value = parts[name]
            if indices != list(range(self._variable_count)):
                # Variables without a gradient keep their average.
                old = ops.convert_to_tensor(self.running[name])
                value = ops.scatter_update(old, [[i] for i in indices], value)
            smooth(self.running[name], value)

    def snapshot(self):
        """A copy of the last update's statistics (float32 scalars): NaN
        before the first update recorded them; those needing two samples
        (all but `grad_norm` and `noise_std`), NaN until one was measured."""
        recorded = ops.greater(ops.convert_to_tensor(self.recorded), 0)
        measured = ops.greater(ops.convert_to_tensor(self.running["weight"]), 0)
        nan = ops.cast(float("nan"), "float32")
        return {
            name: ops.where(
                recorded if name in ("grad_norm", "noise_std") else measured,
                ops.convert_to_tensor(v),
                nan,
            )
            for name, v in self.last.items()
        }

    def running_averages(self, accumulation_steps):
        """Bias-corrected running averages, with the noise scale and SNR as
        ratios of the averages."""
        weight = ops.convert_to_tensor(self.running["weight"])
        safe = ops.where(weight > 0, weight, 1.0)
        result = {
            name: ops.divide(ops.convert_to_tensor(self.running[name]), safe)
            for name in ("variance", "mean_norm_sq") + _RUNNING_PER_VARIABLE
        }
        noise_scale, snr, resolved = transforms.noise_scale_and_snr(
            result["variance"],
            result["mean_norm_sq"],
            float(accumulation_steps),
        )
        nan = ops.cast(float("nan"), "float32")
        measured = weight > 0
        result["noise_scale"] = ops.where(measured, noise_scale, nan)
        result["snr"] = ops.where(measured, snr, nan)
        result["signal_resolved"] = ops.where(measured, resolved, nan)
        result["updates_averaged"] = weight
        return result


def _vector(values):
    """A list of per-variable scalars as one vector (a vector unchanged)."""
    if isinstance(values, (list, tuple)):
        return ops.stack(list(values))
    return values
