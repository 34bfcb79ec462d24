"""GradientVarianceMonitor: how noisy are the gradients, and what follows."""

import math
import os
import warnings
from typing import Any
from typing import Literal

import keras
import numpy as np

from keras_gradtools import transforms
from keras_gradtools import validation
from keras_gradtools.backends import callback_hooks
from keras_gradtools.callbacks import advice as advice_lib
from keras_gradtools.callbacks.probe import GradientProbe
from keras_gradtools.callbacks.summary_writer import SummaryWriter
from keras_gradtools.optimizers.base import GradientPipelineOptimizer

# Smoothing across probe measurements (probe mode), bias-corrected.
PROBE_SMOOTHING = 0.8
# The largest signal-to-noise ratio reported. The variance comes from
# float32 sums, resolved only down to ~1e-7 (float32's epsilon) of the
# squared mean gradient, so an SNR above ~1e7 is not measurable; 1e6 leaves
# room for rounding. Above it (zero variance included: every micro-batch's
# gradient the same), `grad_snr` is this cap and `grad_noise_resolved` 0.
SNR_LIMIT = 1e6
UPDATE_FREQ_VALUES = '"epoch", "batch" or an integer N >= 1'


class GradientVarianceMonitor(keras.callbacks.Callback):
    """Measures the gradient noise during training and logs it.

    The statistics (docs/design.md §3) describe how much the gradient of one
    micro-batch of M samples varies around the true gradient E g:

    - `grad_variance`: tr(Sigma_M), the summed per-coordinate variance of a
      micro-batch gradient.
    - `grad_norm`: |g_bar|, the norm of the mean gradient of the last update.
    - `grad_snr`: |E g|**2 / (tr(Sigma_M) / K), the signal-to-noise ratio of
      the mean gradient an update uses (0 when the signal is not resolved).
    - `grad_noise_scale`: B_simple = M * tr(Sigma_M) / |E g|**2, in samples
      (McCandlish et al., 2018): batches much smaller than it are noise
      dominated; much larger ones waste samples. When the signal is not
      resolved above the noise (`grad_signal_resolved` = 0), it is a lower
      bound.
    - `grad_signal_resolved`: 1 when |E g|**2 was measured above zero.
    - `grad_noise_resolved`: 1 when tr(Sigma_M) was measured above what
      float32 sums resolve. When it was not (zero variance: e.g. every
      micro-batch the same), `grad_snr` is `SNR_LIMIT` (1e6, a lower bound,
      never an infinity) and `grad_noise_scale` 0 (no noise: any batch
      beyond one micro-batch only spends samples). So, like the lower
      bounds of unresolved signals, every statistic stays finite in the
      logs, `History` and TensorBoard, and a flag says which are bounds.
    - `effective_batch`: K * M in samples, what the advice and the plots
      compare the noise scale with.
    - `noise_std`: sigma_t of the injected noise (when noise is on).
    - `skipped_micro_batches`: micro-batches left out so far because their
      gradient was not finite (keras_gradtools optimizers); a warning is
      issued once per epoch in which some were.

    Two ways to measure, chosen at the start of `fit`:

    - **From the optimizer** (nearly free): a keras_gradtools optimizer with
      `accumulation_steps >= 2` measures the statistics inside its update
      from the sums it keeps. The monitor switches
      `track_gradient_statistics` on (if the optimizer is in the middle of
      an accumulation cycle, from the next cycle); the noise scale uses
      bias-corrected running averages of numerator and denominator, ratio
      taken last.
    - **Probe** (any optimizer, any K): every `update_freq`, gradients of
      `probe_batches` fixed batches of `probe_data` at the current weights;
      weights, optimizer state, non-trainable variables and metrics are
      left as they were.

    Each measurement goes into the logs (so into `History` once per epoch:
    with `update_freq=N`, the epoch's last measurement) and to TensorBoard
    under `log_dir/gradients` (next to `keras.callbacks.TensorBoard`'s runs
    in the same `log_dir`; written by process 0 / the chief only) twice:
    every measurement at step = optimizer updates (tags `grad_*`, which
    compare across `update_freq` and K), and the epoch's value at step =
    epoch (tags `epoch_grad_*`, on the same axis as the `epoch_loss` of
    `keras.callbacks.TensorBoard`). At the end of training `advice` holds
    (and `verbose=1` prints) advice on the effective batch size, which
    proposes no effective batch above one epoch of data (fit's steps per
    epoch x M) and says so when its K exceeds the optimizer's
    `max_accumulation_steps`. Every measurement also checks the weights: a
    non-finite weight (an update rule that diverged, which no check on the
    gradients can catch) is reported with a warning naming the variables.

    Args:
        log_dir: Optional directory for TensorBoard event files.
        update_freq: `"epoch"` (measure at the end of every epoch),
            `"batch"` (every batch: the same as 1) or an int N >= 1
            (every N batches).
        probe_data: Optional `(x, y)` arrays or an iterable of batches (e.g.
            a batched `tf.data.Dataset`) for probe mode (needed when the
            optimizer cannot measure).
        probe_batches: Int >= 2, batches per probe. Defaults to 8.
        per_layer: Boolean. Also log `grad_variance` and `grad_snr` per
            variable (tags `grad_variance/<variable path>`).
        histogram_freq: Int >= 0. Every this many epochs, write a histogram
            of the per-coordinate variance of each variable (0: never). In
            optimizer mode this keeps per-coordinate sums of squares (4 bytes
            per parameter).
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
        update_freq: Literal["epoch", "batch"] | int = "epoch",
        probe_data: Any = None,
        probe_batches: int = 8,
        per_layer: bool = False,
        histogram_freq: int = 0,
        batch_size: int | None = None,
        verbose: int = 1,
    ) -> None:
        super().__init__()
        update_freq = _check_update_freq(update_freq)
        self.log_dir = log_dir
        self.update_freq = update_freq
        if update_freq == "epoch":
            # Measuring per epoch needs no batch hook. Keras dispatches the
            # batch hooks of `fit` asynchronously, without waiting for each
            # step's logs, only while no callback overrides them: this
            # instance takes the base class's (marked as the default).
            self.on_train_batch_end = (
                keras.callbacks.Callback.on_train_batch_end.__get__(self)
            )
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
        self.advice_details = None
        self.mode = None
        self._writer = None
        self._probe = None
        self._batch_size_seen = None

    # ------------------------------------------------------------------
    # Choosing the mode.

    def on_train_begin(self, logs=None):
        self.records = []
        self._batches = 0
        self._epoch = 0
        self._latest = None
        self._probe_running = None
        self._nonfinite_reported = set()
        optimizer = pipeline_optimizer(self.model.optimizer)
        self._optimizer = optimizer
        self.mode = self._choose_mode(optimizer)
        if self.batch_size is None:
            self._batch_size_seen = callback_hooks.record_batch_size(self.model)
        if self.log_dir and callback_hooks.writes_summaries(self.model):
            self._writer = SummaryWriter(
                os.path.join(self.log_dir, "gradients")
            )

    def _choose_mode(self, optimizer):
        if optimizer is not None and optimizer.max_accumulation_steps >= 2:
            before = len(optimizer.variables) if optimizer.built else None
            tracking = optimizer.track_gradient_statistics
            optimizer.enable_gradient_statistics(
                per_coordinate=self.histogram_freq > 0
            )
            changed = not tracking or (
                before is not None and len(optimizer.variables) != before
            )
            if changed:
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

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        details = self._advice()
        self.advice_details = details
        self.advice = None if details is None else details.text
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
            callback_hooks.sync_state(self.model)
            values = self._measure(self._batches)
            if logs is not None:
                logs.update(values)

    def on_epoch_end(self, epoch, logs=None):
        self._epoch = epoch
        if self.update_freq == "epoch":
            values = self._measure(epoch)
        else:
            values = self._latest
        if values is not None and logs is not None:
            logs.update(values)
        if values is not None and self._writer is not None:
            # On the x-axis of keras.callbacks.TensorBoard's epoch curves.
            for name, value in values.items():
                self._writer.scalar(f"epoch_{name}", value, epoch)
            self._writer.flush()
        self._warn_about_skipped_micro_batches(epoch)

    def _micro_batch_size(self):
        if self.batch_size is not None:
            return self.batch_size
        if self._batch_size_seen is not None:
            seen = self._batch_size_seen()
            if seen:
                return seen
        return None

    def _measure(self, step):
        if self.mode == "optimizer":
            stats, per_variable, sums = self._from_optimizer()
            batch = self._micro_batch_size()
        else:
            stats, per_variable, sums = self._from_probe()
            batch = self._probe.batch_size
        scale, snr, noise_resolved = _bounded(stats)
        values = {
            "grad_variance": stats["variance"],
            "grad_norm": stats["grad_norm"],
            "grad_snr": snr,
            "grad_noise_scale": scale * batch if batch else scale,
            "grad_signal_resolved": stats["signal_resolved"],
            "grad_noise_resolved": noise_resolved,
        }
        if batch:
            values["effective_batch"] = float(
                batch * self._accumulation_steps()
            )
        if self._optimizer is not None:
            if self._optimizer.noise_eta > 0:
                values["noise_std"] = float(
                    ops_to_float(
                        self._optimizer.gradient_statistics()["noise_std"]
                    )
                    if self.mode == "optimizer"
                    else self._optimizer.noise_std
                )
            values["skipped_micro_batches"] = float(self._skipped())
        updates = int(ops_to_int(self.model.optimizer.iterations))
        self.records.append(
            {
                "step": step,
                "updates": updates,
                "batch_size": batch,
                "accumulation_steps": self._accumulation_steps(),
                **values,
            }
        )
        self._latest = values
        self._check_weights(updates)
        self._write(updates, values, per_variable, sums)
        return values

    def _accumulation_steps(self):
        if self._optimizer is None:
            return 1
        return self._optimizer.accumulation_steps

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
            "signal_resolved": float(running["signal_resolved"]),
            "grad_norm": float(ops_to_float(last["grad_norm"])),
        }
        per_variable = {
            "variable_variance": running["variable_variance"],
            "variable_mean_sq": running["variable_mean_sq"],
        }
        return stats, per_variable, self._slot_sums()

    def _slot_sums(self):
        """The last complete cycle's per-coordinate sums, if the optimizer
        keeps the sums of squares and they hold one (right after an update
        they do, until the next micro-batch): `(means, square sums, count,
        samples per micro-batch)`."""
        accumulator = self._optimizer.pipeline.accumulator
        if not accumulator.square_sums:
            return None
        if int(ops_to_int(accumulator.position)) != 0:
            return None
        samples, valid = accumulator.cycle_samples_and_validity()
        if not bool(keras.ops.convert_to_numpy(valid)):
            return None
        count = float(ops_to_int(accumulator.cycle_steps))
        means = [keras.ops.divide(g, count) for g in accumulator.gradient_sums]
        return means, accumulator.square_sums, count, samples

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
        if math.isfinite(stats["variance"]) and math.isfinite(
            stats["mean_norm_sq"]
        ):
            for name, value in (
                ("variance", stats["variance"]),
                ("mean_norm_sq", stats["mean_norm_sq"]),
                ("weight", 1.0),
            ):
                r[name] = (
                    PROBE_SMOOTHING * r[name] + (1 - PROBE_SMOOTHING) * value
                )
        if r["weight"] > 0:
            variance = r["variance"] / r["weight"]
            mean_norm_sq = r["mean_norm_sq"] / r["weight"]
            noise_scale, snr, resolved = transforms.noise_scale_and_snr(
                variance, mean_norm_sq, float(len(self._probe.batches))
            )
            stats = dict(stats)
            stats.update(
                variance=variance,
                noise_scale=float(noise_scale),
                snr=float(snr),
                signal_resolved=float(resolved),
            )
        return stats, per_variable, sums

    # ------------------------------------------------------------------
    # Warnings.

    def _skipped(self):
        optimizer = self._optimizer
        if optimizer is None or not optimizer.built:
            return 0
        return ops_to_int(optimizer.skipped_micro_batches)

    def _warn_about_skipped_micro_batches(self, epoch):
        if self._optimizer is not None:
            self._optimizer.report_skipped_micro_batches(
                f"In epoch {epoch + 1}"
            )

    def _check_weights(self, updates):
        bad = [
            v.path
            for v in self.model.trainable_variables
            if not np.all(np.isfinite(keras.ops.convert_to_numpy(v)))
        ]
        new = sorted(set(bad) - self._nonfinite_reported)
        if new:
            warnings.warn(
                f"After update {updates}, the weights {new} hold NaN or inf. "
                "The gradients were finite (non-finite ones are skipped), so "
                "the update rule itself diverged: lower the learning rate, "
                "clip, or check the inner optimizer.",
                RuntimeWarning,
                stacklevel=2,
            )
            self._nonfinite_reported.update(new)

    # ------------------------------------------------------------------
    # TensorBoard.

    def _write(self, updates, values, per_variable, sums):
        """Writes at step = optimizer updates (comparable across
        update_freq settings and runs with different accumulation)."""
        if self._writer is None:
            return
        writer = self._writer
        variables = self.model.trainable_variables
        for name, value in values.items():
            writer.scalar(name, value, updates)
        if self.per_layer and per_variable is not None:
            samples = self._averaged_count()
            for i, variable in enumerate(variables):
                variance = float(per_variable["variable_variance"][i])
                mean_sq = float(per_variable["variable_mean_sq"][i])
                writer.scalar(
                    f"grad_variance/{variable.path}", variance, updates
                )
                if variance > 0:
                    snr = max(mean_sq - variance / samples, 0.0) * samples
                    writer.scalar(
                        f"grad_snr/{variable.path}",
                        min(snr / variance, SNR_LIMIT),
                        updates,
                    )
        histogram_due = (
            self.histogram_freq
            and self.update_freq == "epoch"
            and self._epoch % self.histogram_freq == 0
        )
        if histogram_due and sums is not None:
            means, square_sums, count, samples = sums
            for variable, g, q in zip(variables, means, square_sums):
                variance = transforms.micro_batch_variance_from_sums(
                    q, keras.ops.square(g), count, samples
                )
                writer.histogram(
                    f"grad_variance_per_coordinate/{variable.path}",
                    keras.ops.convert_to_numpy(variance),
                    updates,
                )
        writer.flush()

    def _averaged_count(self):
        if self.mode == "optimizer":
            return float(self._optimizer.accumulation_steps)
        return float(self.probe_batches)

    # ------------------------------------------------------------------
    # Advice.

    def _advice(self):
        """Advice comparing the noise scale with the effective batch (see
        `keras_gradtools.callbacks.advice`)."""
        if not self.records:
            return None
        batch = self.records[-1]["batch_size"]
        if not batch:
            return None
        steps = (self.params or {}).get("steps")
        optimizer = self._optimizer
        return advice_lib.batch_size_advice(
            [r["grad_noise_scale"] for r in self.records],
            [r["grad_signal_resolved"] == 1.0 for r in self.records],
            micro_batch=batch,
            accumulation_steps=self.records[-1]["accumulation_steps"],
            steps_per_epoch=int(steps) if steps else None,
            max_accumulation_steps=(
                None if optimizer is None else optimizer.max_accumulation_steps
            ),
        )


def _check_update_freq(update_freq):
    """`update_freq` as `"epoch"` or an int >= 1 (`"batch"` is 1)."""
    if update_freq == "epoch":
        return "epoch"
    if update_freq == "batch":
        return 1
    if (
        isinstance(update_freq, bool)
        or not isinstance(update_freq, (int, np.integer))
        or update_freq < 1
    ):
        raise ValueError(
            f"update_freq must be {UPDATE_FREQ_VALUES} (measure every N "
            f"batches); got {update_freq!r}."
        )
    return int(update_freq)


def _bounded(stats):
    """`(noise scale in micro-batches, snr, noise resolved)`, finite: an
    SNR above `SNR_LIMIT` (or infinite: zero variance) is reported as the
    limit with the flag 0, and the noise scale of zero variance is 0 (also
    when the mean gradient is zero too, where the ratio is 0/0)."""
    scale, snr = stats["noise_scale"], stats["snr"]
    variance = stats["variance"]
    if variance == 0:
        return 0.0, SNR_LIMIT if stats["signal_resolved"] else 0.0, 0.0
    if snr > SNR_LIMIT:  # inf included; NaN (not measured yet) is kept
        return scale, SNR_LIMIT, 0.0
    return scale, snr, 1.0


def pipeline_optimizer(optimizer):
    """The keras_gradtools optimizer inside `optimizer`, if any (Keras wraps
    optimizers in a LossScaleOptimizer under mixed precision).

    Args:
        optimizer: A Keras optimizer (a model's `optimizer`).

    Returns:
        The `GradientPipelineOptimizer` it is or holds, else `None`.
    """
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        optimizer = optimizer.inner_optimizer
    if isinstance(optimizer, GradientPipelineOptimizer):
        return optimizer
    return None


def ops_to_int(value):
    return int(keras.ops.convert_to_numpy(value))


def ops_to_float(value):
    return float(keras.ops.convert_to_numpy(value))
