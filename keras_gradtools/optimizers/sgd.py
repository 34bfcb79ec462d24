"""Stochastic gradient descent with momentum, behind the gradient pipeline."""

from typing import Any

from keras import ops

from keras_gradtools import validation
from keras_gradtools.backends import private_api
from keras_gradtools.optimizers.base import GradientPipelineOptimizer
from keras_gradtools.pipeline import arguments
from keras_gradtools.registration import register
from keras_gradtools.types import LearningRate


@register
class SGD(GradientPipelineOptimizer):
    """Gradient descent (with momentum) with accumulation, clipping, noise.

    With `accumulation_steps=1` and no noise this is exactly
    `keras.optimizers.SGD`. The update rule, with `g` the clipped, noised
    mean gradient of the cycle:

    ```
    velocity = momentum * velocity - learning_rate * g
    w = w + velocity                                    # nesterov=False
    w = w + momentum * velocity - learning_rate * g     # nesterov=True
    ```

    Args:
        learning_rate: A float, a `LearningRateSchedule` (evaluated on
            updates, not micro-batches) or a callable. Defaults to 0.01.
        momentum: Float in [0, 1], defaults to 0.
        nesterov: Boolean, defaults to `False`.
        {{pipeline_keyword_args}}
        **kwargs: `keras.optimizers.Optimizer` arguments (`clipnorm`,
            `clipvalue`, `global_clipnorm`, `weight_decay`, `use_ema`, ...).

    Example:

    >>> opt = keras_gradtools.SGD(0.1, momentum=0.9, accumulation_steps=4)
    >>> model.compile(optimizer=opt, loss="mse")
    """

    def __init__(
        self,
        learning_rate: LearningRate = 0.01,
        momentum: float = 0.0,
        nesterov: bool = False,
        name: str | None = None,
        **kwargs: Any,
    ) -> None:
        momentum = validation.check_float("momentum", momentum, 0, 1)
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        self.momentum = momentum
        self.nesterov = bool(nesterov)

    def _layout_settings(self):
        settings = super()._layout_settings()
        settings["momentum_slot"] = self.momentum != 0
        return settings

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        self.momentums = []
        if self.momentum != 0:
            self.momentums = self.add_optimizer_variables(variables, "momentum")

    def update_step(
        self, gradient, variable, learning_rate, micro_batch_variance=None
    ):
        if self.momentum == 0:
            learning_rate = ops.cast(learning_rate, variable.dtype)
            gradient = ops.cast(gradient, variable.dtype)
            self.assign_sub(variable, ops.multiply(gradient, learning_rate))
            return
        m = self.momentums[private_api.variable_index(self, variable)]
        # The momentum's dtype: float32 for a narrower variable (see
        # `add_variable_from_reference`), whose step is cast at the end.
        dtype = m.dtype
        learning_rate = ops.cast(learning_rate, dtype)
        step = ops.multiply(ops.cast(gradient, dtype), learning_rate)
        momentum = ops.cast(self.momentum, dtype)
        self.assign(m, ops.subtract(ops.multiply(m, momentum), step))
        if self.nesterov:
            change = ops.subtract(ops.multiply(m, momentum), step)
        else:
            change = m
        self.assign_add(variable, ops.cast(change, variable.dtype))

    def get_config(self):
        config = super().get_config()
        config.update({"momentum": self.momentum, "nesterov": self.nesterov})
        return config


arguments.declare_arguments(SGD)
