"""Gives any Keras optimizer the gradient pipeline ("macro" semantics)."""

from typing import Any

from keras import optimizers
from keras import saving

from keras_gradtools.backends import private_api
from keras_gradtools.optimizers.base import GradientPipelineOptimizer
from keras_gradtools.pipeline import arguments
from keras_gradtools.registration import register

_INNER_SETTINGS_WE_OWN = (
    "clipnorm",
    "clipvalue",
    "global_clipnorm",
    "gradient_accumulation_steps",
)


@register
class GradientPipelineWrapper(GradientPipelineOptimizer):
    """Wraps a Keras optimizer with accumulation, clipping and noise.

    The wrapper holds the inner optimizer the way
    `keras.optimizers.LossScaleOptimizer` does: it accumulates the
    micro-batch gradients, clips their mean, adds noise, and hands the
    result to the inner optimizer's public `apply` once per update. The
    inner rule therefore sees the large-batch gradient ("macro" semantics).
    Use `keras_gradtools.wrap(...)` to create one.

    Args:
        inner_optimizer: A `keras.optimizers.Optimizer` (or its string
            name) without clipping or gradient accumulation of its own.
        clipnorm, clipvalue, global_clipnorm: Optional floats > 0, applied
            to the mean gradient at update time (at most one of them).
        {{pipeline_keyword_args}}

    Example:

    >>> opt = keras_gradtools.wrap(keras.optimizers.Lion(1e-4),
    ...                            accumulation_steps=4, noise_eta=1e-3)
    """

    def __init__(
        self,
        inner_optimizer: optimizers.Optimizer | str,
        name: str | None = None,
        **kwargs: Any,
    ) -> None:
        pipeline_arguments = arguments.split_arguments(kwargs)
        for argument in arguments.CLIP_ARGUMENTS:
            if argument.name in kwargs:
                pipeline_arguments[argument.name] = kwargs.pop(argument.name)
        _refuse_inner_arguments(kwargs)
        inner_optimizer = _check_inner(inner_optimizer)
        super().__init__(
            # The inner optimizer owns the learning rate (see the property).
            learning_rate=_no_learning_rate,
            loss_scale_factor=inner_optimizer.loss_scale_factor,
            name=name,
            **pipeline_arguments,
        )
        self.inner_optimizer = inner_optimizer
        # The wrapper unscales the loss before accumulating; the inner
        # optimizer must not do it a second time.
        self.inner_optimizer.loss_scale_factor = None
        # The wrapper saves and restores the inner optimizer's state with
        # its own (checked against the saved layout, restored after `build`
        # when loaded first): Keras's file format would otherwise visit the
        # inner optimizer on its own, store it twice and warn when loading
        # it unbuilt.
        for method in ("save_own_variables", "load_own_variables"):
            object.__setattr__(inner_optimizer, method, _state_kept_by_wrapper)

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        self.inner_optimizer.build(variables)

    def _keras_variables(self):
        return super()._keras_variables() + private_api.keras_variables(
            self.inner_optimizer
        )

    @property
    def variables(self):
        return super().variables + self.inner_optimizer.variables

    @property
    def learning_rate(self):
        return self.inner_optimizer.learning_rate

    @learning_rate.setter
    def learning_rate(self, learning_rate):
        self.inner_optimizer.learning_rate = learning_rate

    @property
    def learning_rate_factor(self) -> float:
        """Always 1: the inner optimizer owns its learning rate."""
        return 1.0

    @learning_rate_factor.setter
    def learning_rate_factor(self, factor: float) -> None:
        raise ValueError(
            "A wrapped optimizer keeps its own learning rate: set "
            "`wrapper.learning_rate` (the inner optimizer's) instead of "
            "`learning_rate_factor`."
        )

    def _learning_rate_owner(self):
        return self.inner_optimizer

    def _apply_rule(self, update):
        # The inner optimizer writes its variables directly, so a skipped
        # update must not run at all: a branch, not gated writes. Its
        # learning rate is its own (`learning_rate_factor` is always 1).
        def apply():
            update.placement.apply_inner(
                self.inner_optimizer.apply, update.gradients, update.variables
            )

        if update.gate is None:
            apply()
        else:
            self.pipeline.backend.run_if(update.gate, apply, update.state)

    def _layout(self):
        described = super()._layout()
        described["class"] += f"({type(self.inner_optimizer).__name__})"
        return described

    def exclude_from_weight_decay(self, var_list=None, var_names=None):
        """Exempts variables from the inner optimizer's weight decay (the
        wrapper has none of its own).

        Args:
            var_list: A list of variables to exempt.
            var_names: A list of strings; variables whose name contains one
                of them are exempt.
        """
        self.inner_optimizer.exclude_from_weight_decay(
            var_list=var_list, var_names=var_names
        )

    def finalize_variable_values(self, var_list):
        self.inner_optimizer.finalize_variable_values(var_list)
        self.report_skipped_micro_batches("During this fit")

    def get_config(self):
        return {
            "name": self.name,
            "inner_optimizer": saving.serialize_keras_object(
                self.inner_optimizer
            ),
            **self.pipeline.settings.config(),
            "clipnorm": self.clipnorm,
            "clipvalue": self.clipvalue,
            "global_clipnorm": self.global_clipnorm,
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        inner = saving.deserialize_keras_object(
            config.pop("inner_optimizer"), custom_objects=custom_objects
        )
        return cls(inner, **config)


arguments.declare_arguments(
    GradientPipelineWrapper,
    arguments.PIPELINE_ARGUMENTS + arguments.CLIP_ARGUMENTS,
)


def _no_learning_rate():
    return 0.0


def _state_kept_by_wrapper(store):
    """The inner optimizer's own save/load: a no-op (see the wrapper)."""
    del store


def wrap(
    optimizer: optimizers.Optimizer | str, **kwargs: Any
) -> GradientPipelineWrapper:
    """Gives any Keras optimizer accumulation, clipping, noise and statistics.

    Args:
        optimizer: A `keras.optimizers.Optimizer` instance or a name that
            `keras.optimizers.get` understands (e.g. `"lion"`).
        **kwargs: The arguments of `GradientPipelineWrapper`: the
            pipeline's (`keras_gradtools.pipeline.arguments`, documented
            on `keras_gradtools.SGD`), `clipnorm`, `clipvalue`,
            `global_clipnorm` and `name`. The update rule's own arguments
            (`learning_rate`, `weight_decay`, ...) go to the inner
            optimizer.

    Returns:
        A `GradientPipelineWrapper` around `optimizer`.

    Example:

    >>> opt = keras_gradtools.wrap(keras.optimizers.RMSprop(1e-3),
    ...                            accumulation_steps=4, global_clipnorm=1.0)
    >>> model.compile(optimizer=opt, loss="mse")
    """
    return GradientPipelineWrapper(optimizer, **kwargs)


# `keras.optimizers.Optimizer` arguments that belong to the rule, so to the
# inner optimizer.
_INNER_ARGUMENTS = (
    "learning_rate",
    "weight_decay",
    "use_ema",
    "ema_momentum",
    "ema_overwrite_frequency",
    "loss_scale_factor",
)


def _refuse_inner_arguments(kwargs):
    """Raises a `TypeError` that says where an argument goes."""
    if not kwargs:
        return
    inner = sorted(k for k in kwargs if k in _INNER_ARGUMENTS)
    if inner:
        settings = ", ".join(f"{k}={kwargs[k]!r}" for k in inner)
        raise TypeError(
            f"`{'`, `'.join(inner)}` belong(s) to the inner optimizer, which "
            "owns the update rule: set it there, e.g. "
            f"keras_gradtools.wrap(keras.optimizers.AdamW({settings}), ...). "
            "The wrapper takes the pipeline's arguments only."
        )
    accepted = [
        a.name for a in arguments.PIPELINE_ARGUMENTS + arguments.CLIP_ARGUMENTS
    ]
    raise TypeError(
        "GradientPipelineWrapper got unexpected keyword argument(s) "
        f"{sorted(kwargs)}. It takes the inner optimizer and the pipeline's "
        f"arguments: {', '.join(accepted + ['name'])}."
    )


def _check_inner(inner_optimizer):
    if isinstance(inner_optimizer, str):
        inner_optimizer = optimizers.get(inner_optimizer)
    if not isinstance(inner_optimizer, optimizers.Optimizer):
        raise ValueError(
            "`inner_optimizer` must be a keras.optimizers.Optimizer or its "
            f"name. Received: inner_optimizer={inner_optimizer!r}"
        )
    if isinstance(inner_optimizer, GradientPipelineOptimizer):
        raise ValueError(
            "`inner_optimizer` already runs the keras_gradtools pipeline: "
            "set accumulation, noise and clipping on it directly instead of "
            f"wrapping it. Received: {type(inner_optimizer).__name__}"
        )
    if isinstance(inner_optimizer, optimizers.LossScaleOptimizer):
        raise ValueError(
            "Wrap the optimizer first, then let Keras (or you) put the "
            "LossScaleOptimizer around the wrapper: "
            "LossScaleOptimizer(keras_gradtools.wrap(opt))."
        )
    for setting in _INNER_SETTINGS_WE_OWN:
        if getattr(inner_optimizer, setting, None):
            raise ValueError(
                f"The inner optimizer sets `{setting}`, which the wrapper "
                f"owns: pass `{setting}` to `keras_gradtools.wrap` instead "
                "and leave it unset on the inner optimizer. Received: "
                f"{setting}={getattr(inner_optimizer, setting)!r}"
            )
    return inner_optimizer
