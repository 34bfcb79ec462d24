"""AdaptiveAccumulation: an effective batch that follows the gradient noise
scale.

McCandlish et al. (2018) show that the most efficient batch size tracks the
gradient noise scale B_simple, which grows as the loss falls. The optimizer's
sums already measure it (`running_gradient_statistics`); this callback sets
the number of accumulated micro-batches K so that the effective batch K * M
follows it, without retracing the step (K is optimizer state), and scales
the learning rate with the effective batch by the rule the user picks.
"""

import math
import os
import warnings
from typing import Literal

import keras
import numpy as np

from keras_gradtools import validation
from keras_gradtools.backends import callback_hooks
from keras_gradtools.callbacks import transfer as transfer_lib
from keras_gradtools.callbacks.gradient_variance_monitor import (
    pipeline_optimizer,
)
from keras_gradtools.callbacks.summary_writer import SummaryWriter
from keras_gradtools.callbacks.transfer import LEARNING_RATE_RULES
from keras_gradtools.callbacks.transfer import learning_rate_factor

__all__ = [
    "LEARNING_RATE_RULES",
    "AdaptiveAccumulation",
    "learning_rate_factor",
    "target_steps",
]


def target_steps(
    noise_scale, micro_batch, current, min_steps, max_steps, hysteresis
):
    """The K to use, from the measured noise scale.

    The target is `K* = B_simple / M` micro-batches. K moves on a grid of
    powers of two, to the one nearest to K* (in log scale) within
    `[min_steps, max_steps]`, and only when K* is off from the current K by
    more than the factor `hysteresis`: an estimate wobbling around a grid
    point does not make K flap.

    Args:
        noise_scale: B_simple in samples (a lower bound counts as its
            value: the batch should grow at least that far).
        micro_batch: M, samples per micro-batch (global).
        current: The current K.
        min_steps, max_steps: The range of K.
        hysteresis: Float > 1.

    Returns:
        The new K (an int; `current` when nothing changes).
    """
    if not math.isfinite(noise_scale) or noise_scale <= 0:
        return current
    wanted = noise_scale / micro_batch
    ratio = wanted / current
    if max(ratio, 1 / ratio) <= hysteresis:
        return current
    candidate = 2 ** round(math.log2(max(wanted, 1.0)))
    return int(min(max(candidate, min_steps), max_steps))


class AdaptiveAccumulation(keras.callbacks.Callback):
    """Sets `accumulation_steps` so that the effective batch follows the
    gradient noise scale.

    At every `update_freq`, it reads the optimizer's running gradient
    statistics (switching them on at the start of `fit` if needed: they cost
    a few reductions inside the update), computes the noise scale B_simple
    in samples, and moves K towards `B_simple / M` (M: the micro-batch, the
    global batch under distribution) on a grid of powers of two within
    `[min_steps, max_steps]`, with hysteresis. The new K takes effect when
    the next accumulation cycle starts; the compiled step is not retraced.
    The learning rate is multiplied by a factor that follows the effective
    batch (`learning_rate_rule`); learning-rate schedules keep advancing one
    step per update, whatever K, and the factor multiplies their value.
    Adam's moment decay and the weight decay follow K by the transfer rule
    shared with `BatchSizeSchedule` and `Seesaw` (`transfer_beta_2`,
    `transfer_beta_1`, `transfer_weight_decay`; see `BatchSizeSchedule`).
    The gradient noise scale is a noisy proxy for the critical batch size
    (Merrill et al., 2025); `upward_only=True` lets K only grow, as a
    batch-size warmup does.

    `accumulation_steps` and `learning_rate_factor` are optimizer state:
    saved with the model, restored by `BackupAndRestore`, identical on every
    replica and device. They appear in the logs (so in `History`) and, with
    `log_dir`, in TensorBoard under `log_dir/gradients` next to the
    monitor's scalars.

    Args:
        max_steps: Int >= 2, the largest K; at most the optimizer's
            `max_accumulation_steps` (declared when it is created: the sums
            exist from `build`).
        min_steps: Int >= 2, the smallest K (defaults to 2): the noise
            scale is measured from the micro-batches of each update, so an
            update needs at least two. K starts there if it is below.
        learning_rate_rule: `"sqrt"` (default), `"linear"`, `"adascale"` or
            `None`; see `learning_rate_factor`. The learning rate given to
            the optimizer is taken as tuned for the `accumulation_steps` it
            was created with.
        hysteresis: Float > 1, defaults to 2: K changes only when
            B_simple / M is off from it by more than this factor.
        upward_only: Bool, defaults to `False`: K never decreases.
        transfer_beta_2: Bool, defaults to `True`: Adam's second moment
            keeps its half-life in samples (Marek et al., 2025; "micro"
            does so already).
        transfer_beta_1: Bool, defaults to `False`: the same for the first
            moment.
        transfer_weight_decay: Bool, defaults to `True`: the weight decay
            keeps B / (lr * weight_decay) constant (Bergsma et al., 2025);
            Adam and AdamW only.
        update_freq: `"epoch"` (default) or an int N: adapt every N batches.
        log_dir: Optional directory for TensorBoard.
        verbose: 0 or 1 (print each change).

    Example:

    >>> optimizer = keras_gradtools.Adam(1e-3, max_accumulation_steps=64)
    >>> model.compile(optimizer=optimizer, loss="mse")
    >>> model.fit(x, y, batch_size=32, epochs=20,
    ...           callbacks=[keras_gradtools.AdaptiveAccumulation(64)])
    """

    def __init__(
        self,
        max_steps: int,
        min_steps: int = 2,
        learning_rate_rule: Literal["sqrt", "linear", "adascale"]
        | None = "sqrt",
        hysteresis: float = 2.0,
        update_freq: Literal["epoch"] | int = "epoch",
        log_dir: str | os.PathLike | None = None,
        verbose: int = 0,
        upward_only: bool = False,
        transfer_beta_2: bool = True,
        transfer_beta_1: bool = False,
        transfer_weight_decay: bool = True,
    ) -> None:
        super().__init__()
        self.max_steps = validation.check_int("max_steps", max_steps, 2)
        self.min_steps = validation.check_int(
            "min_steps", min_steps, 2, self.max_steps
        )
        self.transfer = transfer_lib.HyperparameterTransfer(
            learning_rate_rule,
            beta_2=transfer_beta_2,
            beta_1=transfer_beta_1,
            weight_decay=transfer_weight_decay,
        )
        self.learning_rate_rule = self.transfer.learning_rate_rule
        self.upward_only = bool(upward_only)
        self.hysteresis = validation.check_float(
            "hysteresis", hysteresis, minimum=1.0, open_min=True
        )
        if update_freq != "epoch":
            update_freq = validation.check_int("update_freq", update_freq, 1)
        self.update_freq = update_freq
        self.log_dir = log_dir
        self.verbose = verbose
        self.history = []

    def on_train_begin(self, logs=None):
        optimizer = pipeline_optimizer(self.model.optimizer)
        if optimizer is None:
            raise ValueError(
                "AdaptiveAccumulation needs a keras_gradtools optimizer (its "
                "sums measure the noise scale and hold K); the model's is "
                f"{type(self.model.optimizer).__name__}."
            )
        if self.max_steps > optimizer.max_accumulation_steps:
            raise ValueError(
                f"AdaptiveAccumulation(max_steps={self.max_steps}) exceeds "
                "the optimizer's max_accumulation_steps="
                f"{optimizer.max_accumulation_steps}: create the optimizer "
                f"with max_accumulation_steps={self.max_steps} (the sums "
                "must exist from the start)."
            )
        self.transfer.check(optimizer, "AdaptiveAccumulation")
        transfer_lib.ensure_built(self.model, optimizer)
        self._optimizer = optimizer
        self.transfer.switch_on(optimizer)
        if not optimizer.track_gradient_statistics:
            optimizer.enable_gradient_statistics()
            self.model.make_train_function(force=True)
        self._batch_size = callback_hooks.record_batch_size(self.model)
        # The K the learning rate was tuned for: the optimizer's configured
        # K (a run resumed with an adapted K keeps the same base).
        self._base_steps = optimizer.initial_accumulation_steps
        if optimizer.accumulation_steps < self.min_steps:
            if optimizer.built:
                # K and what follows it, by the transfer rule.
                self.transfer.apply(optimizer, self.min_steps)
            else:
                optimizer.accumulation_steps = self.min_steps
        self._batches = 0
        self._warned_at_max = False
        self._writer = None
        if self.log_dir and callback_hooks.writes_summaries(self.model):
            self._writer = SummaryWriter(
                os.path.join(self.log_dir, "gradients")
            )

    def on_train_batch_end(self, batch, logs=None):
        self._batches += 1
        if (
            self.update_freq != "epoch"
            and self._batches % self.update_freq == 0
        ):
            callback_hooks.sync_state(self.model)
            values = self._adapt(self._batches)
            if logs is not None:
                logs.update(values)

    def on_epoch_end(self, epoch, logs=None):
        if self.update_freq == "epoch":
            values = self._adapt(epoch)
        else:
            values = self._state()
        if logs is not None:
            logs.update(values)

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def _state(self):
        return {
            "accumulation_steps": float(self._optimizer.accumulation_steps),
            "learning_rate_factor": self._optimizer.learning_rate_factor,
        }

    def _adapt(self, step):
        optimizer = self._optimizer
        micro_batch = self._batch_size()
        running = optimizer.running_gradient_statistics()
        noise_scale = float(np.asarray(running["noise_scale"]))
        variance = float(np.asarray(running["variance"]))
        mean_norm_sq = float(np.asarray(running["mean_norm_sq"]))
        current = optimizer.accumulation_steps
        if micro_batch and math.isfinite(noise_scale):
            steps = target_steps(
                noise_scale * micro_batch,
                micro_batch,
                current,
                self.min_steps,
                self.max_steps,
                self.hysteresis,
            )
        else:
            steps = current
        if self.upward_only:
            steps = max(steps, current)
        if steps != current and self.verbose:
            print(
                f"AdaptiveAccumulation: accumulation_steps {current} -> "
                f"{steps} (B_simple ~ {noise_scale * micro_batch:.0f} "
                f"samples, micro-batch {micro_batch})"
            )
        self.transfer.switch_on(optimizer)  # if built only in fit's step
        self.transfer.apply(
            optimizer, steps, variance=variance, mean_norm_sq=mean_norm_sq
        )
        values = self._state()
        updates = int(keras.ops.convert_to_numpy(optimizer.iterations))
        self.history.append(
            {
                "step": step,
                "updates": updates,
                "noise_scale": noise_scale * micro_batch
                if micro_batch
                else float("nan"),
                **values,
            }
        )
        if self._writer is not None:
            for name, value in values.items():
                self._writer.scalar(name, value, updates)
            self._writer.flush()
        if (
            not self._warned_at_max
            and steps == self.max_steps
            and micro_batch
            and noise_scale > 2 * steps
        ):
            self._warned_at_max = True
            warnings.warn(
                f"AdaptiveAccumulation: the noise scale "
                f"({noise_scale * micro_batch:.0f} samples) is above the "
                f"largest effective batch allowed ({steps} x {micro_batch}); "
                "a larger max_steps would follow it further.",
                stacklevel=2,
            )
        return values
