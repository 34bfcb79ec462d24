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

import keras
from keras import backend
from keras import initializers
from keras import ops
from keras import optimizers

from keras_gradtools import transforms
from keras_gradtools.optimizers import state
from keras_gradtools.optimizers import validation
from keras_gradtools.optimizers.control_flow import run_if

STATISTICS = (
    "variance",
    "mean_norm_sq",
    "noise_scale",
    "snr",
    "grad_norm",
    "noise_std",
)
# Smoothing of the running statistics, per update (McCandlish et al. 2018
# average the numerator and denominator of B_simple, then take the ratio).
STATISTICS_SMOOTHING = 0.95
# Saved state is ordered by role, whatever the order the variables were
# created in (statistics can be switched on after the optimizer was built).
_ROLE_ORDER = (
    "micro_steps",
    "skipped_micro_batches",
    "cycle_micro_batches",
    "gradient_sum",
    "square_sum",
    "noise_seed",
    "statistic",
    "running_statistic",
)
SECOND_MOMENT_MODES = ("micro", "macro")
NONFINITE_POLICIES = ("skip", "apply")

pipeline_keyword_args = """accumulation_steps: Int >= 1, defaults to 1. The
            number of micro-batches (calls to `apply`) per update. The
            weights move only on every `accumulation_steps`-th call, by the
            mean gradient of the cycle. `gradient_accumulation_steps` (the
            Keras name) is accepted as an alias.
        noise_eta: Float >= 0, defaults to 0 (no noise). Variance `eta` of
            the Gaussian noise added to the mean gradient at the first
            update; update `t` (counting from 0) uses
            `sigma_t**2 = eta / (1 + t)**gamma` (Neelakantan et al., 2015).
        noise_gamma: Float >= 0, defaults to 0.55. The annealing exponent.
        noise_seed: Int in [0, 2**31 - 1] or `None`. Seed of the stateless
            noise stream; `None` draws one from Python's `random` module
            (seeded by `keras.utils.set_random_seed`).
        clip_micro_batches: Boolean, defaults to `False`. If `True`, the
            clipping set by `clipnorm`, `clipvalue` or `global_clipnorm` is
            applied to each micro-batch gradient before it is accumulated
            instead of to the mean gradient at update time.
        on_nonfinite: `"skip"` (default) or `"apply"`. With `"skip"`, a
            micro-batch whose gradient holds a NaN or an infinity is left
            out of the accumulators (and counted in
            `skipped_micro_batches`); an update whose micro-batches were all
            non-finite is skipped. `"apply"` is Keras's behaviour.
        track_gradient_statistics: Boolean, defaults to `False`. If `True`,
            measure `gradient_statistics()` inside every update (a few
            scalar reductions over the mean gradient) and keep the sum of
            squared gradients where the update rule does not already need
            it, so that the variance and noise scale can be reported.
            `GradientVarianceMonitor` switches this on.
        jit_compile: Boolean, defaults to `True`. When `apply` is called
            eagerly, run the whole update as one XLA-compiled function.
            Inside a `tf.function` or `model.fit` the update is traced into
            the caller's graph (and its XLA cluster, if it has one)."""


class GradientPipelineOptimizer(optimizers.Optimizer):
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
        learning_rate,
        accumulation_steps=None,
        noise_eta=0.0,
        noise_gamma=0.55,
        noise_seed=None,
        clip_micro_batches=False,
        on_nonfinite="skip",
        track_gradient_statistics=False,
        jit_compile=True,
        gradient_accumulation_steps=None,
        **kwargs,
    ):
        accumulation_steps = _resolve_accumulation_steps(
            accumulation_steps, gradient_accumulation_steps
        )
        learning_rate = _check_learning_rate(learning_rate)
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

    @property
    def _computes_statistics(self):
        return self.track_gradient_statistics

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
        """
        if self.built:
            return
        super().build(variables)
        object.__setattr__(self, "_variable_roles", {})
        self._micro_steps = self._add_counter("micro_steps", "int")
        self._skipped_micro_batches = self._add_counter(
            "skipped_micro_batches", "int"
        )
        self._gradient_sums = []
        self._square_sums = []
        if self.accumulation_steps > 1:
            self._cycle_micro_batches = self._add_counter(
                "cycle_micro_batches", "float32"
            )
            self._gradient_sums = self._add_accumulators(
                variables, "gradient_sum"
            )
            if self._keeps_square_sums:
                self._square_sums = self._add_accumulators(
                    variables, "square_sum"
                )
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

    def _add_running_statistics(self):
        """Bias-corrected running averages of the variance and squared mean
        (overall and per variable), and the sum of squares if missing."""
        count = len(self._trainable_variables)
        self._running_statistics = {
            "variance": self._add_scalar(
                "running_variance", "float32", 0.0, "running_statistic"
            ),
            "mean_norm_sq": self._add_scalar(
                "running_mean_norm_sq", "float32", 0.0, "running_statistic"
            ),
            "weight": self._add_scalar(
                "running_weight", "float32", 0.0, "running_statistic"
            ),
            "variable_variance": self._add_scalar(
                "running_variable_variance",
                "float32",
                0.0,
                "running_statistic",
                shape=(count,),
            ),
            "variable_mean_sq": self._add_scalar(
                "running_variable_mean_sq",
                "float32",
                0.0,
                "running_statistic",
                shape=(count,),
            ),
        }
        if self.accumulation_steps > 1 and not self._square_sums:
            self._square_sums = self._add_accumulators(
                self._trainable_variables, "square_sum"
            )

    def enable_gradient_statistics(self):
        """Switches `track_gradient_statistics` on, also after `build`.

        Used by `GradientVarianceMonitor` at the start of `fit`. The missing
        state (the sum of squares, the running averages) is created; a
        function that already traced the update must be traced again.

        Raises:
            ValueError: if called in the middle of an accumulation cycle,
                where the new sum of squares would miss micro-batches.
        """
        if self.track_gradient_statistics:
            return
        if self.built:
            position = int(self._micro_steps.numpy()) % self.accumulation_steps
            if position:
                raise ValueError(
                    "Gradient statistics can only be switched on between "
                    f"accumulation cycles; this optimizer is {position} "
                    f"micro-batches into a cycle of {self.accumulation_steps}."
                    " Create it with track_gradient_statistics=True instead."
                )
            self.track_gradient_statistics = True
            self._add_running_statistics()
        else:
            self.track_gradient_statistics = True

    def _add_counter(self, name, dtype):
        return self._add_scalar(name, dtype, 0, name)

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

    def _add_accumulator(self, variable, name):
        if self._overwrite_variable_with_gradient(variable):
            return None
        if backend.standardize_dtype(variable.dtype) == "float32":
            return self.add_variable_from_reference(variable, name=name)
        path = getattr(variable, "path", variable.name)
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
        """Micro-batches left out because their gradient was not finite."""
        return self._skipped_micro_batches

    def gradient_statistics(self):
        """Returns a snapshot of the gradient statistics of the last update.

        With `track_gradient_statistics=True`, statistics are measured
        inside the update from the accumulators it reads anyway (DESIGN.md
        §3). `variance`, `mean_norm_sq`, `noise_scale` and `snr` also need
        `accumulation_steps >= 2`. What is not measured reads NaN, as does
        everything before the first update; `noise_std` is always kept.

        Returns:
            A dict of float32 scalar tensors:
            - `variance`: tr(Sigma_M), the summed per-coordinate variance of
              one micro-batch gradient.
            - `mean_norm_sq`: unbiased estimate of |E g|**2.
            - `noise_scale`: B_simple = tr(Sigma_M) / |E g|**2, in
              micro-batches (multiply by the micro-batch size for samples).
            - `snr`: |E g|**2 / (tr(Sigma_M) / n), the signal-to-noise ratio
              of the update's mean gradient over n micro-batches.
            - `grad_norm`: the L2 norm of the mean gradient before clipping.
            - `noise_std`: the standard deviation of the injected noise.

        Example:

        >>> opt = keras_gradtools.SGD(0.1, accumulation_steps=4,
        ...                           track_gradient_statistics=True)
        >>> # ... after some updates:
        >>> float(opt.gradient_statistics()["noise_scale"])
        """
        if not self.built:
            raise ValueError(
                "`gradient_statistics()` needs a built optimizer: call "
                "`apply` (or `model.fit`) or `build(variables)` first."
            )
        return {name: ops.copy(var) for name, var in self._statistics.items()}

    # ------------------------------------------------------------------
    # Entry point.

    def apply(self, grads, trainable_variables=None):
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
        if self.jit_compile and _executing_eagerly():
            self._apply_compiled(grads, variables)
        else:
            self._apply_pipeline(grads, variables)
        return self._iterations

    def _prepare_gradients(self, grads, trainable_variables):
        _check_single_replica()
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
        grads = [_dense(g) for g in grads]
        for grad, variable in zip(grads, variables):
            _check_gradient_matches(grad, variable)
        if self.loss_scale_factor is not None:
            grads = [g / self.loss_scale_factor for g in grads]
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
            grads = [ops.cast(g, "float32") for g in grads]
            if self.clip_micro_batches:
                grads, _ = self._clip(grads)
            finite = None
            if self.on_nonfinite == "skip":
                finite = _all_finite(grads)
                self._skipped_micro_batches.assign_add(
                    ops.cast(
                        ops.logical_not(finite),
                        self._skipped_micro_batches.dtype,
                    )
                )
            if self.accumulation_steps == 1:
                self._update(grads, variables, None, 1.0, gate=finite)
            else:
                position = ops.mod(self._micro_steps, self.accumulation_steps)
                self._accumulate(
                    grads, variables, finite, ops.equal(position, 0)
                )
                run_if(
                    ops.equal(position, self.accumulation_steps - 1),
                    lambda: self._finish_cycle(variables),
                )
            self._micro_steps.assign_add(1)

    def _accumulate(self, grads, variables, finite, first):
        """Adds one micro-batch to the sums; the first micro-batch of a
        cycle overwrites them instead, so the update never has to zero
        them (zeroing inside the update costs a copy and a write)."""
        for grad, variable in zip(grads, variables):
            index = self._get_variable_index(variable)
            _restart_or_add(self._gradient_sums[index], grad, finite, first)
            if self._square_sums:
                _restart_or_add(
                    self._square_sums[index], ops.square(grad), finite, first
                )
        one = ops.ones((), "float32")
        _restart_or_add(self._cycle_micro_batches, one, finite, first)

    def _finish_cycle(self, variables):
        count = self._cycle_micro_batches.value
        indices = [self._get_variable_index(v) for v in variables]
        means = [ops.divide(self._gradient_sums[i], count) for i in indices]
        mean_squares = None
        if self._square_sums:
            mean_squares = [
                ops.divide(self._square_sums[i], count) for i in indices
            ]
        gate = count > 0 if self.on_nonfinite == "skip" else None
        self._update(means, variables, mean_squares, count, gate=gate)
        # This write also keeps everything derived from the count
        # loop-variant: were the loop body to write no accumulator, XLA
        # would hoist the means out of run_if's loop and compute them on
        # every micro-batch.
        self._cycle_micro_batches.assign(0.0)

    def _update(self, means, variables, mean_squares, count, gate):
        """One optimizer update from the cycle's mean gradients."""
        variances = None
        if mean_squares is not None:
            variances = [
                transforms.micro_batch_variance(q, g)
                for q, g in zip(mean_squares, means)
            ]
        statistics = None
        if self._computes_statistics:
            statistics = self._measure(means, variables, mean_squares, count)
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

    def _measure(self, means, variables, mean_squares, count):
        """The statistics of this update (DESIGN.md §3), plus per-variable
        parts for the running averages."""
        mean_sq_parts = [transforms.flat_sum(ops.square(g)) for g in means]
        norm_sq = ops.sum(ops.stack(mean_sq_parts))
        stats = {"grad_norm": ops.sqrt(norm_sq)}
        if mean_squares is None:
            return stats, None
        variance_parts = [
            transforms.variance_and_square_norm(g, q, count)[0]
            for g, q in zip(means, mean_squares)
        ]
        variance = ops.sum(ops.stack(variance_parts))
        stats.update(
            transforms.gradient_statistics_from_sums(variance, norm_sq, count)
        )
        indices = [self._get_variable_index(v) for v in variables]
        parts = {
            "variable_variance": dict(zip(indices, variance_parts)),
            "variable_mean_sq": dict(zip(indices, mean_sq_parts)),
        }
        return stats, parts

    def _record_statistics(self, measured, sigma):
        if sigma is not None:
            self.assign(self._statistics["noise_std"], sigma)
        if measured is None:
            return
        stats, parts = measured
        for name, value in stats.items():
            self.assign(self._statistics[name], value)
        if parts is None or not self._running_statistics:
            return
        running = self._running_statistics
        valid = ops.logical_and(
            ops.isfinite(stats["variance"]), ops.isfinite(stats["mean_norm_sq"])
        )
        decay = STATISTICS_SMOOTHING

        def smooth(variable, value):
            new = decay * variable + (1.0 - decay) * value
            self.assign(variable, ops.where(valid, new, variable))

        smooth(running["variance"], stats["variance"])
        smooth(running["mean_norm_sq"], stats["mean_norm_sq"])
        smooth(running["weight"], 1.0)
        for name in ("variable_variance", "variable_mean_sq"):
            old = running[name]
            value = ops.stack(
                [
                    parts[name].get(i, old[i])
                    for i in range(len(self._trainable_variables))
                ]
            )
            smooth(old, value)

    def running_gradient_statistics(self):
        """Returns bias-corrected running averages of the statistics.

        The variance tr(Sigma_M) and the squared mean |E g|**2 are averaged
        over updates with decay `STATISTICS_SMOOTHING` (0.95) and corrected
        for their start at zero; the noise scale and signal-to-noise ratio
        are ratios of the averages, never averages of ratios (McCandlish et
        al., 2018). Needs `track_gradient_statistics=True`.

        Returns:
            A dict of float32 tensors: scalars `variance`, `mean_norm_sq`,
            `noise_scale` (micro-batches), `snr`, `updates_averaged` (the
            bias-correction weight's effective count), and per-variable
            vectors `variable_variance` and `variable_mean_sq`, in the
            order of the variables the optimizer was built with.
        """
        if not self._running_statistics:
            raise ValueError(
                "Running gradient statistics need "
                "track_gradient_statistics=True (or a GradientVarianceMonitor "
                "attached to fit)."
            )
        running = self._running_statistics
        weight = ops.convert_to_tensor(running["weight"])
        safe = ops.where(weight > 0, weight, 1.0)
        corrected = {
            name: ops.divide(ops.convert_to_tensor(running[name]), safe)
            for name in (
                "variance",
                "mean_norm_sq",
                "variable_variance",
                "variable_mean_sq",
            )
        }
        result = dict(corrected)
        ratios = transforms.noise_scale_and_snr(
            corrected["variance"],
            corrected["mean_norm_sq"],
            float(self.accumulation_steps),
        )
        nan = ops.cast(float("nan"), "float32")
        for name, value in zip(("noise_scale", "snr"), ratios):
            result[name] = ops.where(weight > 0, value, nan)
        result["updates_averaged"] = weight
        return result

    def _apply_rule(self, grads, variables, micro_variances):
        """Weight decay, the update rule and the weights' moving average."""
        learning_rate = self.learning_rate
        if self.weight_decay:
            for variable in variables:
                if self._use_weight_decay(variable):
                    lr = ops.cast(learning_rate, variable.dtype)
                    wd = ops.cast(self.weight_decay, variable.dtype)
                    self.assign(variable, variable - variable * wd * lr)
        for grad, variable, variance in zip(grads, variables, micro_variances):
            self.update_step(
                grad, variable, learning_rate, micro_batch_variance=variance
            )
        if self.use_ema:
            self._update_moving_averages()

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
        config.update(
            {
                "accumulation_steps": self.accumulation_steps,
                "noise_eta": self.noise_eta,
                "noise_gamma": self.noise_gamma,
                "noise_seed": self.noise_seed,
                "clip_micro_batches": self.clip_micro_batches,
                "on_nonfinite": self.on_nonfinite,
                "track_gradient_statistics": self.track_gradient_statistics,
                "jit_compile": self.jit_compile,
            }
        )
        return config


GradientPipelineOptimizer.__doc__ = GradientPipelineOptimizer.__doc__.replace(
    "{{pipeline_keyword_args}}", pipeline_keyword_args
)


def _resolve_accumulation_steps(
    accumulation_steps, gradient_accumulation_steps
):
    if gradient_accumulation_steps is not None:
        if accumulation_steps is not None:
            raise ValueError(
                "Pass either `accumulation_steps` or its Keras alias "
                "`gradient_accumulation_steps`, not both. Received: "
                f"accumulation_steps={accumulation_steps!r}, "
                f"gradient_accumulation_steps={gradient_accumulation_steps!r}"
            )
        return validation.check_int(
            "gradient_accumulation_steps", gradient_accumulation_steps, 1
        )
    if accumulation_steps is None:
        return 1
    return validation.check_int("accumulation_steps", accumulation_steps, 1)


def _check_learning_rate(learning_rate):
    if isinstance(learning_rate, bool):
        raise ValueError(
            "`learning_rate` must be a float >= 0, a LearningRateSchedule or "
            f"a callable. Received: learning_rate={learning_rate!r}"
        )
    if isinstance(learning_rate, (int, float)):
        return validation.check_float("learning_rate", learning_rate, 0)
    return learning_rate


def _check_single_replica():
    """Refuses data-parallel training until it is supported.

    Without a cross-replica reduction each replica would apply its own
    gradient and the replicas' weights would silently drift apart.
    """
    if backend.backend() != "tensorflow":
        return
    import tensorflow as tf

    replicas = tf.distribute.get_strategy().num_replicas_in_sync
    if replicas > 1:
        raise NotImplementedError(
            f"keras_gradtools optimizers do not support tf.distribute with "
            f"more than one replica yet (this strategy has {replicas}): the "
            "gradients would not be reduced across replicas. Train on one "
            "device, or use a Keras optimizer, until distribution support "
            "lands (see docs/distribute_findings.md)."
        )


def _executing_eagerly():
    if backend.backend() != "tensorflow":
        return False
    import tensorflow as tf

    return tf.executing_eagerly()


def _dense(grad):
    if backend.backend() == "tensorflow":
        import tensorflow as tf

        if isinstance(grad, tf.IndexedSlices):
            return tf.convert_to_tensor(grad)
    return grad


def _check_gradient_matches(grad, variable):
    grad_shape = tuple(getattr(grad, "shape", ()))
    var_shape = tuple(variable.shape)
    compatible = len(grad_shape) == len(var_shape) and all(
        g is None or v is None or g == v for g, v in zip(grad_shape, var_shape)
    )
    path = getattr(variable, "path", getattr(variable, "name", "?"))
    if not compatible:
        raise ValueError(
            f"The gradient for variable '{path}' has shape {grad_shape}, but "
            f"the variable has shape {var_shape}."
        )
    dtype = backend.standardize_dtype(grad.dtype)
    if not dtype.startswith(("float", "bfloat")):
        raise ValueError(
            f"The gradient for variable '{path}' has dtype {dtype}; "
            "gradients must be floating point."
        )


def _all_finite(grads):
    """Whether every gradient element is finite.

    A sum is non-finite whenever an element is, and XLA compiles a sum to
    one fast reduction where `all(isfinite(g))` materialises a boolean
    tensor first (measured 4x slower on CPU). Only a sum that overflows
    from finite elements (beyond 3e38) takes the exact, slower check.
    """
    total = ops.sum(ops.stack([transforms.flat_sum(g) for g in grads]))

    def exact():
        flags = [ops.all(ops.isfinite(g)) for g in grads]
        return ops.all(ops.stack(flags))

    return ops.cond(ops.isfinite(total), lambda: ops.array(True), exact)


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
