"""Batch-size schedules: K as a function of the samples seen.

`BatchSizeSchedule` sets the number of accumulated micro-batches K from the
number of samples the optimizer has consumed (a batch-size warmup, as
Megatron-LM's, MaxText's and OLMo-core's; Merrill et al., 2025, find the
critical batch small at the start of training and growing). `Seesaw`
(Meterez et al., 2025) turns each halving of a step-decay learning rate
into a doubling of the batch and a learning rate times 1/sqrt(2).

Both move the learning rate, Adam's moment decay and the weight decay with
K by the transfer rule of `transfer.py`, and change K only at a cycle
boundary, so that each update's K, learning-rate factor and weight-decay
factor belong together. Their position is recomputed from the optimizer's
state (`micro_steps` times the micro-batch size), so that a run resumed by
`BackupAndRestore` continues the schedule where it was.
"""

import os
from collections.abc import Callable
from collections.abc import Sequence
from typing import Literal

import keras
from keras import ops

from keras_gradtools import validation
from keras_gradtools.backends import callback_hooks
from keras_gradtools.callbacks import transfer as transfer_lib
from keras_gradtools.callbacks.gradient_variance_monitor import (
    pipeline_optimizer,
)
from keras_gradtools.callbacks.summary_writer import SummaryWriter


class BatchSizeSchedule(keras.callbacks.Callback):
    """Sets `accumulation_steps` from the number of samples seen.

    The samples seen are `optimizer.micro_steps` times the micro-batch size
    `fit` feeds (global under distribution; a last, smaller batch of an
    epoch counts as a full one): they count across epochs and `fit` calls,
    and resume with the optimizer's state. A cycle that starts after `s`
    samples uses the K scheduled for `s`: a change waits for the cycle in
    progress to end (K is state: the compiled step is not retraced).

    When K moves from K0 (the `accumulation_steps` the optimizer was
    created with; its hyperparameters are taken as tuned for it) to K:

    - the learning rate is multiplied by `learning_rate_rule`'s factor
      (`"sqrt"`: sqrt(K / K0), `"linear"`: K / K0, `None`: 1);
    - with `transfer_beta_2` (Adam, AdamW), the second moment keeps its
      half-life fixed in samples, `beta_2**(K / K0)` per update (Marek et
      al., 2025; Adam's default "micro" second moment does so already);
      `transfer_beta_1` does the same for the first moment;
    - with `transfer_weight_decay` (Adam, AdamW), the weight decay keeps
      AdamW's timescale B / (lr * weight_decay) constant: times
      (K / K0) / factor (Bergsma et al., 2025).

    All of it is optimizer state: saved with the model, restored by
    `BackupAndRestore`, the same on every replica and device. K, the
    factors and the samples seen are in the logs (so in `History`) and,
    with `log_dir`, in TensorBoard under `log_dir/gradients`.

    Args:
        steps: A list of `(samples_seen, accumulation_steps)` pairs, the
            first at 0 samples, samples strictly increasing: K is the one
            of the last pair at or below the samples seen. Or a callable
            taking the samples seen (an int) and returning K.
        learning_rate_rule: `"sqrt"` (default), `"linear"` or `None`.
        transfer_beta_2: Bool, defaults to `True`.
        transfer_beta_1: Bool, defaults to `False`.
        transfer_weight_decay: Bool, defaults to `True`. Refused for an
            optimizer with weight decay other than Adam and AdamW.
        log_dir: Optional directory for TensorBoard.
        verbose: 0 or 1 (print each change).

    Example:

    >>> optimizer = keras_gradtools.AdamW(
    ...     1e-3, accumulation_steps=1, max_accumulation_steps=8)
    >>> model.compile(optimizer=optimizer, loss="mse")
    >>> warmup = keras_gradtools.BatchSizeSchedule(
    ...     [(0, 1), (20_000, 2), (60_000, 4), (140_000, 8)])
    >>> model.fit(x, y, batch_size=32, epochs=20, callbacks=[warmup])
    """

    def __init__(
        self,
        steps: Sequence[tuple[int, int]] | Callable[[int], int],
        learning_rate_rule: Literal["sqrt", "linear"] | None = "sqrt",
        transfer_beta_2: bool = True,
        transfer_beta_1: bool = False,
        transfer_weight_decay: bool = True,
        log_dir: str | os.PathLike | None = None,
        verbose: int = 0,
    ) -> None:
        super().__init__()
        if callable(steps):
            self.steps = steps
        else:
            self.steps = _check_steps(steps)
        self.transfer = transfer_lib.HyperparameterTransfer(
            validation.check_choice(
                "learning_rate_rule",
                learning_rate_rule,
                ("sqrt", "linear", None),
            ),
            beta_2=transfer_beta_2,
            beta_1=transfer_beta_1,
            weight_decay=transfer_weight_decay,
        )
        self.log_dir = log_dir
        self.verbose = verbose
        self.history = []

    # ------------------------------------------------------------------
    # What the schedule says.

    def steps_at(self, samples_seen: int) -> int:
        """The K scheduled after `samples_seen` samples.

        Args:
            samples_seen: An int >= 0.

        Returns:
            K, an int.
        """
        if callable(self.steps):
            return self.steps(int(samples_seen))
        chosen = self.steps[0][1]
        for samples, steps in self.steps:
            if samples_seen >= samples:
                chosen = steps
        return chosen

    def _target(self, samples_seen):
        """`(K, schedule_factor)` after `samples_seen` samples."""
        return self.steps_at(samples_seen), 1.0

    def _largest_steps(self):
        if callable(self.steps):
            return None
        return max(steps for _, steps in self.steps)

    # ------------------------------------------------------------------
    # fit.

    def on_train_begin(self, logs=None):
        name = type(self).__name__
        optimizer = pipeline_optimizer(self.model.optimizer)
        if optimizer is None:
            raise ValueError(
                f"{name} needs a keras_gradtools optimizer (K is its state); "
                f"the model's is {type(self.model.optimizer).__name__}."
            )
        largest = self._largest_steps()
        limit = optimizer.max_accumulation_steps
        if limit < 2:
            raise ValueError(
                f"{name} needs an optimizer created with "
                "max_accumulation_steps > 1 (the largest K it will "
                "schedule): K is state only then."
            )
        if largest is not None and largest > limit:
            raise ValueError(
                f"{name} schedules accumulation_steps up to {largest}, "
                f"above the optimizer's max_accumulation_steps={limit}: "
                f"create the optimizer with max_accumulation_steps={largest} "
                "(the sums must exist from the start)."
            )
        self.transfer.check(optimizer, name)
        transfer_lib.ensure_built(self.model, optimizer)
        self._optimizer = optimizer
        self._recorded = None
        self.transfer.switch_on(optimizer)
        self._batch_size = callback_hooks.record_batch_size(self.model)
        self._writer = None
        if self.log_dir and callback_hooks.writes_summaries(self.model):
            self._writer = SummaryWriter(
                os.path.join(self.log_dir, "gradients")
            )

    def on_epoch_begin(self, epoch, logs=None):
        # The state is current here on every backend (after a
        # BackupAndRestore restore too): the position restarts from it.
        self._applied = None
        self._micro_steps = None
        if not self._optimizer.built:
            return  # a model built by its first step: from its first batch
        callback_hooks.sync_state(self.model)
        self._micro_steps = int(
            ops.convert_to_numpy(self._optimizer.micro_steps)
        )
        micro_batch = self._batch_size()
        if self._micro_steps == 0 or micro_batch:
            self._settle(self._micro_steps * micro_batch, synced=True)

    def on_train_batch_end(self, batch, logs=None):
        if self._micro_steps is None:
            callback_hooks.sync_state(self.model)
            self.transfer.switch_on(self._optimizer)
            self._micro_steps = int(
                ops.convert_to_numpy(self._optimizer.micro_steps)
            )
        else:
            self._micro_steps += 1
        micro_batch = self._batch_size()
        if micro_batch:
            self._settle(self._micro_steps * micro_batch, synced=False)

    def on_epoch_end(self, epoch, logs=None):
        values = self._state()
        if logs is not None:
            logs.update(values)
        if self._writer is not None:
            updates = int(ops.convert_to_numpy(self._optimizer.iterations))
            for key, value in values.items():
                self._writer.scalar(key, value, updates)
            self._writer.flush()

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    # ------------------------------------------------------------------

    def _settle(self, samples_seen, synced):
        """Applies the scheduled K and factors at a cycle boundary (or
        notes that they are in place)."""
        target = self._target(samples_seen)
        if target == self._applied:
            return
        steps, schedule_factor = target
        optimizer = self._optimizer
        steps = validation.check_int(
            f"{type(self).__name__}: the scheduled accumulation_steps",
            steps,
            1,
            optimizer.max_accumulation_steps,
        )
        if not synced:
            callback_hooks.sync_state(self.model)
        if int(ops.convert_to_numpy(optimizer.pipeline.accumulator.position)):
            return  # mid-cycle: at the next boundary
        current = optimizer.accumulation_steps
        self.transfer.apply(optimizer, steps, schedule_factor)
        self._applied = target
        if target != self._recorded:
            self._recorded = target
            values = self._state(samples_seen)
            self.history.append(
                {
                    "samples_seen": samples_seen,
                    "updates": int(ops.convert_to_numpy(optimizer.iterations)),
                    **values,
                }
            )
            if self.verbose and current != steps:
                print(
                    f"{type(self).__name__}: accumulation_steps {current} -> "
                    f"{steps} after {samples_seen} samples; learning rate "
                    f"x {values['learning_rate_factor']:.3g}"
                )

    def _state(self, samples_seen=None):
        optimizer = self._optimizer
        if samples_seen is None:
            samples_seen = self._micro_steps * self._batch_size()
        factor = optimizer.learning_rate_factor
        values = {
            "accumulation_steps": float(optimizer.accumulation_steps),
            "learning_rate_factor": factor,
            "samples_seen": float(samples_seen),
        }
        try:
            rate = float(ops.convert_to_numpy(optimizer.learning_rate))
            values["effective_learning_rate"] = rate * factor
        except (AttributeError, TypeError, ValueError):
            pass
        if hasattr(optimizer, "effective_beta_2"):
            values["effective_beta_2"] = optimizer.effective_beta_2
            values["effective_weight_decay"] = optimizer.effective_weight_decay
        return values


class Seesaw(BatchSizeSchedule):
    """Seesaw (Meterez et al., 2025): where a step-decay schedule would cut
    the learning rate, grow the batch instead.

    At each boundary of a step-decay schedule that multiplies the learning
    rate by `decay`, K is multiplied by 1 / `decay` and the learning rate by
    `decay * (1 / decay)**0.5` under the `"sqrt"` rule: for `decay=0.5`,
    the batch doubles and the learning rate is multiplied by 1/sqrt(2)
    (Meterez et al. report about 36% fewer sequential steps at equal loss).
    With `learning_rate_rule="linear"` (SGD) the learning rate stays and
    only the batch grows (Smith et al., 2018, "Don't decay the learning
    rate, increase the batch size"). Once K reaches `max_steps` the
    schedule decays the learning rate itself.

    The weight decay follows the batch as in `BatchSizeSchedule` (the
    schedule's own decay of the learning rate does not move it), and so do
    Adam's moments. The logs carry K, `learning_rate_factor` and
    `effective_learning_rate`.

    Args:
        boundaries: Strictly increasing samples seen (ints > 0) at which
            the step-decay schedule would multiply the learning rate by
            `decay`.
        decay: Float in (0, 1) whose inverse is an integer (0.5: double
            the batch); defaults to 0.5.
        max_steps: The largest K (defaults to the optimizer's
            `max_accumulation_steps`).
        learning_rate_rule: `"sqrt"` (default, Adam), `"linear"` (SGD) or
            `None` (the step decay in full, and the larger batch).
        transfer_beta_2, transfer_beta_1, transfer_weight_decay, log_dir,
        verbose: As for `BatchSizeSchedule`.

    Example:

    >>> optimizer = keras_gradtools.Adam(
    ...     2e-3, accumulation_steps=1, max_accumulation_steps=16)
    >>> model.compile(optimizer=optimizer, loss="mse")
    >>> seesaw = keras_gradtools.Seesaw([30_000, 60_000, 90_000])
    >>> model.fit(x, y, batch_size=32, epochs=30, callbacks=[seesaw])
    """

    def __init__(
        self,
        boundaries: Sequence[int],
        decay: float = 0.5,
        max_steps: int | None = None,
        learning_rate_rule: Literal["sqrt", "linear"] | None = "sqrt",
        transfer_beta_2: bool = True,
        transfer_beta_1: bool = False,
        transfer_weight_decay: bool = True,
        log_dir: str | os.PathLike | None = None,
        verbose: int = 0,
    ) -> None:
        try:
            boundaries = list(boundaries)
        except TypeError:
            raise ValueError(
                "`boundaries` must be a sequence of samples seen (ints > 0) "
                "at which a step decay would cut the learning rate (not a "
                f"schedule object). Received: boundaries={boundaries!r}"
            ) from None
        if not boundaries:
            raise ValueError(
                "`boundaries` must hold at least one number of samples. "
                "Received: boundaries=[]"
            )
        checked = [validation.check_int("boundaries", b, 1) for b in boundaries]
        if any(b >= a for b, a in zip(checked, checked[1:])):
            raise ValueError(
                "`boundaries` must increase strictly. Received: "
                f"boundaries={boundaries}"
            )
        decay = validation.check_float(
            "decay", decay, 0, 1, open_min=True, open_max=True
        )
        growth = round(1 / decay)
        if abs(growth - 1 / decay) > 1e-9:
            raise ValueError(
                "`decay` must be 1/n for an integer n >= 2 (the batch grows "
                f"by 1 / decay micro-batches' worth). Received: decay={decay}"
            )
        if max_steps is not None:
            max_steps = validation.check_int("max_steps", max_steps, 1)
        self.boundaries = checked
        self.decay = decay
        self.max_steps = max_steps
        self._growth = growth
        super().__init__(
            self._steps_after,
            learning_rate_rule=learning_rate_rule,
            transfer_beta_2=transfer_beta_2,
            transfer_beta_1=transfer_beta_1,
            transfer_weight_decay=transfer_weight_decay,
            log_dir=log_dir,
            verbose=verbose,
        )

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        limit = self._optimizer.max_accumulation_steps
        if self.max_steps is not None and self.max_steps > limit:
            raise ValueError(
                f"Seesaw(max_steps={self.max_steps}) exceeds the optimizer's "
                f"max_accumulation_steps={limit}: create the optimizer with "
                f"max_accumulation_steps={self.max_steps}."
            )
        self._cap = self.max_steps or limit

    def _decays(self, samples_seen):
        return sum(samples_seen >= b for b in self.boundaries)

    def _steps_after(self, samples_seen):
        base = self._optimizer.initial_accumulation_steps
        steps = base * self._growth ** self._decays(samples_seen)
        return int(min(steps, max(self._cap, base)))

    def _target(self, samples_seen):
        return (
            self._steps_after(samples_seen),
            self.decay ** self._decays(samples_seen),
        )


def _check_steps(steps):
    try:
        pairs = [(samples, k) for samples, k in steps]
    except (TypeError, ValueError):
        raise ValueError(
            "`steps` must be a list of (samples_seen, accumulation_steps) "
            f"pairs or a callable. Received: steps={steps!r}"
        ) from None
    if not pairs or pairs[0][0] != 0:
        raise ValueError(
            "`steps` must start with a pair at 0 samples seen, e.g. "
            f"[(0, 1), (10000, 4)]. Received: steps={steps!r}"
        )
    checked = []
    for samples, k in pairs:
        samples = validation.check_int("steps: samples_seen", samples, 0)
        k = validation.check_int("steps: accumulation_steps", k, 1)
        if checked and samples <= checked[-1][0]:
            raise ValueError(
                "`steps` must have strictly increasing samples_seen. "
                f"Received: steps={steps!r}"
            )
        checked.append((samples, k))
    return checked
