"""The base class of the package's optimizers.

A `GradientPipelineOptimizer` is a `keras.optimizers.Optimizer` whose
`apply` hands each micro-batch to its `Pipeline`
(`keras_gradtools.pipeline`), which owns the stages (accumulation, finite
check, clipping, noise, statistics, the gate) and their state. The
optimizer gives the pipeline only the narrow hooks of
`pipeline/hooks.py` (through `PipelineHooks` below) and keeps what Keras
asks of an optimizer: the update rule (`update_step`, in a subclass, run
by the sequence of `rule_sequence.py`), its variables, saving
(`saved_state.py`) and the configuration.

Subclasses implement the update rule in `update_step` exactly as Keras
optimizers do, writing through `self.assign*` so that a skipped update
(a non-finite gradient with K = 1) leaves every variable as it was.
"""

import contextlib
import warnings
from collections.abc import Sequence
from typing import Any

import keras
from keras import backend
from keras import initializers
from keras import ops
from keras import optimizers

from keras_gradtools import backends
from keras_gradtools import micro_batch_counts
from keras_gradtools import transforms
from keras_gradtools import validation
from keras_gradtools.backends import common
from keras_gradtools.backends import private_api
from keras_gradtools.optimizers import gradients
from keras_gradtools.optimizers import saved_state
from keras_gradtools.optimizers.rule_sequence import UpdateRuleSequence
from keras_gradtools.optimizers.saved_state import SavedState
from keras_gradtools.optimizers.statistics_methods import (
    GradientStatisticsMethods,
)
from keras_gradtools.pipeline import arguments
from keras_gradtools.pipeline.pipeline import Pipeline
from keras_gradtools.types import LearningRate
from keras_gradtools.types import TensorLike

SECOND_MOMENT_MODES = ("micro", "macro")


class GradientPipelineOptimizer(
    UpdateRuleSequence,
    SavedState,
    GradientStatisticsMethods,
    optimizers.Optimizer,
):
    """Base class for optimizers that accumulate, clip and add noise.

    A subclass overrides `build` (to create its slots, after calling
    `super().build`), `update_step` and `get_config`, as for any Keras
    optimizer. The pipeline around the update rule is `self.pipeline`.

    Args:
        learning_rate: A float, a
            `keras.optimizers.schedules.LearningRateSchedule` (evaluated on
            the number of updates, not of micro-batches) or a callable.
        {{pipeline_keyword_args}}
        **kwargs: The keyword arguments of `keras.optimizers.Optimizer`
            (`clipnorm`, `clipvalue`, `global_clipnorm`, `weight_decay`,
            `use_ema`, `ema_momentum`, `ema_overwrite_frequency`,
            `loss_scale_factor`, `name`).
    """

    def __init__(self, learning_rate: LearningRate, **kwargs: Any) -> None:
        backends.check_supported()
        learning_rate = validation.check_learning_rate(learning_rate)
        pipeline_arguments = arguments.split_arguments(kwargs)
        for argument in arguments.CLIP_ARGUMENTS:
            pipeline_arguments[argument.name] = kwargs.get(argument.name)
        settings = arguments.PipelineSettings.from_arguments(pipeline_arguments)
        for argument in arguments.CLIP_ARGUMENTS:
            kwargs[argument.name] = getattr(settings, argument.name)
        validation.check_keras_optimizer_arguments(kwargs)
        # Plain attributes, not tracked state (object.__setattr__ bypasses
        # Keras's tracker); set first: Keras's __init__ sets attributes that
        # are our properties.
        object.__setattr__(
            self,
            "_pipeline",
            Pipeline(settings, PipelineHooks(self), backends.current()),
        )
        object.__setattr__(self, "_strategy", None)
        object.__setattr__(self, "_skipped_reported", 0)
        super().__init__(learning_rate=learning_rate, **kwargs)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "build" in cls.__dict__:
            cls.build = saved_state.restoring_pending_state(
                cls.__dict__["build"]
            )

    @property
    def pipeline(self) -> Pipeline:
        """The gradient pipeline: its stages (`accumulator`, `statistics`,
        `clip`, `noise`), their state and `settings`."""
        return self._pipeline

    # ------------------------------------------------------------------
    # Counters and settings.

    @property
    def iterations(self) -> keras.Variable:
        """The number of updates applied (not of micro-batches)."""
        return self._iterations

    @property
    def initial_accumulation_steps(self) -> int:
        """The K this optimizer was configured with (`accumulation_steps`
        at construction, or as set before `build`)."""
        return self._pipeline.settings.accumulation_steps

    @property
    def accumulation_steps(self) -> int:
        """K, the micro-batches per update, as a Python int.

        Settable during training (up to `max_accumulation_steps`, without
        retracing the step): the new K takes effect when the next cycle
        starts. On JAX inside `fit`, call `model.jax_state_sync()` before
        setting it from a callback's batch hook.
        """
        accumulator = self._pipeline.accumulator
        if accumulator is None or not accumulator.accumulates:
            return self.initial_accumulation_steps
        return int(ops.convert_to_numpy(accumulator.steps))

    @accumulation_steps.setter
    def accumulation_steps(self, steps: int) -> None:
        steps = validation.check_int(
            "accumulation_steps", steps, 1, self.max_accumulation_steps
        )
        accumulator = self._pipeline.accumulator
        if accumulator is not None and accumulator.accumulates:
            accumulator.steps.assign(steps)
        else:
            # Before `build`: the K the optimizer is configured with.
            self._pipeline.settings.accumulation_steps = steps

    @property
    def learning_rate_factor(self) -> float:
        """What each update multiplies the learning rate (or its schedule's
        value) by: 1 unless set, e.g. by `AdaptiveAccumulation` when it
        changes the effective batch. Settable during training when
        `max_accumulation_steps > 1`."""
        accumulator = self._pipeline.accumulator
        if accumulator is None or not accumulator.accumulates:
            return 1.0
        return float(ops.convert_to_numpy(accumulator.learning_rate_factor))

    @learning_rate_factor.setter
    def learning_rate_factor(self, factor: float) -> None:
        factor = validation.check_float(
            "learning_rate_factor", factor, minimum=0.0, open_min=True
        )
        validation.require_built(self, "learning_rate_factor")
        accumulator = self._pipeline.accumulator
        if not accumulator.accumulates:
            raise ValueError(
                "`learning_rate_factor` can be set on an optimizer created "
                "with max_accumulation_steps > 1 (the factor follows the "
                "effective batch); set `learning_rate` instead."
            )
        accumulator.learning_rate_factor.assign(factor)

    def _learning_rate_owner(self):
        """The optimizer whose learning-rate setting the rule reads."""
        return self

    @property
    def gradient_accumulation_steps(self) -> int:
        """Keras's name for `accumulation_steps` (readable and settable)."""
        return self.accumulation_steps

    @gradient_accumulation_steps.setter
    def gradient_accumulation_steps(self, steps: int | None) -> None:
        if steps is None:
            # Keras's own __init__ sets its attribute to None; K was set
            # from our arguments.
            return
        self.accumulation_steps = steps

    @property
    def micro_steps(self) -> keras.Variable:
        """Micro-batches seen (calls to `apply`), including skipped ones."""
        validation.require_built(self, "micro_steps")
        return self._pipeline.accumulator.micro_steps

    @property
    def skipped_micro_batches(self) -> keras.Variable:
        """Micro-batches left out because their gradient was not finite.

        Under a strategy, each replica counts its own share of a micro-batch
        (the value read is the sum over replicas).
        """
        validation.require_built(self, "skipped_micro_batches")
        return self._pipeline.accumulator.skipped_micro_batches

    @property
    def noise_std(self) -> float:
        """The standard deviation of the noise the next update adds:
        `sqrt(noise_eta / (1 + t)**noise_gamma)`, t = updates applied."""
        if self.noise_eta == 0:
            return 0.0
        return float(
            transforms.noise_std(
                self.noise_eta, self.noise_gamma, self._iterations
            )
        )

    def finalize_variable_values(self, var_list) -> None:
        """What Keras calls at the end of `fit`: the moving average of the
        weights replaces them (with `use_ema`), and micro-batches left out
        as non-finite since the last report are reported."""
        if not private_api.holds_values(self.variables):
            # `fit` on JAX failed in its first step and left the variables
            # detached: reading them would replace the step's error with a
            # TypeError of Keras's.
            return
        super().finalize_variable_values(var_list)
        self.report_skipped_micro_batches("During this fit")

    def report_skipped_micro_batches(self, when: str) -> int:
        """Warns (`RuntimeWarning`) if micro-batches were left out as
        non-finite since the last report; `GradientVarianceMonitor` calls
        it every epoch, `fit` at its end.

        Args:
            when: How the message starts, e.g. "Epoch 3".

        Returns:
            The number of micro-batches left out since the last report.
        """
        if not self.built:
            return 0
        skipped = int(ops.convert_to_numpy(self.skipped_micro_batches))
        new = skipped - self._skipped_reported
        object.__setattr__(self, "_skipped_reported", skipped)
        if new > 0:
            warnings.warn(
                f"{when}, {new} micro-batch(es) had a gradient with NaN or "
                "inf and were left out of the update (on_nonfinite='skip'); "
                f"{skipped} since this optimizer was created "
                "(`optimizer.skipped_micro_batches`).",
                RuntimeWarning,
                stacklevel=2,
            )
        return new

    @property
    def _reads_micro_variance(self):
        """Whether `update_step` uses the within-update variance (Adam's
        "micro" second moment). Subclasses override."""
        return False

    # ------------------------------------------------------------------
    # State.

    def build(self, variables: Sequence[keras.Variable]) -> None:
        """Creates the optimizer's state for `variables`.

        Per variable: the gradient sum `G` when `max_accumulation_steps >
        1`, and the sum of squares `S` only where the update reads it.
        Scalars: the counters, the noise seed (when noise is on) and, with
        `track_gradient_statistics`, the statistics and the per-variable
        sums of squared norms they need. Accumulators are float32 whatever
        the variables' dtype.

        Under a `tf.distribute` strategy, build inside `strategy.scope()`:
        the accumulators and the counters they need become per-replica
        (SyncOnRead) variables, everything else is mirrored.
        """
        if self.built:
            return
        variables = list(variables)
        object.__setattr__(self, "_strategy", self._backend_strategy())
        private_api.register_trainable_variables(self, variables)
        if self.use_ema:
            private_api.set_weights_moving_average(
                self, self.add_optimizer_variables(variables, "average")
            )
        self._pipeline.build(variables)
        self.built = True

    def _backend_strategy(self):
        """The `tf.distribute` strategy in scope at build time, or `None`."""
        if backend.backend() != "tensorflow":
            return None
        from keras_gradtools.backends import tf_distribute

        return tf_distribute.strategy_for_build(self)

    def _add_state(
        self,
        name,
        role=None,
        shape=(),
        dtype="float32",
        initial=0,
        local=False,
        reference=None,
        keep_dtype=False,
    ):
        """Creates one variable of the pipeline's state (the `make_state`
        hook).

        Args:
            name: Its name (prefixed with the reference's path if any).
            role: Its place in the saved layout (`layout.ROLE_ORDER`);
                defaults to `name`.
            shape: Its shape (the reference's, if one is given).
            dtype: Its dtype (`"int"`: Keras's default integer).
            initial: Its initial value.
            local: Whether each replica keeps its own copy under a strategy
                (SyncOnRead, SUM): the accumulators.
            reference: A model variable it shadows (shape, placement,
                layout), or `None`.
            keep_dtype: Take the reference's dtype instead of `dtype`.
        """
        role = role or name
        if reference is not None:
            shape = reference.shape
            if keep_dtype:
                dtype = reference.dtype
            path = common.variable_path(reference)
            name = f"{path.replace('/', '_').replace(':', '_')}_{name}"
        if local and self._strategy is not None:
            from keras_gradtools.backends import tf_distribute

            variable = tf_distribute.add_local_variable(
                self, self._strategy, shape, dtype, name, reference
            )
        elif reference is not None:
            variable = self.add_variable(
                shape=shape,
                dtype=dtype,
                name=name,
                layout=private_api.variable_layout(reference),
            )
        else:
            variable = self.add_variable(
                shape=shape,
                initializer=initializers.Constant(initial),
                dtype=dtype,
                aggregation="only_first_replica",
                name=name,
            )
        self.record_variable_role(variable, role)
        return variable

    def add_variable_from_reference(
        self, reference_variable, name=None, initializer="zeros"
    ):
        """Creates a slot shaped like `reference_variable` (Keras's hook,
        used by `add_optimizer_variables`), in float32 where the variable's
        dtype is narrower.

        Keras gives a slot the variable's dtype. A bfloat16 or float16
        moment loses what the rule adds to it (`1 - beta_2 = 0.001` is
        below half an ulp of bfloat16 near 1; `beta_2` itself rounds to 1),
        and a bfloat16 model then never moves. The rule computes in the
        slot's dtype and casts its step to the variable's.
        """
        name = name or "var"
        path = common.variable_path(reference_variable)
        return self.add_variable(
            shape=reference_variable.shape,
            initializer=initializer,
            dtype=slot_dtype(reference_variable.dtype),
            name=f"{path.replace('/', '_').replace(':', '_')}_{name}",
            layout=private_api.variable_layout(reference_variable),
        )

    # ------------------------------------------------------------------
    # Entry point.

    @backends.current().not_for_autograph
    def apply(
        self,
        grads: Sequence[TensorLike | None],
        trainable_variables: Sequence[keras.Variable] | None = None,
        count: TensorLike | float | None = None,
    ) -> keras.Variable:
        """Consumes the gradients of one micro-batch.

        Args:
            grads: A list of gradients, one per variable (`None` for a
                variable without a gradient).
            trainable_variables: The variables, required on the first call
                (it builds the optimizer); defaults to those it was built
                with.
            count: Optional scalar (float or tensor) >= 0: what this
                micro-batch's loss was averaged over (its valid tokens,
                samples or sum of sample weights), for accumulation that
                equals one big batch when micro-batches differ
                (`weighted_accumulation`, which a count given to an
                optimizer not built yet switches on). A count of 0 (all
                padding) contributes nothing; one that is not finite is
                left out like a non-finite gradient. Inside `model.fit`,
                `keras_gradtools.exact_accumulation(model)` passes it.

        Returns:
            The update counter `iterations`.

        Example:

        >>> loss = loss_fn(y, model(x))  # the mean over `n` valid tokens
        >>> optimizer.apply(grads, model.trainable_variables, count=n)
        """
        if count is None:
            count = micro_batch_counts.take()
        if count is not None and not self.weighted_accumulation:
            if self.built:
                raise ValueError(
                    "`apply(..., count=...)` needs an optimizer created with "
                    "`weighted_accumulation=True` (or given a count from its "
                    "first `apply`, or set up by "
                    "`keras_gradtools.exact_accumulation(model)` before "
                    "training): this one was built without, and has no "
                    "state for the counts."
                )
            self.weighted_accumulation = True
        pipeline = self._pipeline
        grads, variables, indices = gradients.prepare(
            self, pipeline, grads, trainable_variables
        )
        if self.weighted_accumulation:
            count = ops.cast(
                ops.convert_to_tensor(1.0 if count is None else count),
                "float32",
            )
        guard = contextlib.nullcontext()
        if self.on_nonfinite == "raise":
            checked = grads if count is None else grads + [count]
            guard = pipeline.backend.nonfinite_guard(
                checked, variables, pipeline.accumulator.micro_steps.value
            )
        with guard, keras.name_scope(self.name, caller=self):
            backends.runner().apply(
                pipeline,
                grads,
                indices,
                count,
                state_variables=self._state_variables,
            )
        return self._iterations

    def _state_variables(self):
        """Every variable an update reads or writes: the optimizer's and
        the model's (the JAX backend threads them through its branch)."""
        return self.variables + list(private_api.trainable_variables(self))

    def stateless_apply(
        self,
        optimizer_variables,
        grads,
        trainable_variables,
        count=None,
    ):
        """Keras's `stateless_apply` (JAX), with the micro-batch's optional
        `count` as in `apply`.

        Args:
            optimizer_variables: The values of `optimizer.variables`.
            grads: One gradient per trainable variable.
            trainable_variables: The values of the trainable variables.
            count: Optional scalar, see `apply`.

        Returns:
            `(trainable_variables, optimizer_variables)`, the new values.
        """
        with micro_batch_counts.offered(count):
            return super().stateless_apply(
                optimizer_variables, grads, trainable_variables
            )

    # ------------------------------------------------------------------
    # Serialization.

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.pop("gradient_accumulation_steps", None)
        config.update(self._pipeline.settings.config())
        return config


def _setting(name, doc):
    """A property of the optimizer that reads and writes the pipeline's
    setting `name`."""

    def get(self):
        return getattr(self._pipeline.settings, name)

    def set_(self, value):
        setattr(self._pipeline.settings, name, value)

    return property(get, set_, doc=doc)


for _argument in arguments.PIPELINE_ARGUMENTS:
    if _argument.name not in (
        "accumulation_steps",
        "gradient_accumulation_steps",
    ):
        setattr(
            GradientPipelineOptimizer,
            _argument.name,
            _setting(_argument.name, _argument.doc),
        )
arguments.declare_arguments(GradientPipelineOptimizer)
GradientPipelineOptimizer.build = saved_state.restoring_pending_state(
    GradientPipelineOptimizer.build
)


class PipelineHooks:
    """The optimizer as its pipeline sees it: the hooks of
    `pipeline/hooks.py`, and nothing else."""

    def __init__(self, optimizer):
        self._optimizer = optimizer

    def make_state(self, name, **options):
        return self._optimizer._add_state(name, **options)

    def apply_rule(self, update):
        self._optimizer._apply_rule(update)

    @property
    def iterations(self):
        return private_api.iterations_variable(self._optimizer)

    @property
    def reads_micro_variance(self):
        return self._optimizer._reads_micro_variance

    @property
    def strategy(self):
        return self._optimizer._strategy

    def overwrites_with_gradient(self, variable):
        return private_api.overwrites_with_gradient(self._optimizer, variable)

    def learning_rate_owner(self):
        return self._optimizer._learning_rate_owner()


def slot_dtype(dtype) -> str:
    """The dtype of an optimizer slot for a variable of `dtype`: float32
    for the narrower floating-point dtypes, else `dtype` itself."""
    dtype = backend.standardize_dtype(dtype)
    if dtype in ("float16", "bfloat16"):
        return "float32"
    return dtype
