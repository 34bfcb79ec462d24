"""The cycle driver: one micro-batch through the pipeline (docs/design.md §1).

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
      rule          weight decay, `update_step`, constraints, EMA
      iterations += 1

On one device (and on JAX, where `keras.distribution` shards the arrays
and XLA the computation) `run` does both halves. Under a `tf.distribute`
strategy `backends/tf_distribute.py` runs the local half on each replica
and the global half once, in cross-replica context, and passes a
`placement` that applies the rule to every replica's copy.
"""

from keras import ops

from keras_gradtools import transforms
from keras_gradtools.transforms import sparse


class LocalPlacement:
    """Applies the update rule to the variables themselves (one device, or
    JAX arrays sharded by `keras.distribution`)."""

    def apply_rule(self, optimizer, grads, variables, variances):
        optimizer._apply_rule(grads, variables, variances)


LOCAL = LocalPlacement()


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


def _and(a, b):
    """The conjunction of two optional scalar gates."""
    if a is None or b is None:
        return b if a is None else a
    return ops.logical_and(a, b)


class CycleDriver:
    """Runs the pipeline of `optimizer`, whose parts it reads: the
    accumulator, the statistics, the clipping and noise settings and the
    update rule."""

    def __init__(self, optimizer):
        self.optimizer = optimizer

    @property
    def accumulator(self):
        return self.optimizer._accumulator

    # ------------------------------------------------------------------
    # One device.

    def run(self, grads, variables, weight=None):
        """Consumes one micro-batch on one device (`weight`: its count,
        with `weighted_accumulation`)."""
        indices = [self.optimizer._variable_index(v) for v in variables]
        grads, indices = self.overwrite_with_gradients(grads, indices)
        local = self.local_half(grads, indices, weight=weight)
        if not self.accumulator.accumulates:
            self.update(
                local.grads,
                indices,
                count=1.0,
                gate=_and(local.finite, local.weighs),
                mean_norms=local.norms,
            )
        else:
            first, last, steps = local.flags
            self.accumulator.record_samples(first, 1)
            self.optimizer._backend.run_if(
                last,
                lambda: self.finish_cycle(indices),
                self.optimizer._state_variables(),
            )
            self.accumulator.advance(first, last, steps)
        self.accumulator.count_micro_step()

    def overwrite_with_gradients(self, grads, indices):
        """Takes out the variables Keras overwrites with their gradient
        (float8 scales): without accumulation they are overwritten now; with
        it, the cycle's maximum is kept and written by the update. Returns
        the other gradients and their indices."""
        optimizer = self.optimizer
        flags = optimizer._overwrite_flags
        overwritten = [(g, i) for g, i in zip(grads, indices) if flags[i]]
        if overwritten:
            if self.accumulator.accumulates:
                first = self.accumulator.cycle_flags()[0]
                self.accumulator.add_maxima(*zip(*overwritten), first)
            else:
                for grad, i in overwritten:
                    optimizer._trainable_variable(i).assign(grad)
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
        optimizer = self.optimizer
        accumulator = self.accumulator
        grads = [
            sparse.map_values(g, lambda x: ops.cast(x, "float32"))
            for g in grads
        ]
        if reduce is not None:
            grads = reduce(grads)
        if optimizer.clip_micro_batches and clip:
            grads, _ = optimizer._clip(grads)
        norms = None
        if self._reads_micro_batch_norms and grads:
            norms = transforms.square_norms(
                [sparse.values_of(g) for g in grads]
            )
        finite = None
        usable = None
        if optimizer.weighted_accumulation:
            usable = ops.logical_and(
                ops.isfinite(weight), ops.greater_equal(weight, 0.0)
            )
            weight = ops.where(usable, weight, 0.0)
        if optimizer.on_nonfinite == "skip" and grads:
            finite = transforms.all_finite(
                [sparse.values_of(g) for g in grads], partial_sums=norms
            )
            if usable is not None:
                finite = ops.logical_and(finite, usable)
            accumulator.count_skipped(finite, keeper)
        if keeper is not None:
            grads = [ops.where(keeper, g, ops.zeros_like(g)) for g in grads]
            if norms is not None:
                norms = [ops.where(keeper, n, ops.zeros_like(n)) for n in norms]
        flags = None
        if accumulator.accumulates:
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
        optimizer = self.optimizer
        if self.accumulator.accumulates:
            return self.accumulator.square_norm_sums is not None
        return optimizer.track_gradient_statistics or (
            transforms.needs_square_norms(
                optimizer.clipnorm, optimizer.global_clipnorm
            )
            and not optimizer.clip_micro_batches
        )

    def finish_cycle(self, indices, placement=LOCAL):
        """The update at the end of a cycle, from the accumulated sums.

        Under a strategy this runs in cross-replica context, where reading a
        sum adds up the replicas' copies.
        """
        optimizer = self.optimizer
        accumulator = self.accumulator
        count = accumulator.total_count()
        means = accumulator.means(indices, count)
        samples, valid = accumulator.cycle_samples_and_validity()
        norm_sums = accumulator.norm_sums(indices, count, samples)
        mean_squares = None
        if optimizer._reads_micro_variance:
            mean_squares = accumulator.mean_squares(indices, count, samples)
            mean_squares = self._checked_mean_squares(
                mean_squares, means, valid
            )
        for i in optimizer._overwritten_indices:
            optimizer._trainable_variable(i).assign(accumulator.maxima(i))
        if not indices:
            accumulator.finish()
            return
        # The update's squared norms, computed once: the finite check of
        # the sums reads them too instead of summing the means again.
        mean_norms = None
        if self._update_reads_norms:
            mean_norms = transforms.square_norms(means)
        gate = None
        if optimizer.on_nonfinite == "skip":
            # Finite micro-batches can still sum beyond float32's range
            # (two of 3e38): such a cycle is left out like a non-finite
            # micro-batch, and counted as one where the count is local.
            sums_finite = transforms.all_finite(means, partial_sums=mean_norms)
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
            norm_sums=norm_sums,
            mean_squares=mean_squares,
            valid=valid,
            placement=placement,
        )
        accumulator.finish()

    def _checked_mean_squares(self, mean_squares, means, valid):
        """Sums of squares begun at another batch size (a checkpoint restored
        mid-cycle onto another number of replicas) form no variance. A
        TensorFlow graph fails with that message; eagerly, under XLA (which
        drops assertions) and on JAX, that one update takes the variance as
        zero (the "macro" second moment)."""
        check = self.optimizer._backend.assert_in_graph(
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
        import tensorflow as tf

        with tf.control_dependencies([check]):
            return [ops.copy(q) for q in mean_squares]

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
        """
        optimizer = self.optimizer
        if not indices:
            return
        if mean_norms is None and self._update_reads_norms:
            mean_norms = transforms.square_norms(means)
        measured = None
        if optimizer.track_gradient_statistics:
            measured = optimizer._statistics.measure(
                mean_norms, norm_sums, count, samples, indices, valid
            )
        if optimizer.clip_micro_batches:
            clipped, factors = means, [None] * len(means)
        else:
            clipped, factors = optimizer._clip(means, mean_norms)
        sigma = None
        if optimizer.noise_eta > 0:
            sigma = optimizer._noise_std_at(optimizer._iterations_variable)
            clipped = optimizer._add_noise(clipped, indices, sigma)
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
        variables = [optimizer._trainable_variable(i) for i in indices]

        def write():
            placement.apply_rule(optimizer, clipped, variables, variances)
            if measured is not None:
                optimizer._statistics.record(optimizer, measured, sigma)
            optimizer.assign_add(
                optimizer._iterations_variable,
                ops.ones((), optimizer._iterations_variable.dtype),
            )

        optimizer._run_gated(gate, write)

    @property
    def _update_reads_norms(self):
        optimizer = self.optimizer
        return optimizer.track_gradient_statistics or (
            transforms.needs_square_norms(
                optimizer.clipnorm, optimizer.global_clipnorm
            )
            and not optimizer.clip_micro_batches
        )
