"""GradientVarianceMonitor: how noisy are the gradients, and what follows."""

import math
import os
from typing import Literal

import keras
import numpy as np
import tensorflow as tf

from keras_gradtools.callbacks.probe import GradientProbe
from keras_gradtools.optimizers import validation
from keras_gradtools.optimizers.base import GradientPipelineOptimizer

# Smoothing across probe measurements (probe mode), bias-corrected.
PROBE_SMOOTHING = 0.8


class GradientVarianceMonitor(keras.callbacks.Callback):
    """Measures the gradient noise during training and logs it.

    The statistics (DESIGN.md §3) describe how much the gradient of one
    micro-batch of M samples varies around the true gradient E g:

    - `grad_variance`: tr(Sigma_M), the summed per-coordinate variance of a
      micro-batch gradient.
    - `grad_norm`: |g_bar|, the norm of the mean gradient of the last update.
    - `grad_snr`: |E g|**2 / (tr(Sigma_M) / K), the signal-to-noise ratio of
      the mean gradient an update uses.
    - `grad_noise_scale`: B_simple = M * tr(Sigma_M) / |E g|**2, in samples
      (McCandlish et al., 2018): batches much smaller than it are noise
      dominated; much larger ones waste samples.
    - `noise_std`: sigma_t of the injected noise (when noise is on).
    - `skipped_micro_batches`: micro-batches left out so far because their
      gradient was not finite (keras_gradtools optimizers).

    Two ways to measure, chosen at the start of `fit`:

    - **From the optimizer** (free): a keras_gradtools optimizer with
      `accumulation_steps >= 2` measures the statistics inside its update
      from the sums it keeps anyway. The monitor switches
      `track_gradient_statistics` on; the noise scale uses bias-corrected
      running averages of numerator and denominator, ratio taken last.
    - **Probe** (any optimizer, any K): every `update_freq`, gradients of
      `probe_batches` fixed batches of `probe_data` at the current weights;
      weights, optimizer state, non-trainable variables and metrics are
      left as they were.

    The values go into `logs` (so `History`), to TensorBoard under
    `log_dir/gradients` (tags `grad_variance`, `grad_noise_scale`, ...;
    alongside `keras.callbacks.TensorBoard` writing to the same `log_dir`),
    and at the end of training a short advice on the batch size is printed.

    Args:
        log_dir: Optional directory for TensorBoard event files.
        update_freq: `"epoch"` or an int N: measure every N batches.
        probe_data: Optional batched `tf.data.Dataset` or `(x, y)` arrays
            for probe mode (needed when the optimizer cannot measure).
        probe_batches: Int >= 2, batches per probe. Defaults to 8.
        per_layer: Boolean. Also log `grad_variance` and `grad_snr` per
            variable (tags `grad_variance/<variable path>`).
        histogram_freq: Int >= 0. Every this many epochs, write a histogram
            of the per-coordinate variance of each variable (0: never).
        batch_size: Optional int, the micro-batch size M. By default it is
            read from the batches `fit` feeds the model.
        verbose: 0 (silent) or 1 (print the advice at the end).

    Example:

    >>> monitor = keras_gradtools.GradientVarianceMonitor(log_dir="logs")
    >>> model.compile(optimizer=keras_gradtools.Adam(accumulation_steps=8))
    >>> history = model.fit(x, y, batch_size=32, callbacks=[monitor])
    >>> history.history["grad_noise_scale"]
    """

    def __init__(
        self,
        log_dir: str | os.PathLike | None = None,
        update_freq: Literal["epoch"] | int = "epoch",
        probe_data: tf.data.Dataset | tuple | None = None,
        probe_batches: int = 8,
        per_layer: bool = False,
        histogram_freq: int = 0,
        batch_size: int | None = None,
        verbose: int = 1,
    ) -> None:
        super().__init__()
        if update_freq != "epoch":
            update_freq = validation.check_int("update_freq", update_freq, 1)
        self.log_dir = log_dir
        self.update_freq = update_freq
        self.probe_data = probe_data
        self.probe_batches = validation.check_int(
            "probe_batches", probe_batches, 2
        )
        self.per_layer = bool(per_layer)
        self.histogram_freq = validation.check_int(
            "histogram_freq", histogram_freq, 0
        )
        if batch_size is not None:
            batch_size = validation.check_int("batch_size", batch_size, 1)
        self.batch_size = batch_size
        self.verbose = verbose
        self.records = []
        self.advice = None
        self.mode = None
        self._writer = None
        self._probe = None
        self._seen_batch_size = None

    # ------------------------------------------------------------------
    # Choosing the mode.

    def on_train_begin(self, logs=None):
        self.records = []
        self._batches = 0
        self._epoch = 0
        self._probe_running = None
        optimizer = _pipeline_optimizer(self.model.optimizer)
        self.mode = self._choose_mode(optimizer)
        self._optimizer = optimizer
        if self.batch_size is None:
            self._record_batch_size()
        # Under a multi-worker strategy only the chief writes summaries.
        strategy = self.model.distribute_strategy
        if self.log_dir and strategy.extended.should_save_summary:
            self._writer = tf.summary.create_file_writer(
                os.path.join(self.log_dir, "gradients")
            )

    def _choose_mode(self, optimizer):
        if optimizer is not None and optimizer.accumulation_steps >= 2:
            try:
                was_tracking = optimizer.track_gradient_statistics
                optimizer.enable_gradient_statistics()
            except ValueError as error:
                if self.probe_data is None:
                    raise ValueError(
                        f"GradientVarianceMonitor cannot switch statistics "
                        f"on: {error} Or pass probe_data=... to measure by "
                        "probing."
                    ) from error
                return "probe"
            if not was_tracking:
                # Retrace, so that the update measures the statistics.
                self.model.make_train_function(force=True)
            return "optimizer"
        if self.probe_data is None:
            name = type(self.model.optimizer).__name__
            raise ValueError(
                "GradientVarianceMonitor measures from a keras_gradtools "
                "optimizer with accumulation_steps >= 2, or by probing. "
                f"The model's optimizer is {name} without accumulation: pass "
                "probe_data=(x, y) (or a batched dataset), or use e.g. "
                "keras_gradtools.Adam(accumulation_steps=4)."
            )
        return "probe"

    def _record_batch_size(self):
        """Wraps `model.train_step` once per model to note the largest batch
        `fit` feeds it (the batch size; a last, smaller batch does not
        count), in-graph. The wrapper stays, so later fits reuse the traced
        step instead of retracing it."""
        seen = getattr(self.model, "_keras_gradtools_batch_size", None)
        if seen is None:
            seen = tf.Variable(0, dtype=tf.int32, trainable=False)
            original = self.model.train_step

            def train_step(data):
                # Under a strategy each replica sees 1 / R of the batch.
                replicas = tf.distribute.get_strategy().num_replicas_in_sync
                x = data[0] if isinstance(data, (tuple, list)) else data
                size = tf.shape(tf.nest.flatten(x)[0])[0] * replicas
                seen.assign(tf.maximum(seen, size))
                return original(data)

            # object.__setattr__: neither is a model weight to track or save.
            object.__setattr__(self.model, "_keras_gradtools_batch_size", seen)
            object.__setattr__(self.model, "train_step", train_step)
            self.model.make_train_function(force=True)
        self._seen_batch_size = seen

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.flush()
        self.advice = self._advice()
        if self.advice and self.verbose:
            print(self.advice)

    # ------------------------------------------------------------------
    # Measuring.

    def on_train_batch_end(self, batch, logs=None):
        self._batches += 1
        if (
            self.update_freq != "epoch"
            and self._batches % self.update_freq == 0
        ):
            values = self._measure(self._batches)
            if logs is not None:
                logs.update(values)

    def on_epoch_end(self, epoch, logs=None):
        self._epoch = epoch
        if self.update_freq == "epoch":
            values = self._measure(epoch)
            if logs is not None:
                logs.update(values)

    def _micro_batch_size(self):
        if self.batch_size is not None:
            return self.batch_size
        if self._seen_batch_size is not None:
            seen = int(self._seen_batch_size.numpy())
            if seen > 0:
                return seen
        return None

    def _measure(self, step):
        if self.mode == "optimizer":
            stats, per_variable, sums = self._from_optimizer()
            batch = self._micro_batch_size()
        else:
            stats, per_variable, sums = self._from_probe()
            batch = self._probe.batch_size
        scale = stats["noise_scale"]
        values = {
            "grad_variance": stats["variance"],
            "grad_norm": stats["grad_norm"],
            "grad_snr": stats["snr"],
            "grad_noise_scale": scale * batch if batch else scale,
        }
        noise_std = self._noise_std()
        if noise_std is not None:
            values["noise_std"] = noise_std
        if self._optimizer is not None:
            values["skipped_micro_batches"] = float(
                self._optimizer.skipped_micro_batches.numpy()
            )
        updates = int(self.model.optimizer.iterations.numpy())
        self.records.append(
            {"step": step, "updates": updates, "batch_size": batch, **values}
        )
        self._write(updates, values, per_variable, sums)
        return values

    def _from_optimizer(self):
        optimizer = self._optimizer
        running = {
            k: np.asarray(v)
            for k, v in optimizer.running_gradient_statistics().items()
        }
        last = optimizer.gradient_statistics()
        stats = {
            "variance": float(running["variance"]),
            "noise_scale": float(running["noise_scale"]),
            "snr": float(running["snr"]),
            "grad_norm": float(last["grad_norm"]),
        }
        per_variable = {
            "variable_variance": running["variable_variance"],
            "variable_mean_sq": running["variable_mean_sq"],
        }
        return stats, per_variable, self._slot_sums()

    def _slot_sums(self):
        """The last complete cycle's mean and mean square, if the sums hold
        one (right after an update they do, until the next micro-batch).

        Under a strategy the sums add up the replicas' copies and, as in
        the optimizer, each replica's gradient is a sample at 1 / R of the
        batch (mean square R * S / k over k * R samples); the variance is
        then R times that of a micro-batch, which `_write` divides out.
        """
        optimizer = self._optimizer
        k = optimizer.accumulation_steps
        if not optimizer._square_sums or int(optimizer.micro_steps.numpy()) % k:
            return None
        replicas = optimizer._sample_replicas
        means = [_as_float64(g) / k for g in optimizer._gradient_sums]
        squares = [
            _as_float64(s) * replicas / k for s in optimizer._square_sums
        ]
        return means, squares, float(k * replicas), replicas

    def _from_probe(self):
        if self._probe is None:
            self._probe = GradientProbe(
                self.model,
                self.probe_data,
                self.probe_batches,
                self._micro_batch_size(),
            )
        stats, per_variable, sums = self._probe.measure()
        # Running averages across probes of numerator and denominator.
        if self._probe_running is None:
            self._probe_running = {
                "variance": 0.0,
                "mean_norm_sq": 0.0,
                "weight": 0.0,
            }
        r = self._probe_running
        decay = PROBE_SMOOTHING
        if math.isfinite(stats["variance"]) and math.isfinite(
            stats["mean_norm_sq"]
        ):
            r["variance"] = (
                decay * r["variance"] + (1 - decay) * stats["variance"]
            )
            r["mean_norm_sq"] = (
                decay * r["mean_norm_sq"] + (1 - decay) * stats["mean_norm_sq"]
            )
            r["weight"] = decay * r["weight"] + (1 - decay)
        if r["weight"] > 0:
            variance = r["variance"] / r["weight"]
            mean_norm_sq = r["mean_norm_sq"] / r["weight"]
            stats = dict(stats)
            stats["variance"] = variance
            stats["noise_scale"] = (
                variance / mean_norm_sq if mean_norm_sq > 0 else math.inf
            )
            stats["snr"] = (
                mean_norm_sq * len(self._probe.batches) / variance
                if variance > 0
                else math.inf
            )
        return stats, per_variable, sums

    def _noise_std(self):
        optimizer = self._optimizer
        if optimizer is None or optimizer.noise_eta == 0:
            return None
        return float(optimizer.gradient_statistics()["noise_std"])

    # ------------------------------------------------------------------
    # TensorBoard.

    def _write(self, updates, values, per_variable, sums):
        """Writes at step = optimizer updates (comparable across
        update_freq settings and runs with different accumulation)."""
        if self._writer is None:
            return
        variables = self.model.trainable_variables
        with self._writer.as_default(step=updates):
            for name, value in values.items():
                tf.summary.scalar(name, value)
            if self.per_layer and per_variable is not None:
                for i, variable in enumerate(variables):
                    variance = float(per_variable["variable_variance"][i])
                    mean_sq = float(per_variable["variable_mean_sq"][i])
                    tf.summary.scalar(
                        f"grad_variance/{variable.path}", variance
                    )
                    if variance > 0:
                        k = self._averaged_count()
                        tf.summary.scalar(
                            f"grad_snr/{variable.path}", mean_sq * k / variance
                        )
            histogram_due = (
                self.histogram_freq
                and self.update_freq == "epoch"
                and self._epoch % self.histogram_freq == 0
            )
            if histogram_due and sums is not None:
                means, squares, count, replicas = sums
                for variable, g, q in zip(variables, means, squares):
                    s2 = np.maximum(np.asarray(q) - np.asarray(g) ** 2, 0)
                    s2 = s2 * count / max(count - 1, 1) / replicas
                    tf.summary.histogram(
                        f"grad_variance_per_coordinate/{variable.path}", s2
                    )
        self._writer.flush()

    def _averaged_count(self):
        if self.mode == "optimizer":
            return float(self._optimizer.accumulation_steps)
        return float(self.probe_batches)

    # ------------------------------------------------------------------
    # Advice.

    def _advice(self):
        """One paragraph comparing the measured noise scale with the batch.

        The noise scale grows as the loss falls (McCandlish et al. 2018),
        so the advice uses its median over training and reports the range.
        """
        if not self.records:
            return None
        scales = [r["grad_noise_scale"] for r in self.records]
        scale = float(np.median(scales))
        batch = self.records[-1]["batch_size"]
        optimizer = _pipeline_optimizer(self.model.optimizer)
        k = optimizer.accumulation_steps if optimizer is not None else 1
        if not batch:
            return (
                f"Gradient noise scale ~ {scale:.3g} micro-batches (median "
                "over training; batch size unknown: pass batch_size= for "
                "samples)."
            )
        effective = batch * k
        unit = f"batch {effective}" + (f" ({k} x {batch})" if k > 1 else "")
        history = (
            f"Gradient noise scale B_simple: {_samples(scales[0])} at the "
            f"start, {_samples(scales[-1])} at the end of training, median "
            f"{_samples(scale)}"
        )
        if not math.isfinite(scale):
            return (
                f"{history}: the mean gradient was mostly not measurably "
                f"above the noise at {unit}; larger batches (accumulation) "
                "or a smaller learning rate would average it out."
            )
        if scale > 2 * effective:
            steps = max(2, math.ceil(scale / batch))
            return (
                f"{history}. {unit.capitalize()} is far below it: larger "
                f"effective batches via accumulation_steps ~ {steps} would "
                "train with fewer updates at little extra cost in samples."
            )
        if scale < 0.5 * effective:
            steps = max(1, math.floor(scale / batch))
            return (
                f"{history}. {unit.capitalize()} is well above it: smaller "
                f"effective batches (accumulation_steps ~ {steps}) would use "
                "samples more efficiently."
            )
        return (
            f"{history}. {unit.capitalize()} is close to it: a good "
            "trade-off between updates and samples."
        )


def _samples(value):
    return f"{value:.0f} samples" if math.isfinite(value) else "unbounded"


def _pipeline_optimizer(optimizer):
    """The keras_gradtools optimizer inside `optimizer`, if any (Keras wraps
    optimizers in a LossScaleOptimizer under mixed precision)."""
    inner = getattr(optimizer, "inner_optimizer", None)
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        optimizer = inner
    if isinstance(optimizer, GradientPipelineOptimizer):
        return optimizer
    return None


def _as_float64(variable):
    return np.asarray(variable.numpy(), dtype=np.float64)
