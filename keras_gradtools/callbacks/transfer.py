"""One transfer rule for every batch-size policy: what moves with K.

When a policy (`BatchSizeSchedule`, `Seesaw`, `AdaptiveAccumulation`)
changes the number of accumulated micro-batches from K0 (the
`accumulation_steps` the optimizer was created with, for which its
hyperparameters are taken as tuned) to K, the effective batch changes by
K / K0, and with it:

- the learning rate, by a factor (`learning_rate_rule`): `"sqrt"`,
  `"linear"`, `"adascale"` or `None` (`learning_rate_factor` below);
- Adam's second-moment decay, so that its half-life stays fixed in samples
  (Marek et al., 2025): beta_2 -> beta_2**(K / K0) per update ("macro";
  "micro" decays per micro-batch already). Optionally the first moment's;
- the weight decay, so that AdamW's timescale tau = B / (lr * lambda * D)
  stays constant (Bergsma et al., 2025, "Power Lines"): lambda -> lambda *
  (K / K0) / f, f the learning-rate factor of the rule.

All of it is optimizer state (K, `learning_rate_factor`,
`weight_decay_factor`, the switches of `set_hyperparameter_transfer`), read
by the compiled update: saved, restored, the same on every replica.
"""

import math
from typing import Any
from typing import Literal

import keras

from keras_gradtools import validation

LEARNING_RATE_RULES = ("sqrt", "linear", "adascale", None)


def learning_rate_factor(
    rule: str | None,
    steps: int,
    base_steps: int,
    variance: float,
    mean_norm_sq: float,
) -> float:
    """The factor on the learning rate at K micro-batches, relative to the
    K it was tuned for (`base_steps`).

    - `"linear"`: K / K0 (Goyal et al., 2017).
    - `"sqrt"`: sqrt(K / K0) (Krizhevsky, 2014; Hoffer et al., 2017).
    - `"adascale"`: the gain ratio of Johnson et al. (2020),
      r = (tr Σ / K0 + |E g|²) / (tr Σ / K + |E g|²), with tr Σ the variance of
      one micro-batch gradient: 1 while noise is negligible, K / K0 when it
      dominates (`variance`, `mean_norm_sq`: NaN gives 1).
    - `None`: 1.

    Args:
        rule: One of `LEARNING_RATE_RULES`.
        steps: K.
        base_steps: K0.
        variance: tr Σ of one micro-batch gradient (`"adascale"` only).
        mean_norm_sq: |E g|² (`"adascale"` only).

    Returns:
        The factor, a float.

    Example:

    >>> learning_rate_factor("sqrt", 8, 2, float("nan"), float("nan"))
    2.0
    """
    scale = steps / base_steps
    if rule is None:
        return 1.0
    if rule == "linear":
        return scale
    if rule == "sqrt":
        return math.sqrt(scale)
    signal = max(mean_norm_sq, 0.0)
    if not (math.isfinite(variance) and math.isfinite(signal)):
        return 1.0
    numerator = variance / base_steps + signal
    denominator = variance / steps + signal
    if denominator <= 0:
        return 1.0
    return float(min(max(numerator / denominator, 1.0), scale))


def weight_decay_factor(
    steps: int, base_steps: int, rate_factor: float
) -> float:
    """The factor on the weight decay that keeps AdamW's timescale
    tau = B / (lr * lambda) constant when the batch moves by K / K0 and the
    learning rate by `rate_factor` (Bergsma et al., 2025).

    Args:
        steps: K.
        base_steps: K0.
        rate_factor: The learning-rate factor of the rule at K.

    Returns:
        (K / K0) / rate_factor.

    Example:

    >>> weight_decay_factor(8, 2, 2.0)  # sqrt rule: lr x 2, batch x 4
    2.0
    """
    return (steps / base_steps) / rate_factor


def ensure_built(model: keras.Model, optimizer: Any) -> None:
    """Builds `optimizer` for `model` if Keras has not yet (TensorFlow
    without a strategy builds it in the first step): K0, the switches and
    state restored by `BackupAndRestore` are then in place before the first
    cycle. A model without its variables yet is left to its first step."""
    if not optimizer.built and model.built:
        with keras.name_scope(optimizer.name, caller=optimizer):
            optimizer.build(model.trainable_variables)


class HyperparameterTransfer:
    """What moves with K, shared by every batch-size policy.

    Args:
        learning_rate_rule: `"sqrt"`, `"linear"`, `"adascale"` or `None`.
        beta_2: Bool: Adam's second moment keeps its half-life in samples
            (beta_2**(K / K0) per update; Marek et al., 2025).
        beta_1: Bool: the same for the first moment.
        weight_decay: Bool: the weight decay keeps B / (lr * lambda)
            constant (Bergsma et al., 2025).

    Example:

    >>> rule = HyperparameterTransfer("sqrt")
    >>> rule.apply(optimizer, 8)  # K = 8: lr x sqrt(8 / K0), ...
    """

    def __init__(
        self,
        learning_rate_rule: Literal["sqrt", "linear", "adascale"]
        | None = "sqrt",
        beta_2: bool = True,
        beta_1: bool = False,
        weight_decay: bool = True,
    ) -> None:
        self.learning_rate_rule = validation.check_choice(
            "learning_rate_rule", learning_rate_rule, LEARNING_RATE_RULES
        )
        self.beta_2 = bool(beta_2)
        self.beta_1 = bool(beta_1)
        self.weight_decay = bool(weight_decay)

    def check(self, optimizer: Any, who: str) -> None:
        """Raises a `ValueError` for what `optimizer` cannot move."""
        if self.learning_rate_rule is not None and hasattr(
            optimizer, "inner_optimizer"
        ):
            raise ValueError(
                "A wrapped optimizer keeps its own learning rate: use "
                f"{who}(learning_rate_rule=None) with wrap(...)."
            )
        supports = hasattr(optimizer, "set_hyperparameter_transfer")
        if self.weight_decay and optimizer.weight_decay and not supports:
            raise ValueError(
                f"{who}(transfer_weight_decay=True) moves the weight decay "
                "of Adam and AdamW only; "
                f"{type(optimizer).__name__} has weight_decay="
                f"{optimizer.weight_decay}: pass "
                "transfer_weight_decay=False."
            )
        if self.beta_1 and not supports:
            raise ValueError(
                f"{who}(transfer_beta_1=True) needs Adam or AdamW, not "
                f"{type(optimizer).__name__}."
            )

    def switch_on(self, optimizer: Any) -> None:
        """Sets the optimizer's switches (state) at the start of `fit`."""
        if (
            hasattr(optimizer, "set_hyperparameter_transfer")
            and optimizer.max_accumulation_steps > 1
            and optimizer.built
        ):
            optimizer.set_hyperparameter_transfer(
                beta_1=self.beta_1, beta_2=self.beta_2
            )

    def apply(
        self,
        optimizer: Any,
        steps: int,
        schedule_factor: float = 1.0,
        variance: float = float("nan"),
        mean_norm_sq: float = float("nan"),
    ) -> float:
        """Sets K and what follows it.

        Args:
            optimizer: The keras_gradtools optimizer.
            steps: The new K.
            schedule_factor: A factor of the policy's own on the learning
                rate (Seesaw's step decay), on top of the rule's; the
                weight decay does not follow it.
            variance, mean_norm_sq: The running statistics (`"adascale"`).

        Returns:
            The learning-rate factor of the rule (without
            `schedule_factor`).
        """
        base = optimizer.initial_accumulation_steps
        if optimizer.accumulation_steps != steps:
            optimizer.accumulation_steps = steps
        factor = learning_rate_factor(
            self.learning_rate_rule, steps, base, variance, mean_norm_sq
        )
        if self.learning_rate_rule is not None or schedule_factor != 1.0:
            optimizer.learning_rate_factor = factor * schedule_factor
        if (
            self.weight_decay
            and hasattr(optimizer, "weight_decay_factor")
            and optimizer.max_accumulation_steps > 1
        ):
            optimizer.weight_decay_factor = weight_decay_factor(
                steps, base, factor
            )
        return factor
