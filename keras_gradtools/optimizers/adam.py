"""Adam, with the second moment formed from micro-batch statistics."""

from typing import Any

from keras import ops

from keras_gradtools import transforms
from keras_gradtools.optimizers import validation
from keras_gradtools.optimizers.base import SECOND_MOMENT_MODES
from keras_gradtools.optimizers.base import GradientPipelineOptimizer
from keras_gradtools.optimizers.docstrings import pipeline_keyword_args
from keras_gradtools.registration import register
from keras_gradtools.types import LearningRate
from keras_gradtools.types import SecondMoment


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

    "micro" keeps the second moment on the scale of a single micro-batch's
    squared gradient, as unaccumulated Adam at the micro-batch size would
    see it, at the cost of one more float32 slot per parameter (the sum of
    squares S). "macro" equals Adam on the large batch of K micro-batches.

    Args:
        learning_rate: A float, a `LearningRateSchedule` (evaluated on
            updates) or a callable. Defaults to 0.001.
        beta_1: Float in [0, 1), defaults to 0.9.
        beta_2: Float in [0, 1), defaults to 0.999.
        epsilon: Float >= 0, defaults to 1e-7.
        amsgrad: Boolean, defaults to `False`. Use the maximum of past
            second moments (Reddi et al., 2018).
        second_moment: `"micro"` (default) or `"macro"`, see above. Both are
            identical when `accumulation_steps=1`.
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
        second_moment: SecondMoment = "micro",
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

    @property
    def _reads_micro_variance(self):
        return self.second_moment == "micro" and self.max_accumulation_steps > 1

    def _layout_settings(self):
        settings = super()._layout_settings()
        settings.update(second_moment=self.second_moment, amsgrad=self.amsgrad)
        return settings

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

    def update_step(
        self, gradient, variable, learning_rate, micro_batch_variance=None
    ):
        index = self._variable_index(variable)
        m = self._momentums[index]
        v = self._velocities[index]
        # The moments' dtype: float32 for a narrower variable (see
        # `add_variable_from_reference`), whose step is cast at the end.
        dtype = m.dtype
        lr = ops.cast(learning_rate, dtype)
        gradient = ops.cast(gradient, dtype)
        if self._reads_micro_variance:
            # The cycle's K micro-batches advance v by K steps; over all
            # updates so far, by every micro-batch seen (K may change).
            beta_2 = ops.power(
                ops.cast(self.beta_2, dtype),
                ops.cast(self._accumulator.current_cycle_steps(), dtype),
            )
            second_moment_steps = ops.cast(
                self._accumulator.micro_steps + 1, dtype
            )
        else:
            # A Python float, as in Keras: `1 - beta_2` then rounds once.
            beta_2 = self.beta_2
            second_moment_steps = ops.cast(self.iterations + 1, dtype)
        local_step = ops.cast(self.iterations + 1, dtype)
        beta_1_power = ops.power(ops.cast(self.beta_1, dtype), local_step)
        beta_2_power = ops.power(
            ops.cast(self.beta_2, dtype), second_moment_steps
        )
        alpha = lr * ops.sqrt(1 - beta_2_power) / (1 - beta_1_power)

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
            m, ops.multiply(ops.subtract(gradient, m), 1 - self.beta_1)
        )
        self.assign_add(v, ops.multiply(ops.subtract(second, v), 1 - beta_2))
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


Adam.__doc__ = Adam.__doc__.replace(
    "{{pipeline_keyword_args}}", pipeline_keyword_args
)
