"""Adam: large-batch ("macro") or with the second moment formed from
micro-batch statistics ("micro")."""

import math
from typing import Any

from keras import ops

from keras_gradtools import transforms
from keras_gradtools import validation
from keras_gradtools.backends import private_api
from keras_gradtools.optimizers.base import SECOND_MOMENT_MODES
from keras_gradtools.optimizers.base import GradientPipelineOptimizer
from keras_gradtools.pipeline import arguments
from keras_gradtools.registration import register
from keras_gradtools.types import LearningRate
from keras_gradtools.types import SecondMoment

# The moments whose decay may follow K (`set_hyperparameter_transfer`).
TRANSFER_SWITCHES = ("beta_1", "beta_2")


@register
class Adam(GradientPipelineOptimizer):
    """Adam (Kingma and Ba, 2014) with accumulation, clipping and noise.

    With `accumulation_steps=1` and no noise this is exactly
    `keras.optimizers.Adam`. With `K = accumulation_steps > 1`, `g` the
    clipped, noised mean gradient of a cycle and `t` the update number:

    ```
    m = beta_1 * m + (1 - beta_1) * g                 bias: 1 - beta_1**t
    second_moment="macro":  (large-batch Adam)
        v = beta_2 * v + (1 - beta_2) * g**2          bias: 1 - beta_2**t
    second_moment="micro":  (the K micro-batches advance v by K steps)
        W = c**2 * (S / K - g_bar**2)                 within-update variance
        v = beta_2**K * v + (1 - beta_2**K) * (g**2 + W)
                                                      bias: 1 - beta_2**(K*t)
    w = w - lr * m_hat / (sqrt(v_hat) + epsilon)
    ```

    When K changes during training (`BatchSizeSchedule`, `Seesaw`,
    `AdaptiveAccumulation`), the moments' decay may follow it, as optimizer
    state (`set_hyperparameter_transfer`): with the switch for `beta_2` on,
    "macro" decays v by `beta_2**(K / K0)` per update (K0: the
    `accumulation_steps` the optimizer was created with), keeping the
    second moment's half-life fixed in samples (Marek et al., 2025);
    "micro" does so already (`beta_2**K`). The switch for `beta_1` does the
    same for m. Bias corrections then use `beta**(micro-batches / K0)`.
    With `max_accumulation_steps > 1` the optimizer also keeps a
    `weight_decay_factor` (1 unless a policy moves it with K).

    "macro" (the default) equals Adam on the large batch of K
    micro-batches, and Keras's own `gradient_accumulation_steps`. "micro"
    keeps the second moment on the scale of a single micro-batch's squared
    gradient, as unaccumulated Adam at the micro-batch size would see it,
    at the cost of one more float32 slot per parameter (the sum of squares
    S). Measured (`benchmarks/outcomes.py`, docs/outcomes.md), "micro"
    ties "macro" at each mode's tuned learning rate on digits and padded
    sequences and is behind on a character-level language model, is worse
    at the learning rate tuned for K = 1, and is more forgiving of a
    learning rate that is too high.

    Args:
        learning_rate: A float, a `LearningRateSchedule` (evaluated on
            updates) or a callable. Defaults to 0.001.
        beta_1: Float in [0, 1), defaults to 0.9.
        beta_2: Float in [0, 1), defaults to 0.999.
        epsilon: Float >= 0, defaults to 1e-7.
        amsgrad: Boolean, defaults to `False`. Use the maximum of past
            second moments (Reddi et al., 2018).
        second_moment: `"macro"` (default) or `"micro"`, see above. Both are
            identical when `accumulation_steps=1`. Files saved with either
            keep it (it is in the config).
        {{pipeline_keyword_args}}
        **kwargs: `keras.optimizers.Optimizer` arguments (`clipnorm`,
            `clipvalue`, `global_clipnorm`, `weight_decay`, `use_ema`, ...).

    Example:

    >>> opt = keras_gradtools.Adam(1e-3, accumulation_steps=8,
    ...                            noise_eta=0.01, global_clipnorm=1.0)
    >>> model.compile(optimizer=opt, loss="sparse_categorical_crossentropy")
    """

    def __init__(
        self,
        learning_rate: LearningRate = 0.001,
        beta_1: float = 0.9,
        beta_2: float = 0.999,
        epsilon: float = 1e-7,
        amsgrad: bool = False,
        second_moment: SecondMoment = "macro",
        name: str | None = None,
        **kwargs: Any,
    ) -> None:
        beta_1 = validation.check_float("beta_1", beta_1, 0, 1, open_max=True)
        beta_2 = validation.check_float("beta_2", beta_2, 0, 1, open_max=True)
        epsilon = validation.check_float("epsilon", epsilon, minimum=0)
        second_moment = validation.check_choice(
            "second_moment", second_moment, SECOND_MOMENT_MODES
        )
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        self.beta_1 = beta_1
        self.beta_2 = beta_2
        self.epsilon = epsilon
        self.amsgrad = bool(amsgrad)
        self.second_moment = second_moment
        # Set by `build` when K may change (max_accumulation_steps > 1).
        object.__setattr__(self, "_transfer_switches", None)
        object.__setattr__(self, "_weight_decay_factor", None)
        object.__setattr__(self, "_loading_unbuilt_state", False)

    @property
    def _reads_micro_variance(self):
        return self.second_moment == "micro" and self.max_accumulation_steps > 1

    def _layout_settings(self):
        settings = super()._layout_settings()
        settings.update(second_moment=self.second_moment, amsgrad=self.amsgrad)
        if (
            self.built
            and self._transfer_switches is not None
            and not getattr(self, "_loading_unbuilt_state", False)
        ):
            # Absent from files written before the switches existed (and
            # from unbuilt state, which holds none): they load with the
            # switches off (`_variables_in`).
            settings["hyperparameter_transfer"] = True
        return settings

    def _load_unbuilt_state(self, saved, arrays):
        # State saved before `build` holds Keras's variables only, and no
        # switches, also when it loads into a built optimizer.
        object.__setattr__(self, "_loading_unbuilt_state", True)
        try:
            super()._load_unbuilt_state(saved, arrays)
        finally:
            object.__setattr__(self, "_loading_unbuilt_state", False)

    # ------------------------------------------------------------------
    # Hyperparameters that follow K (state: saved, restored, the same on
    # every replica, read by the compiled update).

    @property
    def hyperparameter_transfer(self) -> dict[str, bool]:
        """Which of `beta_1` and `beta_2` follow K: `{"beta_1": bool,
        "beta_2": bool}` (all `False` until set, or when
        `max_accumulation_steps` is 1)."""
        switches = self._transfer_switches
        return {
            name: bool(
                switches is not None
                and float(ops.convert_to_numpy(switches[name])) > 0
            )
            for name in TRANSFER_SWITCHES
        }

    def set_hyperparameter_transfer(
        self, beta_1: bool | None = None, beta_2: bool | None = None
    ) -> None:
        """Switches the moments' decay following K on or off.

        With a switch on, the moment decays by `beta**(K / K0)` per update
        of K micro-batches (K0: the `accumulation_steps` the optimizer was
        created with): a half-life fixed in samples, not in updates
        (Marek et al., 2025, for `beta_2`). Switch them on before K moves
        from K0 (the policies do so at the start of `fit`): the bias
        correction counts micro-batches from the start.

        Args:
            beta_1: Bool, or `None` to leave it as it is.
            beta_2: Bool, or `None` to leave it as it is. Only "macro"
                reads it: "micro" already decays v per micro-batch.

        Raises:
            ValueError: if the optimizer is not built or was created with
                `max_accumulation_steps=1` (K cannot change).
        """
        self._require_transfer_state("set_hyperparameter_transfer()")
        for name, value in (("beta_1", beta_1), ("beta_2", beta_2)):
            if value is not None:
                self._transfer_switches[name].assign(float(bool(value)))

    @property
    def weight_decay_factor(self) -> float:
        """What the update multiplies `weight_decay` by: 1 unless a policy
        moves it with K (keeping AdamW's timescale B / (lr * weight_decay)
        constant, Bergsma et al., 2025). Settable during training when
        `max_accumulation_steps > 1`."""
        if self._weight_decay_factor is None:
            return 1.0
        return float(ops.convert_to_numpy(self._weight_decay_factor))

    @weight_decay_factor.setter
    def weight_decay_factor(self, factor: float) -> None:
        factor = validation.check_float(
            "weight_decay_factor", factor, minimum=0.0
        )
        self._require_transfer_state("weight_decay_factor")
        self._weight_decay_factor.assign(factor)

    @property
    def effective_beta_1(self) -> float:
        """The first moment's decay per update at the current K."""
        return self._effective_beta(self.beta_1, "beta_1")

    @property
    def effective_beta_2(self) -> float:
        """The second moment's decay per update at the current K:
        `beta_2**K` for "micro", `beta_2**(K / K0)` for "macro" with the
        switch on, else `beta_2`."""
        if self._reads_micro_variance:
            return self.beta_2**self.accumulation_steps
        return self._effective_beta(self.beta_2, "beta_2")

    @property
    def effective_weight_decay(self) -> float:
        """`weight_decay * weight_decay_factor` (0 without weight decay)."""
        return float(self.weight_decay or 0.0) * self.weight_decay_factor

    def _effective_beta(self, beta, name):
        if not self.hyperparameter_transfer[name]:
            return float(beta)
        ratio = self.accumulation_steps / self.initial_accumulation_steps
        return float(beta) ** ratio

    def _require_transfer_state(self, what):
        validation.require_built(self, what)
        if self._transfer_switches is None:
            raise ValueError(
                f"`{what}` needs an optimizer created with "
                "max_accumulation_steps > 1 (K cannot change otherwise)."
            )

    def _decay_terms(self, beta, name, steps, dtype):
        """`(1 - beta_eff, bias_steps)` of one moment: `1 - beta` and
        `steps` with the switch off; with it on, `1 - beta**(K / K0)`
        (as `-expm1`, exact to float32 rounding) and micro-batches / K0."""
        switches = self._transfer_switches
        if switches is None:
            return 1 - beta, steps
        one_minus = ops.cast(1 - beta, dtype)
        update = self.current_update
        base = float(update.initial_steps)
        ratio = ops.divide(ops.cast(update.cycle_steps, dtype), base)
        log_beta = math.log(beta) if beta > 0 else -math.inf
        on = ops.greater(ops.convert_to_tensor(switches[name]), 0)
        moved = ops.negative(ops.expm1(ops.multiply(ratio, log_beta)))
        samples = ops.divide(ops.cast(update.micro_steps + 1, dtype), base)
        return ops.where(on, moved, one_minus), ops.where(on, samples, steps)

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        self._momentums, self._velocities = self.add_optimizer_variables(
            variables, ["momentum", "velocity"]
        )
        if self.amsgrad:
            self._velocity_hats = self.add_optimizer_variables(
                variables, "velocity_hat"
            )
        if self.max_accumulation_steps > 1:
            # Made like the pipeline's state: placed in the saved layout by
            # their role, the same on every replica under a strategy.
            make_state = self.pipeline.hooks.make_state
            object.__setattr__(
                self,
                "_transfer_switches",
                {
                    name: make_state(f"{name}_transfer")
                    for name in TRANSFER_SWITCHES
                },
            )
            object.__setattr__(
                self,
                "_weight_decay_factor",
                make_state(
                    "weight_decay_factor",
                    role="weight_decay_transfer",
                    initial=1.0,
                ),
            )

    def _weight_decay_factor_variable(self):
        return self._weight_decay_factor

    def _step_scalars(self, learning_rate, dtype, micro):
        """`(alpha, 1 - beta_1_eff, 1 - beta_2_eff)` of this update (the
        same for every variable of `dtype`); `micro`: whether the second
        moment is formed from the micro-batches' variance."""
        update = self.current_update
        lr = ops.cast(learning_rate, dtype)
        local_step = ops.cast(update.iterations + 1, dtype)
        if micro:
            # The cycle's K micro-batches advance v by K steps; over all
            # updates so far, by every micro-batch seen (K may change).
            beta_2 = ops.power(
                ops.cast(self.beta_2, dtype),
                ops.cast(update.cycle_steps, dtype),
            )
            one_minus_beta_2 = 1 - beta_2
            second_moment_steps = ops.cast(update.micro_steps + 1, dtype)
        else:
            # A Python float, as in Keras: `1 - beta_2` then rounds once.
            one_minus_beta_2, second_moment_steps = self._decay_terms(
                self.beta_2, "beta_2", local_step, dtype
            )
        one_minus_beta_1, first_moment_steps = self._decay_terms(
            self.beta_1, "beta_1", local_step, dtype
        )
        beta_1_power = ops.power(
            ops.cast(self.beta_1, dtype), first_moment_steps
        )
        beta_2_power = ops.power(
            ops.cast(self.beta_2, dtype), second_moment_steps
        )
        alpha = lr * ops.sqrt(1 - beta_2_power) / (1 - beta_1_power)
        return alpha, one_minus_beta_1, one_minus_beta_2

    def update_step(
        self, gradient, variable, learning_rate, micro_batch_variance=None
    ):
        index = private_api.variable_index(self, variable)
        m = self._momentums[index]
        v = self._velocities[index]
        # The moments' dtype: float32 for a narrower variable (see
        # `add_variable_from_reference`), whose step is cast at the end.
        dtype = m.dtype
        gradient = ops.cast(gradient, dtype)
        alpha, one_minus_beta_1, one_minus_beta_2 = self.once_per_update(
            ("adam", str(dtype)),
            lambda: self._step_scalars(
                learning_rate, dtype, micro_batch_variance is not None
            ),
        )

        if micro_batch_variance is None:
            second = ops.square(gradient)
        else:
            second = transforms.micro_second_moment_input(
                gradient, ops.cast(micro_batch_variance, dtype)
            )
        # Written as Keras writes it: assign the moments, then read them
        # back. Computing the step from the new values as tensors instead
        # makes XLA copy both moments first (measured 2x slower).
        self.assign_add(
            m, ops.multiply(ops.subtract(gradient, m), one_minus_beta_1)
        )
        self.assign_add(
            v, ops.multiply(ops.subtract(second, v), one_minus_beta_2)
        )
        if self.amsgrad:
            v_hat = self._velocity_hats[index]
            self.assign(v_hat, ops.maximum(v_hat, v))
            v = v_hat
        self.assign_sub(
            variable,
            ops.cast(
                ops.divide(
                    ops.multiply(m, alpha), ops.add(ops.sqrt(v), self.epsilon)
                ),
                variable.dtype,
            ),
        )

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "beta_1": self.beta_1,
                "beta_2": self.beta_2,
                "epsilon": self.epsilon,
                "amsgrad": self.amsgrad,
                "second_moment": self.second_moment,
            }
        )
        return config


arguments.declare_arguments(Adam)
