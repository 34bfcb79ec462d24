"""The base class that owns the gradient pipeline.

One call to `apply` consumes the gradient of one micro-batch. With
`K = accumulation_steps`, a gradient takes this path (DESIGN.md §1):

    apply(grads)
      _prepare_gradients      check, filter `None`, unscale, densify
      [clip each micro-batch] only with `clip_micro_batches=True`
      finite check            a non-finite micro-batch is not accumulated
      K == 1:  _update(grads)
      K >  1:  _accumulate    G += g, S += g*g  (local, no other bytes move)
               run_if(last micro-batch of the cycle, _finish_cycle)
                 _update(G / n, S / n)  then  G, S, n = 0

Under a `tf.distribute` strategy the same steps run split between replica
and cross-replica context (`distribution.py`): accumulation stays local to
each replica, and `_update` runs once, on the sum over replicas.

    _update(mean gradients)
      statistics              from G and S, where the update reads them
      clip                    value, per-tensor norm or global norm
      noise                   + sigma_t * N(0, I), one draw per update
      rule                    weight decay, `update_step`, EMA
      iterations += 1

Subclasses implement the update rule in `update_step` exactly as Keras
optimizers do, writing through `self.assign*` so that a skipped update
(a non-finite gradient with K = 1) leaves every variable as it was.
"""

import contextlib
import random
from collections.abc import Sequence
from typing import Any

import keras
from keras import backend
from keras import initializers
from keras import ops
from keras import optimizers

from keras_gradtools import transforms
from keras_gradtools.optimizers import distribution
from keras_gradtools.optimizers import gradient_checks
from keras_gradtools.optimizers import state
from keras_gradtools.optimizers import validation
from keras_gradtools.optimizers.control_flow import run_if
from keras_gradtools.optimizers.distribution import CrossReplicaPipelineMixin
from keras_gradtools.optimizers.docstrings import pipeline_keyword_args
from keras_gradtools.optimizers.statistics import STATISTICS
from keras_gradtools.optimizers.statistics import GradientStatisticsMixin
from keras_gradtools.types import LearningRate
from keras_gradtools.types import NonfinitePolicy
from keras_gradtools.types import TensorLike

# Saved state is ordered by role, whatever the order the variables were
# created in (statistics can be switched on after the optimizer was built).
_ROLE_ORDER = (
    "micro_steps",
    "skipped_micro_batches",
    "cycle_micro_batches",
    "gradient_sum",
    "square_sum",
    "cycle_replicas",
    "noise_seed",
    "statistic",
    "running_statistic",
)
SECOND_MOMENT_MODES = ("micro", "macro")
NONFINITE_POLICIES = ("skip", "apply", "raise")


class GradientPipelineOptimizer(
    GradientStatisticsMixin, CrossReplicaPipelineMixin, optimizers.Optimizer
):
    """Base class for optimizers that accumulate, clip and add noise.

    A subclass overrides `build` (to create its slots, after calling
    `super().build`), `update_step` and `get_config`, as for any Keras
    optimizer. This class owns everything around the update rule: the
    accumulators, the counters, clipping, noise and statistics.

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
        gradient_accumulation_steps: int | None = None,
        **kwargs: Any,
    ) -> None:
        accumulation_steps = validation.resolve_accumulation_steps(
            accumulation_steps, gradient_accumulation_steps
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
        super().__init__(learning_rate=learning_rate, **kwargs)
        self.accumulation_steps = accumulation_steps
        self.noise_eta = noise_eta
        self.noise_gamma = noise_gamma
        if noise_seed is None:
            noise_seed = random.randrange(2**31 - 1)
        self.noise_seed = noise_seed
        self.clip_micro_batches = bool(clip_micro_batches)
        self.on_nonfinite = on_nonfinite
        self.track_gradient_statistics = bool(track_gradient_statistics)
        self.jit_compile = bool(jit_compile)
        object.__setattr__(self, "_update_gate", None)
        object.__setattr__(self, "_xla_apply", None)
        object.__setattr__(self, "_strategy", None)

    # ------------------------------------------------------------------
    # What this configuration needs (decides which slots exist).

    @property
    def _reads_micro_variance(self):
        """Whether `update_step` uses the within-update variance (Adam's
        "micro" second moment). Subclasses override."""
        return False

    @property
    def _keeps_square_sums(self):
        return self.accumulation_steps > 1 and (
            self._reads_micro_variance or self.track_gradient_statistics
        )

    # ------------------------------------------------------------------
    # State.

    def build(self, variables):
        """Creates the pipeline's state for `variables`.

        Per variable: the gradient sum `G` when `accumulation_steps > 1`, and
        the sum of squares `S` only where it is read. Scalars: the
        micro-batch counter, the count of skipped micro-batches, the
        micro-batches accumulated in the current cycle, the noise seed (when
        noise is on) and the statistics of the last update. Accumulators
        are float32 whatever the variables' dtype.

        Under a `tf.distribute` strategy, build inside `strategy.scope()`:
        the accumulators and the counters they need become per-replica
        (SyncOnRead) variables, everything else is mirrored.
        """
        if self.built:
            return
        if distribution.in_replica_context_of_strategy():
            raise ValueError(
                "Build the optimizer before `strategy.run`, inside "
                "`strategy.scope()`: call "
                "`optimizer.build(model.trainable_variables)` there (or use "
                "`model.compile` and `model.fit`, which do it)."
            )
        object.__setattr__(self, "_strategy", distribution.active_strategy())
        super().build(variables)
        object.__setattr__(self, "_variable_roles", {})
        self._micro_steps = self._add_counter("micro_steps", "int")
        self._skipped_micro_batches = self._add_local_counter(
            "skipped_micro_batches"
        )
        self._gradient_sums = []
        self._square_sums = []
        if self.accumulation_steps > 1:
            # Counts global micro-batches in units of 1 / COUNT_UNIT, so
            # that it means the same on any number of replicas.
            self._cycle_micro_batches = self._add_local_counter(
                "cycle_micro_batches"
            )
            self._gradient_sums = self._add_accumulators(
                variables, "gradient_sum"
            )
            if self._keeps_square_sums:
                self._add_square_sums(variables)
        if self.noise_eta > 0:
            self._noise_seed = self._add_scalar(
                "noise_seed", "int32", self.noise_seed, "noise_seed"
            )
        # Unmeasured statistics read NaN; without noise, noise_std is 0.
        initial = {name: float("nan") for name in STATISTICS}
        if self.noise_eta == 0:
            initial["noise_std"] = 0.0
        self._statistics = {
            name: self._add_scalar(
                f"statistic_{name}", "float32", initial[name], "statistic"
            )
            for name in STATISTICS
        }
        self._running_statistics = {}
        if self.track_gradient_statistics:
            self._add_running_statistics()

    def _add_counter(self, name, dtype):
        return self._add_scalar(name, dtype, 0, name)

    def _add_local_counter(self, name):
        """An int64 counter that each replica adds to on its own."""
        if self._strategy is None:
            return self._add_counter(name, "int")
        variable = distribution.add_local_variable(
            self, self._strategy, (), "int64", name, reference=None
        )
        self._variable_roles[id(variable)] = name
        return variable

    def _add_scalar(self, name, dtype, value, role, shape=()):
        variable = self.add_variable(
            shape=shape,
            initializer=initializers.Constant(value),
            dtype=dtype,
            aggregation="only_first_replica",
            name=name,
        )
        self._variable_roles[id(variable)] = role
        return variable

    @property
    def variables(self):
        """All optimizer variables: Keras's and the rule's in creation order,
        then the pipeline's in a fixed order of roles (the saved layout)."""
        roles = getattr(self, "_variable_roles", {})
        rank = {role: i + 1 for i, role in enumerate(_ROLE_ORDER)}
        order = sorted(
            enumerate(self._variables),
            key=lambda item: (rank.get(roles.get(id(item[1])), 0), item[0]),
        )
        return [variable for _, variable in order]

    def _add_accumulators(self, variables, name):
        accumulators = []
        for variable in variables:
            accumulators.append(self._add_accumulator(variable, name))
            if accumulators[-1] is not None:
                self._variable_roles[id(accumulators[-1])] = name
        return accumulators

    def _add_square_sums(self, variables):
        """The sums of squares, and the number of replicas whose gradients
        were their samples in the current cycle: sums written by different
        numbers of replicas cannot be combined (see `_finish_cycle`)."""
        self._square_sums = self._add_accumulators(variables, "square_sum")
        self._cycle_replicas = self._add_scalar(
            "cycle_replicas", "int", 1, "cycle_replicas"
        )

    def _record_cycle_replicas(self, first):
        if self._square_sums:
            self._cycle_replicas.assign(
                ops.where(first, self._sample_replicas, self._cycle_replicas)
            )

    def _add_accumulator(self, variable, name):
        if self._overwrite_variable_with_gradient(variable):
            return None
        path = getattr(variable, "path", variable.name)
        if self._strategy is not None:
            return distribution.add_local_variable(
                self,
                self._strategy,
                variable.shape,
                "float32",
                f"{path.replace('/', '_')}_{name}",
                reference=variable,
            )
        if backend.standardize_dtype(variable.dtype) == "float32":
            return self.add_variable_from_reference(variable, name=name)
        return self.add_variable(
            shape=variable.shape,
            dtype="float32",
            name=f"{path.replace('/', '_')}_{name}",
        )

    @property
    def micro_steps(self):
        """Micro-batches seen (calls to `apply`), including skipped ones."""
        return self._micro_steps

    @property
    def skipped_micro_batches(self):
        """Micro-batches left out because their gradient was not finite.

        Under a strategy, each replica counts its own share of a micro-batch
        (the value read is the sum over replicas).
        """
        return self._skipped_micro_batches

    # ------------------------------------------------------------------
    # Entry point.

    def apply(
        self,
        grads: Sequence[TensorLike | None],
        trainable_variables: Sequence[keras.Variable] | None = None,
    ) -> keras.Variable:
        """Consumes the gradients of one micro-batch.

        Args:
            grads: A list of gradients, one per variable (`None` for a
                variable without a gradient).
            trainable_variables: The variables, required on the first call
                (it builds the optimizer); defaults to those it was built
                with.

        Returns:
            The update counter `iterations`.
        """
        grads, variables = self._prepare_gradients(grads, trainable_variables)
        guard = contextlib.nullcontext()
        if self.on_nonfinite == "raise":
            guard = gradient_checks.raise_if_nonfinite(
                grads, variables, self._micro_steps.value
            )
        with guard:
            if distribution.in_replica_context_of_strategy():
                self._apply_across_replicas(grads, variables)
            elif self.jit_compile and gradient_checks.executing_eagerly():
                self._apply_compiled(grads, variables)
            else:
                self._apply_pipeline(grads, variables)
        return self._iterations

    def _prepare_gradients(self, grads, trainable_variables):
        grads = list(grads)
        if trainable_variables is None:
            if not self.built:
                raise ValueError(
                    "`apply` without `trainable_variables` needs a built "
                    "optimizer: pass the variables on the first call or call "
                    "`optimizer.build(variables)`."
                )
            variables = list(self._trainable_variables)
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
        self._check_variables_are_known(variables)
        grads, variables = self._filter_empty_gradients(grads, variables)
        grads, variables = self._overwrite_variables_directly_with_gradients(
            grads, variables
        )
        if not self._accumulates_sparse_rows:
            grads = [gradient_checks.dense(g) for g in grads]
        for grad, variable in zip(grads, variables):
            gradient_checks.check_gradient_matches(grad, variable)
        if self.loss_scale_factor is not None:
            grads = [
                _map_gradient(g, lambda x: x / self.loss_scale_factor)
                for g in grads
            ]
        return grads, variables

    def _apply_compiled(self, grads, variables):
        if self._xla_apply is None:
            import tensorflow as tf

            object.__setattr__(
                self,
                "_xla_apply",
                tf.function(self._apply_by_index, jit_compile=True),
            )
        indices = tuple(self._get_variable_index(v) for v in variables)
        self._xla_apply(tuple(grads), indices)

    def _apply_by_index(self, grads, indices):
        variables = [self._trainable_variables[i] for i in indices]
        self._apply_pipeline(list(grads), variables)

    # ------------------------------------------------------------------
    # The pipeline.

    def _apply_pipeline(self, grads, variables):
        with keras.name_scope(self.name, caller=self):
            grads = [
                _map_gradient(g, lambda x: ops.cast(x, "float32"))
                for g in grads
            ]
            if self.clip_micro_batches:
                grads, _ = self._clip(grads)
            finite = self._check_finite(grads)
            if self.accumulation_steps == 1:
                self._update(grads, variables, None, 1.0, gate=finite)
            else:
                position = ops.mod(self._micro_steps, self.accumulation_steps)
                first = ops.equal(position, 0)
                self._accumulate(grads, variables, finite, first)
                self._record_cycle_replicas(first)
                run_if(
                    ops.equal(position, self.accumulation_steps - 1),
                    lambda: self._finish_cycle(variables),
                )
            self._micro_steps.assign_add(1)

    def _check_finite(self, grads, counted=None):
        """With `on_nonfinite="skip"`: whether `grads` are finite, counting
        a non-finite micro-batch as skipped (only where `counted` holds, if
        given). Otherwise `None`: nothing is checked."""
        if self.on_nonfinite != "skip":
            return None
        finite = gradient_checks.all_finite(grads)
        skipped = ops.logical_not(finite)
        if counted is not None:
            skipped = ops.logical_and(skipped, counted)
        self._skipped_micro_batches.assign_add(ops.cast(skipped, "int64"))
        return finite

    def _accumulate(
        self, grads, variables, finite, first, count=distribution.COUNT_UNIT
    ):
        """Adds one micro-batch to the sums; the first micro-batch of a
        cycle overwrites them instead, so the update never has to zero
        them (zeroing inside the update costs a copy and a write).

        `count` is what this micro-batch adds to the cycle counter: a whole
        `COUNT_UNIT`, or one replica's share of it."""
        for grad, variable in zip(grads, variables):
            index = self._get_variable_index(variable)
            if gradient_checks.is_sparse(grad):
                self._accumulate_rows(index, grad, finite, first)
                continue
            _restart_or_add(self._gradient_sums[index], grad, finite, first)
            if self._square_sums:
                _restart_or_add(
                    self._square_sums[index], ops.square(grad), finite, first
                )
        _restart_or_add(
            self._cycle_micro_batches,
            ops.full((), count, "int64"),
            finite,
            first,
        )
        present = {self._get_variable_index(v) for v in variables}
        absent = [
            accumulator
            for i, accumulator in enumerate(
                self._gradient_sums + self._square_sums
            )
            if accumulator is not None
            and i % len(self._trainable_variables) not in present
        ]
        if absent:
            # A variable without a gradient here (None, or frozen for this
            # fit) must still start the cycle from zero, or stale sums would
            # return when it gets gradients again.
            run_if(first, lambda: _zero(absent))

    @property
    def _accumulates_sparse_rows(self):
        """Sparse gradients stay sparse only where they are accumulated row
        by row (clipping each micro-batch needs them dense)."""
        return (
            backend.backend() == "tensorflow"
            and self.accumulation_steps > 1
            and not self.clip_micro_batches
            and self._strategy is None
        )

    def _accumulate_rows(self, index, grad, finite, first):
        from keras_gradtools.optimizers import sparse

        grad = sparse.deduplicate(grad)
        sparse.restart_or_scatter_add(
            self._gradient_sums[index], grad.values, grad.indices, finite, first
        )
        if self._square_sums:
            sparse.restart_or_scatter_add(
                self._square_sums[index],
                ops.square(grad.values),
                grad.indices,
                finite,
                first,
            )

    def _finish_cycle(self, variables, sample_replicas=1):
        """The update at the end of a cycle, from the accumulated sums.

        Under a strategy this runs in cross-replica context, where reading
        a sum adds up the replicas' copies. `sample_replicas` is R when
        each replica's gradients are separate samples, at the local batch
        size: a sample is then h = R * g_r, and its mean square
        R**2 * S / (R * n) = R * S / n.
        """
        count = distribution.counted_micro_batches(self._cycle_micro_batches)
        indices = [self._get_variable_index(v) for v in variables]
        # Multiplying by a reciprocal rather than dividing: XLA treats a
        # division as expensive and materialises its result once for the
        # two moments that read it (an extra write and read of every
        # parameter); a product fuses into each reader.
        reciprocal = 1.0 / count
        means = [
            ops.multiply(self._gradient_sums[i], reciprocal) for i in indices
        ]
        mean_squares = None
        if self._square_sums:
            square_scale = reciprocal * sample_replicas
            mean_squares = [
                ops.multiply(self._square_sums[i], square_scale)
                for i in indices
            ]
            mean_squares = self._check_cycle_replicas(mean_squares, means)
        gate = count > 0 if self.on_nonfinite == "skip" else None
        self._update(
            means,
            variables,
            mean_squares,
            count,
            gate=gate,
            sample_replicas=sample_replicas,
        )
        # This write also keeps everything derived from the count
        # loop-variant: were the loop body to write no accumulator, XLA
        # would hoist the means out of run_if's loop and compute them on
        # every micro-batch.
        self._cycle_micro_batches.assign(ops.zeros((), "int64"))

    def _check_cycle_replicas(self, mean_squares, means):
        """Sums of squares begun on a different number of replicas (a
        checkpoint restored mid-cycle onto another strategy) mix samples of
        two batch sizes: no variance can be formed from them. A graph fails
        with that message. XLA drops assertions: there, that one update
        takes the variance as zero (W = 0, the "macro" second moment)."""
        consistent = ops.equal(self._cycle_replicas, self._sample_replicas)
        if gradient_checks.executing_eagerly() or (
            gradient_checks.in_xla_context()
        ):
            return [
                ops.where(consistent, q, ops.square(g))
                for q, g in zip(mean_squares, means)
            ]
        import tensorflow as tf

        check = tf.debugging.Assert(
            consistent,
            [
                "The accumulation cycle was begun on a different number of "
                "replicas (a checkpoint restored in the middle of a cycle "
                "onto another strategy); its sums of squares cannot be "
                "combined. Restore at a cycle boundary or onto the same "
                "number of replicas. Replicas then, now:",
                self._cycle_replicas,
                self._sample_replicas,
            ],
        )
        with tf.control_dependencies([check]):
            return [ops.copy(q) for q in mean_squares]

    def _update(
        self, means, variables, mean_squares, count, gate, sample_replicas=1
    ):
        """One optimizer update from the cycle's mean gradients.

        `mean_squares` are the mean squares of `count * sample_replicas`
        gradient samples, each at 1 / `sample_replicas` of the micro-batch
        size; variances are reported at the micro-batch size.
        """
        variances = None
        if mean_squares is not None and self.accumulation_steps > 1:
            variances = [
                transforms.micro_batch_variance(q, g) / sample_replicas
                for q, g in zip(mean_squares, means)
            ]
        statistics = None
        if self.track_gradient_statistics:
            statistics = self._measure(
                means, variables, mean_squares, count, sample_replicas
            )
        if self.clip_micro_batches:
            clipped, factors = means, [None] * len(means)
        else:
            clipped, factors = self._clip(means)
        sigma = None
        if self.noise_eta > 0:
            sigma = transforms.noise_std(
                self.noise_eta, self.noise_gamma, self._iterations
            )
            clipped = self._add_noise(clipped, variables, sigma)
        micro_variances = [None] * len(means)
        if self._reads_micro_variance and variances is not None:
            micro_variances = [
                w if c is None else ops.multiply(ops.square(c), w)
                for w, c in zip(variances, factors)
            ]

        def write_update():
            self._apply_rule(clipped, variables, micro_variances)
            self._record_statistics(statistics, sigma)
            self.assign_add(self._iterations, 1)

        self._run_gated(gate, write_update)

    def _clip(self, grads):
        return transforms.clip_gradients(
            grads,
            clipvalue=self.clipvalue,
            clipnorm=self.clipnorm,
            global_clipnorm=self.global_clipnorm,
        )

    def _add_noise(self, grads, variables, sigma):
        seed = self._noise_seed.value
        noisy = []
        for grad, variable in zip(grads, variables):
            noise = transforms.gaussian_noise_like(
                grad, seed, self._get_variable_index(variable), self._iterations
            )
            noisy.append(ops.add(grad, ops.multiply(sigma, noise)))
        return noisy

    def _apply_rule(self, grads, variables, micro_variances):
        """Weight decay, the update rule and the weights' moving average."""
        strategy = distribution.cross_replica_strategy()
        if strategy is not None:
            self._apply_rule_across_replicas(
                strategy, grads, variables, micro_variances
            )
            return
        learning_rate = self.learning_rate
        for variable in variables:
            self._decay_weight(variable, learning_rate)
        for grad, variable, variance in zip(grads, variables, micro_variances):
            self.update_step(
                grad, variable, learning_rate, micro_batch_variance=variance
            )
        if self.use_ema:
            self._update_moving_averages()

    def _decay_weight(self, variable, learning_rate):
        if self.weight_decay and self._use_weight_decay(variable):
            lr = ops.cast(learning_rate, variable.dtype)
            wd = ops.cast(self.weight_decay, variable.dtype)
            self.assign(variable, variable - variable * wd * lr)

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
        not_first = ops.not_equal(self._iterations, 0)
        for variable, average in zip(
            self._trainable_variables, self._model_variables_moving_average
        ):
            if average is None:
                continue
            momentum = ops.multiply(
                ops.cast(not_first, variable.dtype), self.ema_momentum
            )
            self.assign(average, momentum * average + (1 - momentum) * variable)
        if self.ema_overwrite_frequency:
            overwrite = ops.equal(
                ops.mod(self._iterations + 1, self.ema_overwrite_frequency), 0
            )
            for variable, average in zip(
                self._trainable_variables,
                self._model_variables_moving_average,
            ):
                if average is not None:
                    self.assign(
                        variable, ops.where(overwrite, average, variable)
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
        with self._gated(gate):
            fn()

    @contextlib.contextmanager
    def _gated(self, gate):
        previous = self._update_gate
        object.__setattr__(self, "_update_gate", gate)
        try:
            yield
        finally:
            object.__setattr__(self, "_update_gate", previous)

    def assign(self, variable, value):
        if self._update_gate is not None:
            value = ops.where(
                self._update_gate, ops.cast(value, variable.dtype), variable
            )
        super().assign(variable, value)

    def assign_add(self, variable, value):
        if self._update_gate is not None:
            self.assign(variable, ops.add(variable, value))
        else:
            super().assign_add(variable, value)

    def assign_sub(self, variable, value):
        if self._update_gate is not None:
            self.assign(variable, ops.subtract(variable, value))
        else:
            super().assign_sub(variable, value)

    # ------------------------------------------------------------------
    # Saved state: refuse a layout that does not fit instead of dropping it.

    def save_own_variables(self, store):
        """Saves every optimizer variable, plus a description of the layout
        so that loading into a different configuration fails clearly."""
        super().save_own_variables(store)
        store[state.LAYOUT_KEY] = state.encode_layout(self._state_layout())

    def load_own_variables(self, store):
        """Restores every optimizer variable from `store`.

        Raises:
            ValueError: if the saved state was written by a different
                optimizer class, a configuration with a different set of
                slots, or for different variables. Keras itself only warns
                and silently drops all optimizer state in that case.
        """
        state.check_layout(store, self._state_layout(), self.variables)
        for i, variable in enumerate(self.variables):
            variable.assign(store[str(i)])
        self._check_restored_cycle()

    def _check_restored_cycle(self):
        if not self._square_sums:
            return
        position = int(self._micro_steps.numpy()) % self.accumulation_steps
        saved = int(self._cycle_replicas.numpy())
        if position and saved != self._sample_replicas:
            raise ValueError(
                f"This state was saved {position} micro-batches into an "
                f"accumulation cycle whose sums of squares came from {saved} "
                f"replica(s); here they would come from "
                f"{self._sample_replicas}. Samples of two batch sizes cannot "
                "be combined into one variance. Restore onto the same number "
                "of replicas, or save at a cycle boundary (micro_steps a "
                f"multiple of {self.accumulation_steps})."
            )

    def _layout_settings(self):
        """The settings that decide which variables exist and what they
        mean. Subclasses with slots of their own add theirs."""
        return {
            "accumulation_steps": self.accumulation_steps,
            "sum_of_squares": self._keeps_square_sums,
            "noise": self.noise_eta > 0,
            "use_ema": bool(self.use_ema),
            "statistics": self.track_gradient_statistics,
        }

    def _state_layout(self):
        return {
            "class": type(self).__name__,
            "settings": self._layout_settings(),
            "variables": [
                [list(v.shape), backend.standardize_dtype(v.dtype)]
                for v in self.variables
            ],
        }

    # ------------------------------------------------------------------
    # Serialization.

    def get_config(self):
        config = super().get_config()
        config.pop("gradient_accumulation_steps", None)
        config.update(self._pipeline_config())
        return config

    def _pipeline_config(self):
        """The pipeline's own arguments (shared with the wrapper's config)."""
        return {
            "accumulation_steps": self.accumulation_steps,
            "noise_eta": self.noise_eta,
            "noise_gamma": self.noise_gamma,
            "noise_seed": self.noise_seed,
            "clip_micro_batches": self.clip_micro_batches,
            "on_nonfinite": self.on_nonfinite,
            "track_gradient_statistics": self.track_gradient_statistics,
            "jit_compile": self.jit_compile,
        }


GradientPipelineOptimizer.__doc__ = GradientPipelineOptimizer.__doc__.replace(
    "{{pipeline_keyword_args}}", pipeline_keyword_args
)


def _zero(accumulators):
    for accumulator in accumulators:
        accumulator.assign(ops.zeros_like(accumulator))


def _restart_or_add(accumulator, value, finite, first):
    """`accumulator = (0 if first else accumulator) + value`, leaving out a
    non-finite `value`.

    Selects rather than multiplies, so that a NaN in `value` (or in a
    stale sum) never reaches the accumulator.
    """
    previous = ops.where(first, ops.zeros_like(accumulator), accumulator)
    if finite is not None:
        value = ops.where(finite, value, ops.zeros_like(value))
    accumulator.assign(ops.add(previous, value))


def _map_gradient(grad, fn):
    """`fn(grad)`, or `fn` on the values of a sparse gradient."""
    if gradient_checks.is_sparse(grad):
        from keras_gradtools.optimizers import sparse

        return sparse.map_values(grad, fn)
    return fn(grad)
