"""The gradient pipeline under a `tf.distribute` strategy (DESIGN.md §5).

A strategy with R replicas calls `apply` once per replica and micro-batch,
in replica context. The pipeline then runs in two halves, with one
`merge_call` per `apply` (the pattern of Keras's `LossScaleOptimizer`):

    replica context (each replica, no communication)
      finite check, G_r += g_r, S_r += g_r**2, n_r += 1/R
    merge_call -> cross-replica context (once per apply)
      K == 1: one batched all-reduce of the gradients, then `_update`
      K >  1: run_if(last micro-batch of the cycle):
                read G, S, n (SyncOnRead SUM variables: the all-reduce)
                `_update` on the aggregate: clip and noise once, then the
                rule on every replica's copy via `strategy.extended.update`

The accumulators are `SyncOnRead` variables with SUM aggregation: a replica
writes its own copy without communication, a cross-replica read (and a
checkpoint) sees the sum, and restoring a sum onto R replicas stores 1/R of
it on each, so a mid-cycle checkpoint restores onto any replica count.
Weights, slots, counters and statistics stay mirrored and are written only
in cross-replica context with identical inputs, so replicas stay bitwise
identical.

Only the TensorFlow backend has strategies; elsewhere every function here
reports "no strategy".
"""

import contextlib

import keras
from keras import backend
from keras import initializers
from keras import ops

from keras_gradtools.optimizers import gradient_checks
from keras_gradtools.optimizers.control_flow import run_if

# The cycle counter counts global micro-batches in units of 1 / COUNT_UNIT:
# each of R replicas adds COUNT_UNIT // R per finite micro-batch, exactly.
# COUNT_UNIT = lcm(1..16) * 2**16 = 45045 * 2**20: every R up to 16, every
# power of two up to 2**20 and products such as 24 or 48 divide it.
COUNT_UNIT = 720720 * 2**16


def active_strategy():
    """The strategy in scope (or whose replica function is running), or
    `None` for the default, single-device one."""
    if backend.backend() != "tensorflow":
        return None
    import tensorflow as tf

    if not tf.distribute.has_strategy():
        return None
    return tf.distribute.get_strategy()


def in_replica_context_of_strategy():
    """Whether `apply` was called inside `strategy.run` (or `model.fit`)
    of a non-default strategy."""
    if active_strategy() is None:
        return False
    import tensorflow as tf

    return tf.distribute.get_replica_context() is not None


def cross_replica_strategy():
    """The strategy when in its cross-replica context (inside the pipeline's
    `merge_call`), else `None`."""
    strategy = active_strategy()
    if strategy is None:
        return None
    import tensorflow as tf

    return strategy if tf.distribute.in_cross_replica_context() else None


def count_increment(replicas):
    """What one replica adds to the cycle counter per finite micro-batch.

    Raises:
        ValueError: for a replica count that does not divide `COUNT_UNIT`.
    """
    if COUNT_UNIT % replicas:
        raise ValueError(
            f"keras_gradtools cannot accumulate over {replicas} replicas: "
            "the number of replicas in sync must divide 720720 * 2**16 "
            "(every count up to 16, powers of two up to 2**20, and products "
            f"of those such as 24, 48 or 96). Received: {replicas} replicas."
        )
    return COUNT_UNIT // replicas


def counted_micro_batches(units):
    """The cycle counter in global micro-batches, as float32 without
    float64 (TPUs have none): exact for whole counts below 2**24."""
    units = ops.convert_to_tensor(units)
    whole = ops.cast(ops.floor_divide(units, COUNT_UNIT), "float32")
    part = ops.cast(ops.mod(units, COUNT_UNIT), "float32")
    return whole + part / float(COUNT_UNIT)


def add_local_variable(optimizer, strategy, shape, dtype, name, reference):
    """Creates a per-replica accumulator (SyncOnRead, SUM) on `optimizer`.

    Args:
        optimizer: The optimizer that tracks the variable.
        strategy: The strategy whose replicas get a copy each.
        shape: The variable's shape.
        dtype: Its dtype.
        name: Its name.
        reference: A model variable to place it with, or `None`.

    Returns:
        A `keras.Variable`, tracked by `optimizer` (so saved with it).
    """
    colocate = contextlib.nullcontext()
    if reference is not None:
        colocate = strategy.extended.colocate_vars_with(
            getattr(reference, "value", reference)
        )
    with strategy.scope(), colocate:
        with keras.name_scope(optimizer.name, caller=optimizer):
            variable = keras.Variable(
                initializer=initializers.Zeros(),
                shape=shape,
                dtype=dtype,
                trainable=False,
                aggregation="sum",
                synchronization="on_read",
                name=name,
            )
    optimizer._track_variable(variable)
    return variable


class CrossReplicaPipelineMixin:
    """The replica-context and cross-replica halves of the pipeline, for
    `GradientPipelineOptimizer` (not used on its own)."""

    def _apply_across_replicas(self, grads, variables):
        import tensorflow as tf

        context = tf.distribute.get_replica_context()
        strategy = active_strategy()
        if self._strategy is not strategy:
            raise ValueError(
                "This optimizer was built outside the scope of the strategy "
                "it is now used with. Create the model and compile (or call "
                "`optimizer.build(model.trainable_variables)`) inside "
                "`strategy.scope()`."
            )
        with keras.name_scope(self.name, caller=self):
            grads = [ops.cast(g, "float32") for g in grads]
            if self.accumulation_steps == 1:
                self._check_finite(grads)
                squares = None
                if self._samples_replicas and self.track_gradient_statistics:
                    squares = [ops.square(g) for g in grads]
                context.merge_call(
                    self._update_across_replicas,
                    args=(grads, squares, variables),
                )
                return
            if self.clip_micro_batches:
                # Clipping a micro-batch needs its global gradient: one
                # all-reduce per micro-batch. Replica 0 then keeps the sums
                # and counts what it skips; every replica counts the rest.
                grads = context.all_reduce(tf.distribute.ReduceOp.SUM, grads)
                grads, _ = self._clip(grads)
                keeper = ops.equal(context.replica_id_in_sync_group, 0)
                finite = self._check_finite(grads, counted=keeper)
                grads = [ops.where(keeper, g, ops.zeros_like(g)) for g in grads]
            else:
                finite = self._check_finite(grads)
            position = ops.mod(self._micro_steps, self.accumulation_steps)
            self._accumulate(
                grads,
                variables,
                finite,
                ops.equal(position, 0),
                count_increment(strategy.num_replicas_in_sync),
            )
            context.merge_call(self._step_across_replicas, args=(variables,))

    @property
    def _samples_replicas(self):
        """Whether the replicas' gradients are separate samples of the
        gradient for the variance (unless each micro-batch is all-reduced
        first, as `clip_micro_batches` needs)."""
        return (
            self._strategy is not None
            and self._strategy.num_replicas_in_sync > 1
            and not self.clip_micro_batches
        )

    @property
    def _sample_replicas(self):
        """R when each replica's gradient is a separate sample, else 1."""
        if not self._samples_replicas:
            return 1
        return self._strategy.num_replicas_in_sync

    def _update_across_replicas(self, strategy, grads, squares, variables):
        """K == 1: sums the replicas' gradients (one batched all-reduce),
        then updates from the global-batch gradient."""
        import tensorflow as tf

        def reduce(values):
            reduced = strategy.extended.batch_reduce_to(
                tf.distribute.ReduceOp.SUM,
                [(value, v.value) for value, v in zip(values, variables)],
            )
            return [strategy.experimental_local_results(r)[0] for r in reduced]

        means = reduce(grads)
        mean_squares = None
        if squares is not None:
            replicas = strategy.num_replicas_in_sync
            mean_squares = [
                ops.multiply(q, float(replicas)) for q in reduce(squares)
            ]
        if self.clip_micro_batches:
            means, _ = self._clip(means)
        gate = None
        if self.on_nonfinite == "skip":
            gate = gradient_checks.all_finite(means)
        self._update(
            means,
            variables,
            mean_squares,
            1.0,
            gate=gate,
            sample_replicas=self._sample_replicas,
        )
        self._micro_steps.assign_add(1)

    def _step_across_replicas(self, strategy, variables):
        """K > 1: the replicas' sums are written; only the last micro-batch
        of a cycle reads them (the all-reduce) and updates."""
        position = ops.mod(self._micro_steps, self.accumulation_steps)
        self._record_cycle_replicas(ops.equal(position, 0))
        run_if(
            ops.equal(position, self.accumulation_steps - 1),
            lambda: self._finish_cycle(variables, self._sample_replicas),
        )
        self._micro_steps.assign_add(1)

    def _apply_rule_across_replicas(
        self, strategy, grads, variables, micro_variances
    ):
        """Each replica applies the same (reduced, clipped, noised) gradient
        to its own copy of each variable: only the gradient moves, and equal
        inputs keep the replicas bitwise identical."""
        learning_rate = self.learning_rate

        def rule(variable, grad, variance):
            self._decay_weight(variable, learning_rate)
            self.update_step(
                grad, variable, learning_rate, micro_batch_variance=variance
            )

        for grad, variable, variance in zip(grads, variables, micro_variances):
            strategy.extended.update(
                variable.value, rule, args=(grad, variance), group=False
            )
        if self.use_ema:
            self._update_moving_averages()
