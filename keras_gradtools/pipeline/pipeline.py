"""The pipeline: one micro-batch's way from `apply` to the weight update
(docs/design.md §1).

    apply(grads)                                   (optimizer.apply)
      local half    cast to float32; [clip each micro-batch]; squared norms
                    where something reads them; finite check; add to the
                    accumulator's sums (no communication under a strategy)
      global half   K = 1: update(g), gated by the finite check
                    K > 1: on the last micro-batch of the cycle (run_if):
                           update(G / n), then the count restarts
    update(g_bar)
      statistics    from |g_bar|**2 and the accumulator's Σ|g|²
      clip          value, per-tensor norm or global norm
      noise         + sigma_t * N(0, I), one draw per update
      rule          weight decay, `update_step`, EMA, constraints (the
                    optimizer's hook, `hooks.py`)
      iterations += 1
    all of update's writes are gated: a skipped update writes nothing.

The `Pipeline` owns the stages and their state (the accumulator, the
statistics, the noise seed) and asks its optimizer only for the hooks of
`hooks.py`. On one device (and on JAX, where `keras.distribution` shards
the arrays and XLA the computation) `run` does both halves. Under a
`tf.distribute` strategy `backends/tf_distribute.py` runs the local half
on each replica and the global half once, in cross-replica context, and
passes a placement that applies the rule to every replica's copy.
"""

from keras import ops

from keras_gradtools import transforms
from keras_gradtools.pipeline import stages
from keras_gradtools.pipeline.accumulator import GradientAccumulator
from keras_gradtools.pipeline.hooks import LOCAL
from keras_gradtools.pipeline.hooks import RuleUpdate
from keras_gradtools.pipeline.statistics import GradientStatistics
from keras_gradtools.transforms import sparse


class LocalHalf:
    """What the local half hands the global half: the float32 gradients,
    their squared norms (or `None`), whether they are finite (or `None`
    when nothing was checked) and the cycle flags `(first, last, steps)`."""

    def __init__(self, grads, norms, finite, flags, weight=None):
        self.grads = grads
        self.norms = norms
        self.finite = finite
        self.flags = flags
        # `None`, or the micro-batch's count, 0 where it was not usable.
        self.weight = weight

    @property
    def weighs(self):
        """`None`, or whether the count is above zero (a micro-batch of
        only padding moves nothing)."""
        if self.weight is None:
            return None
        return ops.greater(self.weight, 0.0)


def gated_assign(variable, value, gate):
    """`variable.assign(value)` where the scalar `gate` holds (always when
    it is `None`); elsewhere the variable keeps its value. A select, not a
    branch: it fuses into the update."""
    if gate is not None:
        value = ops.where(
            gate,
            ops.cast(value, variable.dtype),
            ops.convert_to_tensor(variable),
        )
    variable.assign(value)


def _and(a, b):
    """The conjunction of two optional scalar gates."""
    if a is None or b is None:
        return b if a is None else a
    return ops.logical_and(a, b)


class Pipeline:
    """The gradient pipeline of one optimizer: its stages, their state, and
    the one order they run in.

    Args:
        settings: The validated `PipelineSettings` (shared with the
            optimizer, which exposes them as its attributes).
        hooks: The optimizer's `UpdateRuleHooks` (see `hooks.py`).
        backend: The backend module (`keras_gradtools.backends.current()`).
    """

    def __init__(self, settings, hooks, backend):
        self.settings = settings
        self.hooks = hooks
        self.backend = backend
        self.clip = stages.Clip(settings)
        # Made by `build`: the model variables (in build order), the update
        # counter, what the rule reads, and the stages' state.
        self.variables = []
        self.iterations = None
        # The `tf.distribute` strategy the optimizer was built under.
        self.strategy = None
        self.reads_micro_variance = False
        self.accumulator = None
        self.statistics = None
        self.noise = None
        self.overwritten = []
        # Compiled functions of the backend, keyed by variable set.
        self.compiled = {}
        # Per-coordinate sums of squares for the statistics (histograms),
        # on top of the per-variable scalars: switched on by the monitor.
        self.per_coordinate_statistics = False

    # ------------------------------------------------------------------
    # State.

    def build(self, variables):
        """Creates the pipeline's state for the model `variables`."""
        settings = self.settings
        hooks = self.hooks
        self.variables = list(variables)
        self.iterations = hooks.iterations
        self.strategy = hooks.strategy
        self.reads_micro_variance = hooks.reads_micro_variance
        self.overwritten = [
            hooks.overwrites_with_gradient(v) for v in variables
        ]
        self.accumulator = GradientAccumulator(
            hooks.make_state,
            variables,
            self.overwritten,
            self.backend,
            max_steps=settings.max_accumulation_steps,
            steps=settings.accumulation_steps,
            square_sums=self.keeps_square_sums,
            square_norm_sums=settings.track_gradient_statistics,
            weighted=settings.weighted_accumulation,
        )
        if settings.noise:
            seed = hooks.make_state(
                "noise_seed", dtype="int32", initial=settings.noise_seed
            )
            shapes = [tuple(v.shape) for v in variables]
            self.noise = stages.Noise(settings, seed, shapes)
        if settings.track_gradient_statistics:
            self.statistics = GradientStatistics(
                hooks.make_state, len(variables)
            )

    @property
    def built(self):
        return self.accumulator is not None

    @property
    def keeps_square_sums(self):
        """Whether the per-coordinate Σg² is kept: for a rule that reads
        the within-update variance, or per-coordinate statistics."""
        reads = (
            self.reads_micro_variance
            if self.built
            else self.hooks.reads_micro_variance
        )
        return self.settings.accumulates and (
            reads or self.per_coordinate_statistics
        )

    @property
    def overwritten_indices(self):
        """The indices of the variables Keras overwrites with their
        gradient (float8 scales)."""
        return [i for i, flag in enumerate(self.overwritten) if flag]

    def enable_statistics(self, per_coordinate=False):
        """Switches the statistics on (see the optimizer's
        `enable_gradient_statistics`); creates the missing state when
        built. Returns nothing."""
        settings = self.settings
        if settings.track_gradient_statistics and (
            self.keeps_square_sums or not per_coordinate
        ):
            return
        was_tracking = settings.track_gradient_statistics
        settings.track_gradient_statistics = True
        had_square_sums = self.keeps_square_sums
        self.per_coordinate_statistics |= bool(per_coordinate)
        if not self.built:
            return
        variables = self.variables
        accumulator = self.accumulator
        if not was_tracking:
            self.statistics = GradientStatistics(
                self.hooks.make_state, len(variables)
            )
        if not self.settings.accumulates:
            return
        position = int(ops.convert_to_numpy(accumulator.position))
        if not had_square_sums and self.keeps_square_sums:
            accumulator.add_square_sums(variables)
            if position:
                accumulator.cycle_samples.assign(-1)
        if not was_tracking:
            accumulator.add_square_norm_sums(len(variables))
            if had_square_sums:
                accumulator.complete_square_norm_sums()
            elif position:
                accumulator.cycle_samples.assign(-1)

    def samples_per_micro_batch(self):
        """Gradient samples per micro-batch: R when each of R replicas'
        gradients is a sample of its own, else 1."""
        if self.hooks.strategy is None:
            return 1
        from keras_gradtools.backends import tf_distribute

        return tf_distribute.samples_per_micro_batch(self)

    def check_restored_cycle(self):
        """Raises a `ValueError` if restored state is in the middle of a
        cycle whose sums of squares came from another number of replicas
        than this pipeline's."""
        accumulator = self.accumulator
        if accumulator.cycle_samples is None or not accumulator.square_sums:
            return
        position = int(ops.convert_to_numpy(accumulator.position))
        saved = int(ops.convert_to_numpy(accumulator.cycle_samples))
        now = self.samples_per_micro_batch()
        if position and saved != now:
            raise ValueError(
                f"This state was saved {position} micro-batches into an "
                f"accumulation cycle whose sums of squares came from {saved} "
                f"replica(s); here they would come from {now}. Samples of "
                "two batch sizes cannot be combined into one variance. "
                "Restore onto the same number of replicas, or save at a "
                "cycle boundary."
            )

    # ------------------------------------------------------------------
    # One device.

    def run(self, grads, indices, weight=None, state=()):
        """Consumes one micro-batch on one device.

        Args:
            grads: The micro-batch gradients of the variables `indices`.
            indices: The variables' indices in build order.
            weight: With `weighted_accumulation`, the micro-batch's count.
            state: Every variable an update may read or write (the
                optimizer's and the model's): the JAX backend threads their
                values through the branch that updates.
        """
        grads, indices = self.overwrite_with_gradients(grads, indices)
        local = self.local_half(grads, indices, weight=weight)
        if not self.settings.accumulates:
            self.update(
                local.grads,
                indices,
                count=1.0,
                gate=_and(local.finite, local.weighs),
                mean_norms=local.norms,
                state=state,
            )
        else:
            first, last, steps = local.flags
            self.accumulator.record_samples(first, 1)
            self.backend.run_if(
                last,
                lambda: self.finish_cycle(indices, state=state),
                list(state),
            )
            self.accumulator.advance(first, last, steps)
        self.accumulator.count_micro_step()

    def overwrite_with_gradients(self, grads, indices):
        """Takes out the variables Keras overwrites with their gradient
        (float8 scales): without accumulation they are overwritten now; with
        it, the cycle's maximum is kept and written by the update. Returns
        the other gradients and their indices."""
        flags = self.overwritten
        overwritten = [(g, i) for g, i in zip(grads, indices) if flags[i]]
        if overwritten:
            if self.settings.accumulates:
                first = self.accumulator.cycle_flags()[0]
                self.accumulator.add_maxima(*zip(*overwritten), first)
            else:
                for grad, i in overwritten:
                    self.variables[i].assign(grad)
        kept = [(g, i) for g, i in zip(grads, indices) if not flags[i]]
        return [g for g, _ in kept], [i for _, i in kept]

    # ------------------------------------------------------------------
    # The halves.

    def local_half(
        self,
        grads,
        indices,
        count=1.0,
        samples=1,
        reduce=None,
        keeper=None,
        clip=True,
        weight=None,
    ):
        """Casts, checks and accumulates one micro-batch.

        Args:
            grads: The micro-batch gradients of the variables `indices`.
            indices: The variables' indices in build order.
            count: What a finite micro-batch adds to the cycle count (1/R on
                each of R replicas).
            samples: Gradient samples per micro-batch (see `accumulator`).
            reduce: Optional function summing the gradients over replicas
                before anything else (`sync_micro_batches`).
            keeper: Optional scalar: where false, this replica's copy of an
                already summed gradient adds nothing (and counts no skip),
                so that the sums over replicas hold it once.
            clip: Whether `clip_micro_batches` may clip here (not on a
                replica's share of a gradient that is summed later).
            weight: With `weighted_accumulation`, the micro-batch's count
                (a float32 scalar, as `apply` passes it). A count that is
                not finite or below zero is refused like a non-finite
                gradient, and weighs 0.

        Returns:
            A `LocalHalf`.
        """
        settings = self.settings
        accumulator = self.accumulator
        grads = [
            sparse.map_values(g, lambda x: ops.cast(x, "float32"))
            for g in grads
        ]
        if reduce is not None:
            grads = reduce(grads)
        if settings.clip_micro_batches and clip:
            grads, _ = self.clip(grads)
        norms = None
        if self._reads_micro_batch_norms and grads:
            norms = transforms.square_norms(
                [sparse.values_of(g) for g in grads]
            )
        finite = None
        usable = None
        if settings.weighted_accumulation:
            usable = ops.logical_and(
                ops.isfinite(weight), ops.greater_equal(weight, 0.0)
            )
            weight = ops.where(usable, weight, 0.0)
        if settings.on_nonfinite == "skip" and grads:
            finite = stages.finite_check(grads, partial_sums=norms)
            if usable is not None:
                finite = ops.logical_and(finite, usable)
            accumulator.count_skipped(finite, keeper)
        if keeper is not None:
            grads = [ops.where(keeper, g, ops.zeros_like(g)) for g in grads]
            if norms is not None:
                norms = [ops.where(keeper, n, ops.zeros_like(n)) for n in norms]
        flags = None
        if self.settings.accumulates:
            flags = accumulator.cycle_flags()
            accumulator.add(
                grads,
                indices,
                flags[0],
                finite,
                norms=norms,
                count=count,
                weight=weight,
            )
        return LocalHalf(grads, norms, finite, flags, weight)

    @property
    def _reads_micro_batch_norms(self):
        """Whether anything reads the micro-batch gradients' squared norms:
        the statistics' sums, or (without accumulation) the clip or the
        statistics of the update itself. The finite check then reads them
        too instead of summing the gradients once more."""
        if self.settings.accumulates:
            return self.accumulator.square_norm_sums is not None
        return self._update_reads_norms

    def finish_cycle(self, indices, placement=LOCAL, state=()):
        """The update at the end of a cycle, from the accumulated sums.

        Under a strategy this runs in cross-replica context, where reading a
        sum adds up the replicas' copies. `state` is as in `run`.
        """
        accumulator = self.accumulator
        sums = accumulator.read_cycle(
            indices, self.reads_micro_variance, whole_count=placement is LOCAL
        )
        count, means, samples, valid = (
            sums.count,
            sums.means,
            sums.samples,
            sums.valid,
        )
        mean_squares = sums.mean_squares
        if mean_squares is not None:
            mean_squares = self._checked_mean_squares(
                mean_squares, means, valid
            )
        for i in self.overwritten_indices:
            self.variables[i].assign(accumulator.maxima(i))
        if not indices:
            accumulator.finish()
            return
        # The update's squared norms, computed once: the finite check of
        # the sums reads them too instead of summing the means again.
        mean_norms = None
        if self._update_reads_norms:
            mean_norms = transforms.square_norms(means)
        gate = None
        if self.settings.on_nonfinite == "skip":
            # Finite micro-batches can still sum beyond float32's range
            # (two of 3e38): such a cycle is left out like a non-finite
            # micro-batch, and counted as one where the count is local.
            # Checked on the update's norms where it reads them, else on
            # the sums where that is the same: a check of the means would
            # make XLA write every mean out once for its two readers, the
            # check and the update, instead of computing it inside the
            # update (22 kernels fewer for 20 tensors, K=4 "macro",
            # `benchmarks/compiled_kernels.py`).
            checked = means
            if mean_norms is None and sums.sums is not None:
                checked = sums.sums
            sums_finite = stages.finite_check(checked, partial_sums=mean_norms)
            if placement is LOCAL:
                accumulator.count_skipped(
                    sums_finite, counted=ops.greater(count, 0)
                )
            gate = ops.logical_and(ops.greater(count, 0), sums_finite)
        self.update(
            means,
            indices,
            count=count,
            gate=gate,
            mean_norms=mean_norms,
            samples=samples,
            norm_sums=sums.norm_sums,
            mean_squares=mean_squares,
            valid=valid,
            placement=placement,
            state=state,
        )
        accumulator.finish()

    def _checked_mean_squares(self, mean_squares, means, valid):
        """Sums of squares begun at another batch size (a checkpoint restored
        mid-cycle onto another number of replicas) form no variance. A
        TensorFlow graph fails with that message; eagerly, under XLA (which
        drops assertions) and on JAX, that one update takes the variance as
        zero (the "macro" second moment)."""
        check = self.backend.assert_in_graph(
            valid,
            "The accumulation cycle was begun on a different number of "
            "replicas (a checkpoint restored in the middle of a cycle onto "
            "another strategy); its sums of squares cannot be combined. "
            "Restore at a cycle boundary or onto the same number of "
            "replicas.",
        )
        if check is None:
            return [
                ops.where(valid, q, ops.square(g))
                for q, g in zip(mean_squares, means)
            ]
        return self.backend.after(
            check, lambda: [ops.copy(q) for q in mean_squares]
        )

    def update(
        self,
        means,
        indices,
        count,
        gate,
        mean_norms=None,
        samples=1,
        norm_sums=None,
        mean_squares=None,
        valid=True,
        placement=LOCAL,
        state=(),
    ):
        """One optimizer update from the cycle's mean gradients.

        Args:
            means: `g_bar` per variable (float32).
            indices: The variables' indices.
            count: The micro-batches in the mean.
            gate: `None`, or a scalar: the update takes effect only where it
                holds (a non-finite gradient without accumulation, or a
                cycle of only non-finite micro-batches).
            mean_norms: `|g_bar|**2` per variable, if already computed.
            samples: Gradient samples per micro-batch (the statistics).
            norm_sums: The accumulator's Σ|g|² per variable, or `None`.
            mean_squares: The mean squares per coordinate, for rules that
                read the within-update variance (Adam "micro").
            valid: Whether the sums form one cycle at one batch size.
            placement: Where the rule writes (`LOCAL`, or every replica).
            state: As in `run`, for a rule that branches on `gate`.
        """
        if not indices:
            return
        settings = self.settings
        hooks = self.hooks
        if mean_norms is None and self._update_reads_norms:
            mean_norms = transforms.square_norms(means)
        measured = None
        if self.statistics is not None:
            measured = self.statistics.measure(
                mean_norms, norm_sums, count, samples, indices, valid
            )
        if settings.clip_micro_batches:
            clipped, factors = means, [None] * len(means)
        else:
            clipped, factors = self.clip(means, mean_norms)
        sigma = None
        if self.noise is not None:
            sigma = self.noise.std_at(self.iterations)
            clipped = self.noise(clipped, indices, self.iterations, sigma)
        variances = [None] * len(means)
        if mean_squares is not None:
            # W at the micro-batch size: samples at 1/R of it vary R times
            # as much.
            per_sample = ops.divide(1.0, ops.cast(samples, "float32"))
            variances = [
                ops.multiply(
                    transforms.micro_batch_variance(q, g),
                    per_sample if c is None else per_sample * ops.square(c),
                )
                for q, g, c in zip(mean_squares, means, factors)
            ]
        accumulator = self.accumulator
        update = RuleUpdate(
            gradients=clipped,
            variables=[self.variables[i] for i in indices],
            variances=variances,
            gate=gate,
            placement=placement,
            iterations=self.iterations,
            learning_rate_factor=(
                accumulator.learning_rate_factor
                if settings.accumulates
                else None
            ),
            cycle_steps=(
                accumulator.current_cycle_steps() if settings.accumulates else 1
            ),
            micro_steps=accumulator.micro_steps,
            initial_steps=settings.accumulation_steps,
            state=state,
        )
        hooks.apply_rule(update)

        def write(variable, value):
            gated_assign(variable, value, gate)

        if measured is not None:
            self.statistics.record(write, measured, sigma)
        iterations = self.iterations
        write(
            iterations,
            ops.add(
                ops.convert_to_tensor(iterations),
                ops.ones((), iterations.dtype),
            ),
        )

    @property
    def _update_reads_norms(self):
        return self.settings.track_gradient_statistics or stages.needs_norms(
            self.settings
        )
