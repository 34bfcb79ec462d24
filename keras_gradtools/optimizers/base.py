"""The base class of the package's optimizers.

A `GradientPipelineOptimizer` is a `keras.optimizers.Optimizer` whose
`apply` runs the gradient pipeline (accumulation, clipping, noise,
statistics) around its update rule. It holds the pipeline's parts by
composition:

- `GradientAccumulator` (`accumulator.py`): ΣG, Σg², Σ|g|², the counters;
- `GradientStatistics` (`statistics.py`): the statistics' state;
- `CycleDriver` (`cycle.py`): one micro-batch through the pipeline;
- the backend module (`keras_gradtools.backends`): how it branches and is
  compiled on TensorFlow or JAX, and `tf.distribute` where present.

Subclasses implement the update rule in `update_step` exactly as Keras
optimizers do, writing through `self.assign*` so that a skipped update
(a non-finite gradient with K = 1) leaves every variable as it was.
"""

import contextlib
import random
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
from keras_gradtools.backends import common
from keras_gradtools.backends import private_api
from keras_gradtools.optimizers import layout
from keras_gradtools.optimizers import validation
from keras_gradtools.optimizers.accumulator import GradientAccumulator
from keras_gradtools.optimizers.cycle import CycleDriver
from keras_gradtools.optimizers.docstrings import pipeline_keyword_args
from keras_gradtools.optimizers.statistics import GradientStatistics
from keras_gradtools.transforms import sparse
from keras_gradtools.types import LearningRate
from keras_gradtools.types import NonfinitePolicy
from keras_gradtools.types import TensorLike

SECOND_MOMENT_MODES = ("micro", "macro")
NONFINITE_POLICIES = ("skip", "apply", "raise")


class GradientPipelineOptimizer(optimizers.Optimizer):
    """Base class for optimizers that accumulate, clip and add noise.

    A subclass overrides `build` (to create its slots, after calling
    `super().build`), `update_step` and `get_config`, as for any Keras
    optimizer. This class owns everything around the update rule.

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

    def __init__(
        self,
        learning_rate: LearningRate,
        accumulation_steps: int | None = None,
        noise_eta: float = 0.0,
        noise_gamma: float = 0.55,
        noise_seed: int | None = None,
        clip_micro_batches: bool = False,
        on_nonfinite: NonfinitePolicy = "skip",
        track_gradient_statistics: bool = False,
        jit_compile: bool = True,
        max_accumulation_steps: int | None = None,
        sync_micro_batches: bool = False,
        gradient_accumulation_steps: int | None = None,
        weighted_accumulation: bool = False,
        **kwargs: Any,
    ) -> None:
        backends.check_supported()
        steps = validation.resolve_accumulation_steps(
            accumulation_steps, gradient_accumulation_steps
        )
        max_steps = validation.resolve_max_accumulation_steps(
            max_accumulation_steps, steps
        )
        learning_rate = validation.check_learning_rate(learning_rate)
        noise_eta = validation.check_float("noise_eta", noise_eta, minimum=0)
        noise_gamma = validation.check_float(
            "noise_gamma", noise_gamma, minimum=0
        )
        noise_seed = validation.check_optional_seed("noise_seed", noise_seed)
        on_nonfinite = validation.check_choice(
            "on_nonfinite", on_nonfinite, NONFINITE_POLICIES
        )
        for name in ("clipnorm", "clipvalue", "global_clipnorm"):
            kwargs[name] = validation.check_optional_positive(
                name, kwargs.get(name)
            )
        if kwargs.get("weight_decay") is not None:
            kwargs["weight_decay"] = validation.check_float(
                "weight_decay", kwargs["weight_decay"], minimum=0
            )
        if kwargs.get("use_ema"):
            kwargs["ema_momentum"] = validation.check_float(
                "ema_momentum", kwargs.get("ema_momentum", 0.99), 0, 1
            )
        if kwargs.get("loss_scale_factor") is not None:
            kwargs["loss_scale_factor"] = validation.check_float(
                "loss_scale_factor",
                kwargs["loss_scale_factor"],
                minimum=0,
                open_min=True,
            )
        super().__init__(learning_rate=learning_rate, **kwargs)
        self._initial_accumulation_steps = steps
        self.max_accumulation_steps = max_steps
        self.noise_eta = noise_eta
        self.noise_gamma = noise_gamma
        if noise_seed is None:
            noise_seed = random.randrange(2**31 - 1)
        self.noise_seed = noise_seed
        self.clip_micro_batches = bool(clip_micro_batches)
        self.sync_micro_batches = bool(sync_micro_batches)
        self.weighted_accumulation = bool(weighted_accumulation)
        self.on_nonfinite = on_nonfinite
        self.track_gradient_statistics = bool(track_gradient_statistics)
        self.jit_compile = bool(jit_compile)
        # Per-coordinate sums of squares for statistics (histograms), on top
        # of the per-variable scalars: switched on by the monitor.
        self._per_coordinate_statistics = False
        # Plain attributes, not tracked state (object.__setattr__ bypasses
        # Keras's tracker).
        object.__setattr__(self, "_backend", backends.current())
        object.__setattr__(self, "_cycle", CycleDriver(self))
        object.__setattr__(self, "_update_gate", None)
        object.__setattr__(self, "_strategy", None)
        object.__setattr__(self, "_roles", {})
        object.__setattr__(self, "_pending_state", None)
        object.__setattr__(self, "_accumulator", None)
        object.__setattr__(self, "_statistics", None)
        object.__setattr__(self, "_skipped_reported", 0)
        # State restored before `build` (a pickled or deep-copied optimizer)
        # is applied when the subclass's `build` has made every slot.
        build_variables = self.build

        def build(variables):
            build_variables(variables)
            self._apply_pending_state()

        build.__doc__ = build_variables.__doc__
        object.__setattr__(self, "build", build)

    # ------------------------------------------------------------------
    # Counters and settings.

    @property
    def iterations(self) -> keras.Variable:
        """The number of updates applied (not of micro-batches)."""
        return self._iterations

    @property
    def accumulation_steps(self) -> int:
        """K, the micro-batches per update, as a Python int.

        Settable during training (up to `max_accumulation_steps`, without
        retracing the step): the new K takes effect when the next cycle
        starts. On JAX inside `fit`, call `model.jax_state_sync()` before
        setting it from a callback's batch hook.
        """
        if self._accumulator is None or not self._accumulator.accumulates:
            return self._initial_accumulation_steps
        return int(ops.convert_to_numpy(self._accumulator.steps))

    @accumulation_steps.setter
    def accumulation_steps(self, steps: int) -> None:
        steps = validation.check_int(
            "accumulation_steps", steps, 1, self.max_accumulation_steps
        )
        if self._accumulator is not None and self._accumulator.accumulates:
            self._accumulator.steps.assign(steps)
        else:
            # Before `build`: the K the optimizer is configured with.
            self._initial_accumulation_steps = steps

    @property
    def learning_rate_factor(self) -> float:
        """What each update multiplies the learning rate (or its schedule's
        value) by: 1 unless set, e.g. by `AdaptiveAccumulation` when it
        changes the effective batch. Settable during training when
        `max_accumulation_steps > 1`."""
        if self._accumulator is None or not self._accumulator.accumulates:
            return 1.0
        return float(
            ops.convert_to_numpy(self._accumulator.learning_rate_factor)
        )

    @learning_rate_factor.setter
    def learning_rate_factor(self, factor: float) -> None:
        factor = validation.check_float(
            "learning_rate_factor", factor, minimum=0.0, open_min=True
        )
        self._require_built("learning_rate_factor")
        if not self._accumulator.accumulates:
            raise ValueError(
                "`learning_rate_factor` can be set on an optimizer created "
                "with max_accumulation_steps > 1 (the factor follows the "
                "effective batch); set `learning_rate` instead."
            )
        self._accumulator.learning_rate_factor.assign(factor)

    def _learning_rate_owner(self):
        """The optimizer whose learning-rate setting the rule reads."""
        return self

    def _scaled_learning_rate(self):
        """The learning rate of this update: the rate (or its schedule's
        value at `iterations`) times `learning_rate_factor`."""
        learning_rate = self.learning_rate
        if self._accumulator is not None and self._accumulator.accumulates:
            factor = ops.convert_to_tensor(
                self._accumulator.learning_rate_factor
            )
            learning_rate = ops.multiply(
                ops.cast(learning_rate, "float32"), factor
            )
        return learning_rate

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
        self._require_built("micro_steps")
        return self._accumulator.micro_steps

    @property
    def skipped_micro_batches(self) -> keras.Variable:
        """Micro-batches left out because their gradient was not finite.

        Under a strategy, each replica counts its own share of a micro-batch
        (the value read is the sum over replicas).
        """
        self._require_built("skipped_micro_batches")
        return self._accumulator.skipped_micro_batches

    @property
    def noise_std(self) -> float:
        """The standard deviation of the noise the next update adds:
        `sqrt(noise_eta / (1 + t)**noise_gamma)`, t = updates applied."""
        if self.noise_eta == 0:
            return 0.0
        return float(self._noise_std_at(self._iterations))

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

    def _require_built(self, what):
        if not self.built:
            raise ValueError(
                f"`{what}` needs a built optimizer: call `apply` (or "
                "`model.fit`) or `build(variables)` first."
            )

    # ------------------------------------------------------------------
    # What this configuration needs (decides which slots exist).

    @property
    def _reads_micro_variance(self):
        """Whether `update_step` uses the within-update variance (Adam's
        "micro" second moment). Subclasses override."""
        return False

    @property
    def _keeps_square_sums(self):
        return self.max_accumulation_steps > 1 and (
            self._reads_micro_variance or self._per_coordinate_statistics
        )

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
            self._model_variables_moving_average = self.add_optimizer_variables(
                variables, "average"
            )
        object.__setattr__(
            self,
            "_overwrite_flags",
            [private_api.overwrites_with_gradient(self, v) for v in variables],
        )
        object.__setattr__(
            self,
            "_accumulator",
            GradientAccumulator(
                self,
                variables,
                max_steps=self.max_accumulation_steps,
                steps=self._initial_accumulation_steps,
                square_sums=self._keeps_square_sums,
                square_norm_sums=self.track_gradient_statistics,
                weighted=self.weighted_accumulation,
            ),
        )
        if self.noise_eta > 0:
            self._noise_seed_variable = self._add_state(
                "noise_seed", dtype="int32", initial=self.noise_seed
            )
        if self.track_gradient_statistics:
            object.__setattr__(
                self, "_statistics", GradientStatistics(self, len(variables))
            )
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
        """Creates one variable of the pipeline's state.

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
        self._roles[id(variable)] = role
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

    @property
    def variables(self) -> list[keras.Variable]:
        """All optimizer variables: Keras's and the rule's in creation order,
        then the pipeline's in a fixed order of roles. This one order is
        used by `get_weights`, `set_weights`, saving and `stateless_apply`,
        whenever each part was created."""
        roles = self._roles
        order = sorted(
            enumerate(private_api.tracked_variables(self)),
            key=lambda item: (
                layout.role_rank(roles.get(id(item[1]))),
                item[0],
            ),
        )
        return [variable for _, variable in order]

    def _state_variables(self):
        """Every variable an update reads or writes: the optimizer's and the
        model's (JAX threads them through its branch)."""
        return self.variables + list(private_api.trainable_variables(self))

    def _variable_index(self, variable):
        return private_api.variable_index(self, variable)

    def _trainable_variable(self, index):
        return private_api.trainable_variables(self)[index]

    @property
    def _iterations_variable(self):
        return private_api.iterations_variable(self)

    def _overwrites_with_gradient(self, variable):
        return private_api.overwrites_with_gradient(self, variable)

    def _overwrites_with_gradient_at(self, index):
        return self._overwrite_flags[index]

    @property
    def _overwritten_indices(self):
        return [i for i, flag in enumerate(self._overwrite_flags) if flag]

    def get_weights(self) -> list:
        """The values of `variables`, as NumPy arrays."""
        return [ops.convert_to_numpy(v) for v in self.variables]

    def set_weights(self, weights: Sequence) -> None:
        """Sets `variables` from a list of arrays in the same order.

        Raises:
            ValueError: if the optimizer is not built, or the number or
                shapes of the arrays do not match `variables`.
        """
        if not self.built:
            raise ValueError(
                "`set_weights()` needs a built optimizer: call "
                "`optimizer.build(trainable_variables)` first."
            )
        variables = self.variables
        weights = list(weights)
        if len(weights) != len(variables):
            raise ValueError(
                f"`set_weights()` received {len(weights)} arrays; this "
                f"optimizer has {len(variables)} variables (see "
                "`optimizer.variables` for their order)."
            )
        for variable, weight in zip(variables, weights):
            shape = tuple(getattr(weight, "shape", ()))
            if tuple(variable.shape) != shape:
                raise ValueError(
                    f"Optimizer variable {common.variable_path(variable)} has "
                    "shape "
                    f"{tuple(variable.shape)}, not compatible with the "
                    f"provided weight of shape {shape}."
                )
        for variable, weight in zip(variables, weights):
            variable.assign(weight)

    # ------------------------------------------------------------------
    # Entry point.

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
        grads, variables = self._prepare_gradients(grads, trainable_variables)
        if self.weighted_accumulation:
            count = ops.cast(
                ops.convert_to_tensor(1.0 if count is None else count),
                "float32",
            )
        guard = contextlib.nullcontext()
        if self.on_nonfinite == "raise":
            checked = grads if count is None else grads + [count]
            guard = self._backend.nonfinite_guard(
                checked, variables, self._accumulator.micro_steps.value
            )
        with guard, keras.name_scope(self.name, caller=self):
            self._backend.apply(self, grads, variables, count)
        return self._iterations

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

    def _prepare_gradients(self, grads, trainable_variables):
        grads = list(grads)
        if trainable_variables is None:
            if not self.built:
                raise ValueError(
                    "`apply` without `trainable_variables` needs a built "
                    "optimizer: pass the variables on the first call or call "
                    "`optimizer.build(variables)`."
                )
            variables = list(private_api.trainable_variables(self))
        else:
            variables = list(trainable_variables)
        if len(grads) != len(variables):
            raise ValueError(
                f"`apply` received {len(grads)} gradients for "
                f"{len(variables)} variables: pass exactly one gradient (or "
                "`None`) per variable."
            )
        if not self.built:
            with keras.name_scope(self.name, caller=self):
                self.build(variables)
        private_api.check_variables_are_known(self, variables)
        grads, variables = private_api.filter_empty_gradients(
            self, grads, variables
        )
        rows = self._accumulates_sparse_rows
        prepared = []
        for grad, variable in zip(grads, variables):
            if not (rows and sparse.is_sparse(grad)):
                grad = self._backend.densify(grad)
            _check_gradient_matches(grad, variable)
            index = self._variable_index(variable)
            if (
                self.loss_scale_factor is not None
                and not (self._overwrite_flags[index])
            ):
                # Variables overwritten with their gradient take it as it
                # is, before unscaling (as in Keras).
                grad = sparse.map_values(
                    grad, lambda g: g / self.loss_scale_factor
                )
            if sparse.is_sparse(grad):
                grad = self._backend.deduplicate(grad)
            prepared.append(grad)
        return prepared, variables

    @property
    def _accumulates_sparse_rows(self):
        """Sparse gradients stay sparse only where they are accumulated row
        by row (clipping each micro-batch needs them dense)."""
        return (
            backend.backend() == "tensorflow"
            and self.max_accumulation_steps > 1
            and not self.clip_micro_batches
            and self._strategy is None
        )

    # ------------------------------------------------------------------
    # Pieces of the update (called by the cycle driver).

    def _clip(self, grads, square_norms=None):
        return transforms.clip_gradients(
            grads,
            clipvalue=self.clipvalue,
            clipnorm=self.clipnorm,
            global_clipnorm=self.global_clipnorm,
            square_norms=square_norms,
        )

    def _noise_std_at(self, step):
        return transforms.noise_std(self.noise_eta, self.noise_gamma, step)

    def _add_noise(self, grads, indices, sigma):
        seed = ops.convert_to_tensor(self._noise_seed_variable)
        step = ops.convert_to_tensor(self._iterations_variable)
        shapes = [tuple(v.shape) for v in private_api.trainable_variables(self)]
        noise = transforms.gaussian_noise(shapes, seed, step, wanted=indices)
        return [
            ops.add(grad, ops.multiply(sigma, draw))
            for grad, draw in zip(grads, noise)
        ]

    def _apply_rule(self, grads, variables, micro_variances):
        """Weight decay and the update rule for each variable, the weights'
        moving average, then the variables' constraints (Keras's order)."""
        learning_rate = self._scaled_learning_rate()
        object.__setattr__(self, "_update_scalars", {})
        try:
            for grad, variable, variance in zip(
                grads, variables, micro_variances
            ):
                self._apply_rule_to_variable(
                    grad, variable, learning_rate, variance
                )
        finally:
            object.__setattr__(self, "_update_scalars", None)
        if self.use_ema:
            self._update_moving_averages()
        for variable in variables:
            self._apply_constraint(variable)

    def _once_per_update(self, key, compute):
        """`compute()`, computed once per update for all the variables that
        ask with the same `key` (a rule's scalars: its step size, its
        decays), not once per variable: a model with hundreds of tensors
        would otherwise trace and compile hundreds of copies."""
        scalars = getattr(self, "_update_scalars", None)
        if scalars is None:
            return compute()
        if key not in scalars:
            scalars[key] = compute()
        return scalars[key]

    def _apply_rule_to_variable(self, grad, variable, learning_rate, variance):
        self._decay_weight(variable, learning_rate)
        self.update_step(
            grad, variable, learning_rate, micro_batch_variance=variance
        )

    def _apply_constraint(self, variable):
        constraint = getattr(variable, "constraint", None)
        if constraint is not None:
            self.assign(variable, constraint(variable))

    def _decay_weight(self, variable, learning_rate):
        if self.weight_decay and private_api.uses_weight_decay(self, variable):
            wd, lr = self._once_per_update(
                ("weight_decay", str(variable.dtype)),
                lambda: self._weight_decay_scalars(
                    learning_rate, variable.dtype
                ),
            )
            self.assign(variable, variable - variable * wd * lr)

    def _weight_decay_scalars(self, learning_rate, dtype):
        """`(weight_decay, learning_rate)` of this update in `dtype`."""
        lr = ops.cast(learning_rate, dtype)
        wd = ops.cast(self.weight_decay, dtype)
        factor = getattr(self, "_weight_decay_factor", None)
        if factor is not None:
            # Moved with K by a batch-size policy (Adam, AdamW; 1 until
            # then, which leaves `wd` as it is).
            factor = ops.convert_to_tensor(factor)
            wd = ops.where(
                ops.equal(factor, 1.0),
                wd,
                ops.cast(ops.multiply(float(self.weight_decay), factor), dtype),
            )
        return wd, lr

    def update_step(
        self, gradient, variable, learning_rate, micro_batch_variance=None
    ):
        """Applies the update rule to one variable.

        Args:
            gradient: The clipped, noised mean gradient (float32).
            variable: The variable to update.
            learning_rate: The learning rate of this update.
            micro_batch_variance: For rules that read it (Adam's "micro"
                second moment), `c**2 * W`, the elementwise variance of the
                cycle's micro-batch gradients scaled by the clip factor;
                `None` when there is no accumulation.
        """
        raise NotImplementedError

    def _update_moving_averages(self):
        iterations = self._iterations_variable
        not_first = ops.not_equal(iterations, 0)
        pairs = [
            (variable, average)
            for variable, average in zip(
                private_api.trainable_variables(self),
                self._model_variables_moving_average,
            )
            if average is not None
        ]
        for variable, average in pairs:
            momentum = ops.multiply(
                ops.cast(not_first, variable.dtype), self.ema_momentum
            )
            self.assign(average, momentum * average + (1 - momentum) * variable)
        if self.ema_overwrite_frequency:
            overwrite = ops.equal(
                ops.mod(iterations + 1, self.ema_overwrite_frequency), 0
            )
            for variable, average in pairs:
                self.assign(
                    variable,
                    ops.where(
                        overwrite,
                        ops.convert_to_tensor(average),
                        ops.convert_to_tensor(variable),
                    ),
                )

    # ------------------------------------------------------------------
    # Gated writes: a skipped update leaves every variable unchanged.

    def _run_gated(self, gate, fn):
        """Runs `fn` so that its writes take effect only where `gate` holds.

        Our own rules write through `self.assign*`, so a select per write
        suffices: it fuses into the update and moves no extra bytes.
        """
        if gate is None:
            fn()
            return
        previous = self._update_gate
        object.__setattr__(self, "_update_gate", gate)
        try:
            fn()
        finally:
            object.__setattr__(self, "_update_gate", previous)

    def assign(self, variable, value):
        if self._update_gate is not None:
            value = ops.where(
                self._update_gate,
                ops.cast(value, variable.dtype),
                ops.convert_to_tensor(variable),
            )
        super().assign(variable, value)

    def assign_add(self, variable, value):
        if self._update_gate is not None:
            self.assign(
                variable, ops.add(ops.convert_to_tensor(variable), value)
            )
        else:
            super().assign_add(variable, value)

    def assign_sub(self, variable, value):
        if self._update_gate is not None:
            self.assign(
                variable, ops.subtract(ops.convert_to_tensor(variable), value)
            )
        else:
            super().assign_sub(variable, value)

    # ------------------------------------------------------------------
    # Gradient statistics.

    def enable_gradient_statistics(self, per_coordinate: bool = False) -> None:
        """Switches `track_gradient_statistics` on, also after `build`.

        Used by `GradientVarianceMonitor` at the start of `fit`. The missing
        state is created; a function that already traced the update must be
        traced again (`model.make_train_function(force=True)`). Switched on
        in the middle of an accumulation cycle, the statistics start with
        the next cycle (the current one's earlier micro-batches were not
        measured), unless the per-coordinate sums of squares already hold
        them.

        Args:
            per_coordinate: Also keep the per-coordinate sums of squares
                (4 bytes per parameter) where the update rule does not, for
                per-coordinate variances (the monitor's histograms).
        """
        if self.track_gradient_statistics and (
            self._keeps_square_sums or not per_coordinate
        ):
            return
        was_tracking = self.track_gradient_statistics
        self.track_gradient_statistics = True
        had_square_sums = self._keeps_square_sums
        self._per_coordinate_statistics |= bool(per_coordinate)
        if not self.built:
            return
        scope = contextlib.nullcontext()
        if self._strategy is not None:
            scope = self._strategy.scope()
        variables = private_api.trainable_variables(self)
        accumulator = self._accumulator
        with scope:
            if not was_tracking:
                object.__setattr__(
                    self,
                    "_statistics",
                    GradientStatistics(self, len(variables)),
                )
            if not accumulator.accumulates:
                return
            position = int(ops.convert_to_numpy(accumulator.position))
            if not had_square_sums and self._keeps_square_sums:
                accumulator.add_square_sums(variables)
                if position:
                    accumulator.cycle_samples.assign(-1)
            if not was_tracking:
                accumulator.add_square_norm_sums(len(variables))
                if had_square_sums:
                    accumulator.complete_square_norm_sums()
                elif position:
                    accumulator.cycle_samples.assign(-1)

    def _require_statistics(self, method):
        if not self.track_gradient_statistics:
            raise ValueError(
                f"`{method}()` needs gradient statistics, which this "
                "optimizer does not measure: create it with "
                "track_gradient_statistics=True, call "
                "enable_gradient_statistics(), or attach a "
                "GradientVarianceMonitor to fit. (The current noise level is "
                "`optimizer.noise_std`.)"
            )
        self._require_built(method + "()")

    def gradient_statistics(self) -> dict[str, Any]:
        """Returns a snapshot of the gradient statistics of the last update.

        Needs `track_gradient_statistics=True`. Values read NaN until the
        first update has measured them; `variance`, `mean_norm_sq`,
        `noise_scale`, `snr` and `signal_resolved` need at least two
        gradient samples per update (`accumulation_steps >= 2`, or two or
        more replicas) and stay NaN otherwise.

        Returns:
            A dict of float32 scalar tensors:
            - `variance`: tr(Sigma_M), the summed per-coordinate variance of
              one micro-batch gradient.
            - `mean_norm_sq`: unbiased estimate of |E g|**2 (negative when
              the signal is below the noise).
            - `noise_scale`: B_simple = tr(Sigma_M) / |E g|**2, in
              micro-batches (multiply by the micro-batch size for samples);
              a lower bound when `signal_resolved` is 0.
            - `snr`: |E g|**2 / (tr(Sigma_M) / n), the signal-to-noise ratio
              of the update's mean gradient over n micro-batches (>= 0).
            - `signal_resolved`: 1.0 when |E g|**2 was measured above zero.
            - `grad_norm`: the L2 norm of the mean gradient before clipping.
            - `noise_std`: the standard deviation of the injected noise.

        Raises:
            ValueError: if statistics are off or the optimizer is not built.

        Example:

        >>> opt = keras_gradtools.SGD(0.1, accumulation_steps=4,
        ...                           track_gradient_statistics=True)
        >>> # ... after some updates:
        >>> float(opt.gradient_statistics()["noise_scale"])
        """
        self._require_statistics("gradient_statistics")
        return self._statistics.snapshot()

    def running_gradient_statistics(self) -> dict[str, Any]:
        """Returns bias-corrected running averages of the statistics.

        The variance tr(Sigma_M) and the squared mean |E g|**2 are averaged
        over updates with decay 0.95 and corrected for their start at zero;
        the noise scale and signal-to-noise ratio are ratios of the
        averages, never averages of ratios (McCandlish et al., 2018). Values
        read NaN until an update has measured them.

        Returns:
            A dict of float32 tensors: scalars `variance`, `mean_norm_sq`,
            `noise_scale` (micro-batches; a lower bound where
            `signal_resolved` is 0), `snr`, `signal_resolved`,
            `updates_averaged` (the bias-correction weight), and
            per-variable vectors `variable_variance` and
            `variable_mean_sq`, in the order of the variables the optimizer
            was built with.

        Raises:
            ValueError: if statistics are off or the optimizer is not built.
        """
        self._require_statistics("running_gradient_statistics")
        return self._statistics.running_averages(self.accumulation_steps)

    # ------------------------------------------------------------------
    # Saved state: refuse a layout that does not fit instead of dropping it.

    def save_own_variables(self, store):
        """Saves every optimizer variable, plus a description of the layout
        so that loading into a different configuration fails clearly."""
        for i, variable in enumerate(self.variables):
            store[str(i)] = ops.convert_to_numpy(variable)
        store[layout.LAYOUT_KEY] = layout.encode(self._layout())

    def load_own_variables(self, store):
        """Restores every optimizer variable from `store`.

        State saved before the optimizer was built (a model compiled and
        saved before training) restores the counters it has and leaves the
        rest fresh. State restored into an optimizer not built yet (a
        pickled or deep-copied optimizer) is kept and applied by `build`.

        Raises:
            ValueError: if the saved state was written by a different
                optimizer class, a configuration with a different set of
                slots, or for different variables. Keras itself only warns
                and silently drops all optimizer state in that case.
        """
        saved = layout.saved_layout(store)
        arrays = layout.saved_arrays(store)
        if saved is not None and not saved.get("built", True):
            self._load_unbuilt_state(saved, arrays)
            return
        if not self.built:
            object.__setattr__(self, "_pending_state", (saved, arrays))
            return
        self._restore(saved, arrays)

    def _restore(self, saved, arrays):
        """Restores saved state, adapting to whether statistics were on.

        Statistics are switched on by callbacks (the monitor, adaptive
        accumulation) at the start of `fit`, which may be after a callback
        such as `BackupAndRestore` has restored state written with them on:
        they are switched on here first. State saved without them restores
        everything else; they start fresh (from the next cycle, if the
        state is mid-cycle).
        """
        settings = (saved or {}).get("settings", {})
        if saved is not None and saved.get("format") == layout.FORMAT:
            if (
                settings.get("statistics")
                and not self.track_gradient_statistics
            ):
                self.enable_gradient_statistics(
                    per_coordinate=bool(settings.get("sum_of_squares"))
                )
            elif settings.get("sum_of_squares") and not self._keeps_square_sums:
                self.enable_gradient_statistics(per_coordinate=True)
        variables = self._variables_in(settings) if saved else self.variables
        expected = self._layout()
        expected["settings"] = dict(
            expected["settings"],
            statistics=settings.get(
                "statistics", self.track_gradient_statistics
            ),
            sum_of_squares=settings.get(
                "sum_of_squares", self._keeps_square_sums
            ),
        )
        if "hyperparameter_transfer" in expected["settings"]:
            # Files written before the switches existed hold none: they
            # keep their neutral values (off, factor 1).
            expected["settings"]["hyperparameter_transfer"] = settings.get(
                "hyperparameter_transfer"
            )
        expected["variables"] = layout.describe("", True, {}, variables)[
            "variables"
        ]
        layout.check(saved, arrays, expected)
        for variable, array in zip(variables, arrays):
            variable.assign(array)
        self._check_restored_cycle()
        accumulator = self._accumulator
        roles = self._roles
        missing = {roles.get(id(v)) for v in self.variables} - {
            roles.get(id(v)) for v in variables
        }
        missing -= {
            "beta_1_transfer",
            "beta_2_transfer",
            "weight_decay_transfer",
        }
        if missing and accumulator.accumulates:
            # Statistics on here but not in the saved state.
            accumulator.complete_square_norm_sums()

    def _variables_in(self, settings):
        """This optimizer's variables that state saved with `settings`
        holds: without statistics there, not theirs (nor the sums that
        only they need)."""
        dropped = set()
        if not settings.get("statistics"):
            dropped |= {"statistic", "running_statistic", "square_norm_sum"}
        if not settings.get("sum_of_squares"):
            dropped.add("square_sum")
        if not (settings.get("statistics") or settings.get("sum_of_squares")):
            dropped.add("cycle_samples")
        if not settings.get("hyperparameter_transfer"):
            dropped |= {
                "beta_1_transfer",
                "beta_2_transfer",
                "weight_decay_transfer",
            }
        roles = self._roles
        return [v for v in self.variables if roles.get(id(v)) not in dropped]

    def _load_unbuilt_state(self, saved, arrays):
        """The state of an optimizer saved before it was built: Keras's own
        variables (the update counter, the learning rate)."""
        variables = self._keras_variables()
        expected = layout.describe(
            self._layout()["class"], False, self._layout_settings(), variables
        )
        layout.check(saved, arrays, expected)
        for variable, array in zip(variables, arrays):
            variable.assign(array)

    def _keras_variables(self):
        """The variables that exist before `build` (Keras's own)."""
        return private_api.keras_variables(self)

    def _apply_pending_state(self):
        """Restores state loaded before `build`. Keras may build the
        optimizer while it traces the first training step: the restore
        runs outside that trace, so that it takes effect at once."""
        pending = self._pending_state
        if pending is not None:
            object.__setattr__(self, "_pending_state", None)
            with common.outside_trace():
                self._restore(*pending)

    def _check_restored_cycle(self):
        accumulator = self._accumulator
        if accumulator.cycle_samples is None or not accumulator.square_sums:
            return
        position = int(ops.convert_to_numpy(accumulator.position))
        saved = int(ops.convert_to_numpy(accumulator.cycle_samples))
        now = self._samples_per_micro_batch()
        if position and saved != now:
            raise ValueError(
                f"This state was saved {position} micro-batches into an "
                f"accumulation cycle whose sums of squares came from {saved} "
                f"replica(s); here they would come from {now}. Samples of "
                "two batch sizes cannot be combined into one variance. "
                "Restore onto the same number of replicas, or save at a "
                "cycle boundary."
            )

    def _samples_per_micro_batch(self):
        """Gradient samples per micro-batch: R when each of R replicas'
        gradients is a sample of its own, else 1."""
        if self._strategy is None:
            return 1
        from keras_gradtools.backends import tf_distribute

        return tf_distribute.samples_per_micro_batch(self)

    def _layout_settings(self):
        """The settings that decide which variables exist and what they
        mean. Subclasses with slots of their own add theirs."""
        return {
            "max_accumulation_steps": self.max_accumulation_steps,
            "sum_of_squares": self._keeps_square_sums,
            "noise": self.noise_eta > 0,
            "use_ema": bool(self.use_ema),
            "statistics": self.track_gradient_statistics,
            **({"weighted": True} if self.weighted_accumulation else {}),
        }

    def _layout(self):
        return layout.describe(
            type(self).__name__,
            self.built,
            self._layout_settings(),
            self.variables,
        )

    # ------------------------------------------------------------------
    # Serialization.

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.pop("gradient_accumulation_steps", None)
        config.update(self._pipeline_config())
        return config

    def _pipeline_config(self):
        """The pipeline's own arguments (shared with the wrapper's config)."""
        return {
            # The configured K; the current one is state.
            "accumulation_steps": self._initial_accumulation_steps,
            "max_accumulation_steps": self.max_accumulation_steps,
            "noise_eta": self.noise_eta,
            "noise_gamma": self.noise_gamma,
            "noise_seed": self.noise_seed,
            "clip_micro_batches": self.clip_micro_batches,
            "sync_micro_batches": self.sync_micro_batches,
            "weighted_accumulation": self.weighted_accumulation,
            "on_nonfinite": self.on_nonfinite,
            "track_gradient_statistics": self.track_gradient_statistics,
            "jit_compile": self.jit_compile,
        }


GradientPipelineOptimizer.__doc__ = GradientPipelineOptimizer.__doc__.replace(
    "{{pipeline_keyword_args}}", pipeline_keyword_args
)
if backend.backend() == "tensorflow":
    GradientPipelineOptimizer.apply = backends.current().not_for_autograph(
        GradientPipelineOptimizer.apply
    )


def slot_dtype(dtype) -> str:
    """The dtype of an optimizer slot for a variable of `dtype`: float32
    for the narrower floating-point dtypes, else `dtype` itself."""
    dtype = backend.standardize_dtype(dtype)
    if dtype in ("float16", "bfloat16"):
        return "float32"
    return dtype


def _check_gradient_matches(grad, variable):
    values = sparse.values_of(grad)
    grad_shape = tuple(getattr(grad, "shape", ()) or ())
    if sparse.is_sparse(grad):
        grad_shape = tuple(variable.shape)
    var_shape = tuple(variable.shape)
    compatible = len(grad_shape) == len(var_shape) and all(
        g is None or v is None or g == v for g, v in zip(grad_shape, var_shape)
    )
    path = common.variable_path(variable)
    if not compatible:
        raise ValueError(
            f"The gradient for variable '{path}' has shape {grad_shape}, but "
            f"the variable has shape {var_shape}."
        )
    dtype = backend.standardize_dtype(values.dtype)
    if not dtype.startswith(("float", "bfloat")):
        raise ValueError(
            f"The gradient for variable '{path}' has dtype {dtype}; "
            "gradients must be floating point."
        )
