"""The gradient pipeline under a `tf.distribute` strategy.

A strategy with R replicas calls `apply` once per replica and micro-batch,
in replica context. The pipeline then runs in two halves, with one
`merge_call` per `apply` (the pattern of Keras's `LossScaleOptimizer`):

    replica context (each replica, no communication)
      the local half: finite check, G_r += g_r, Σ|g_r|², n_r += 1/R
      (with `sync_micro_batches` or `clip_micro_batches`: first one
      all-reduce of the micro-batch gradient, which replica 0 keeps)
    merge_call -> cross-replica context (once per apply)
      K == 1: one batched all-reduce of the gradients, then the update
      K >  1: run_if(last micro-batch of the cycle):
                read G, n, Σ|g|² (SyncOnRead SUM variables: the all-reduce)
                the update on the aggregate: clip and noise once, then the
                rule on every replica's copy via `strategy.extended.update`

The accumulators are `SyncOnRead` variables with SUM aggregation: a replica
writes its own copy without communication, a cross-replica read (and a
checkpoint) sees the sum, and restoring a sum onto R replicas stores 1/R of
it on each, so a mid-cycle checkpoint restores onto any replica count.
Weights, slots, counters and statistics stay mirrored and are written only
in cross-replica context with identical inputs, so replicas stay bitwise
identical.

Called in cross-replica context (gradients computed outside `strategy.run`,
e.g. with a `GradientTape` in the strategy's scope), `apply` treats them as
the global micro-batch gradient: one sample per micro-batch, written into
the first replica's sums. So it does in replica context when every replica
hands it the same tensors (captured from outside `strategy.run`), which
Keras's optimizers also apply once: a `merge_call` tells them apart from
per-replica gradients when the step is traced.

The optimizer is built in `strategy.scope()` (by `model.compile`, or
`optimizer.build`), or lazily by its first `apply` inside an eager
`strategy.run`, as Keras's are; not inside a traced one (`strategy_for_build`).
"""

import contextlib

import keras
import tensorflow as tf
from keras import initializers
from keras import ops

from keras_gradtools.backends import private_api
from keras_gradtools.backends import tensorflow as tf_backend
from keras_gradtools.pipeline import stages
from keras_gradtools.pipeline.hooks import LocalPlacement


def strategy_for_build(optimizer):
    """The non-default strategy in scope when `optimizer` is built, or
    `None`.

    Built in `strategy.scope()` (cross-replica context), or lazily by its
    first `apply` inside an eager `strategy.run`, as Keras's optimizers are:
    there the first replica creates every variable (mirrored, and the
    accumulators SyncOnRead) and the others find the optimizer built.

    Raises:
        ValueError: when first built inside a traced `strategy.run` (a
            `tf.function`), where variables created in replica context are
            initialized from a traced read of the first replica's copy, which
            fails at run time (Keras's optimizers too, with an
            `InvalidArgumentError` about a placeholder).
    """
    if not tf.distribute.has_strategy():
        return None
    in_replica = tf.distribute.in_cross_replica_context() is False
    if in_replica and not tf.executing_eagerly():
        raise ValueError(
            "This optimizer is being built by its first `apply` inside a "
            "traced `strategy.run` (a `tf.function`), where its variables "
            "cannot be created correctly. Build it before, inside "
            "`strategy.scope()`: `optimizer.build(model.trainable_variables)`"
            " (or use `model.compile` and `model.fit`, which do it), or make "
            "the first `strategy.run` eager."
        )
    return tf.distribute.get_strategy()


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
        colocate = strategy.extended.colocate_vars_with(tf_variable(reference))
    # Built lazily inside an eager `strategy.run`, the first replica creates
    # the variable for all, in the strategy already (whose scope cannot be
    # entered in replica context).
    scope = contextlib.nullcontext()
    if tf.distribute.in_cross_replica_context():
        scope = strategy.scope()
    with scope, colocate:
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
    private_api.track_variable(optimizer, variable)
    return variable


def tf_variable(variable):
    """The `tf.Variable` behind a `keras.Variable` (or a plain one)."""
    return variable.value if isinstance(variable, keras.Variable) else variable


def samples_per_micro_batch(pipeline):
    """R when each of R replicas' gradients is a separate sample of the
    micro-batch gradient (the default), 1 when every micro-batch gradient is
    summed over the replicas first (`sync_micro_batches`,
    `clip_micro_batches`)."""
    strategy = pipeline.hooks.strategy
    settings = pipeline.settings
    if settings.sync_micro_batches or settings.clip_micro_batches:
        return 1
    return strategy.num_replicas_in_sync


def apply(pipeline, grads, indices, weight=None):
    """Runs one micro-batch (of count `weight`, or `None`): the gradients
    `grads` of the variables `indices` (build order), under the strategy in
    scope."""
    strategy = tf.distribute.get_strategy()
    if pipeline.hooks.strategy is not strategy:
        raise ValueError(
            "This optimizer was built outside the scope of the strategy it "
            "is now used with. Create the model and compile (or call "
            "`optimizer.build(model.trainable_variables)`) inside "
            "`strategy.scope()`."
        )
    if pipeline.overwritten_indices:
        raise NotImplementedError(
            "Variables overwritten with their gradient (float8 scale "
            "factors) are not supported under a tf.distribute strategy yet: "
            "train them without a strategy, or on the JAX backend."
        )
    if tf.distribute.in_cross_replica_context():
        _refuse_weights(weight, "in cross-replica context")
        _apply_in_cross_replica_context(pipeline, strategy, grads, indices)
        return
    _apply_in_replica_context(pipeline, strategy, grads, indices, weight)


def _refuse_weights(weight, where):
    if weight is not None:
        raise NotImplementedError(
            "Counted micro-batches (`weighted_accumulation`, "
            f"`exact_accumulation`) are not supported {where} under a "
            "tf.distribute strategy yet: compute the gradients inside "
            "`strategy.run` (as `model.fit` does), without "
            "`sync_micro_batches` or `clip_micro_batches`."
        )


def _apply_in_replica_context(pipeline, strategy, grads, indices, weight):
    context = tf.distribute.get_replica_context()
    replicas = strategy.num_replicas_in_sync
    if _handed_to_every_replica(context, grads):
        _refuse_weights(weight, "for gradients shared by every replica")
        _apply_global_gradient(pipeline, context, grads, indices)
        return
    samples = samples_per_micro_batch(pipeline)
    if samples == 1:
        _refuse_weights(weight, "with micro-batches summed over replicas")
    settings = pipeline.settings
    if not pipeline.settings.accumulates:
        # Clipping each micro-batch acts on the sum over replicas, after
        # the all-reduce of the update.
        local = pipeline.local_half(grads, indices, clip=False, weight=weight)
        # With the replicas as samples, their squared norms go along for
        # the statistics (one more small all-reduce).
        statistics = samples > 1 and settings.track_gradient_statistics
        norms = local.norms if statistics else None
        grads = local.grads
        if settings.weighted_accumulation:
            # Each replica's h_r = R g_r, weighted: sum w_r h_r over the
            # replicas, divided by sum w_r after the all-reduce.
            weight = local.weight
            scale = weight * float(replicas)
            grads = [g * scale for g in grads]
            if norms is not None:
                norms = [n * (scale * float(replicas)) for n in norms]
            grads = grads + [tf.reshape(weight, [])]
        # One tensor object per replica, even where every replica was handed
        # the same one: `merge_call` would otherwise pass it on as a single
        # value, which the batched reduction does not take.
        grads = [tf.identity(g) for g in grads]
        context.merge_call(
            _update_from_replicas,
            args=(pipeline, grads, norms, indices),
        )
        return
    reduce, keeper = None, None
    if samples == 1:
        # Each micro-batch's global gradient (clipping one needs it): one
        # all-reduce per micro-batch, whose result replica 0 keeps.
        def reduce(values):
            # (tf.identity: see the K == 1 path above.)
            values = [tf.identity(v) for v in values]
            return context.all_reduce(tf.distribute.ReduceOp.SUM, values)

        keeper = ops.equal(context.replica_id_in_sync_group, 0)
    pipeline.local_half(
        grads,
        indices,
        count=1.0 / replicas,
        reduce=reduce,
        keeper=keeper,
        weight=weight,
    )
    context.merge_call(_finish_micro_batch, args=(pipeline, indices, samples))


def _handed_to_every_replica(context, grads):
    """Whether `grads` are the same tensors on every replica (captured from
    outside `strategy.run`, or passed to it as plain arguments): one global
    gradient, not one per replica.

    A `merge_call` passes on a value that every replica handed over as the
    same object as that object, and per-replica values as `PerReplica`; this
    is how Keras's optimizers (through `all_reduce`) take such a gradient
    once. It costs no communication: the answer is known when the step is
    traced (or, eagerly, on the host).

    Raises:
        ValueError: when some gradients are shared by every replica and
            others are not.
    """
    if len(context.strategy.extended.worker_devices) < 2:
        # One replica in this process (one device, or one per worker): a
        # value is trivially the same object on every local replica, and
        # other workers' tensors are not comparable. Each replica's own.
        return False
    shared = context.merge_call(
        lambda _, *values: [
            not isinstance(v, tf.distribute.DistributedValues) for v in values
        ],
        args=tuple(grads),
    )
    if shared and all(shared):
        return True
    if any(shared):
        raise ValueError(
            "`apply` inside `strategy.run` received gradients of which some "
            "are the same tensor on every replica (computed outside "
            "`strategy.run`, which counts once) and others are each "
            "replica's own (which are summed over the replicas). Compute all "
            "`grads` inside the replica function, or all outside it."
        )
    return False


def _apply_global_gradient(pipeline, context, grads, indices):
    """Gradients handed to every replica alike: the global micro-batch
    gradient, one sample per micro-batch, which replica 0 keeps (as when
    `apply` is called in cross-replica context)."""
    replicas = context.num_replicas_in_sync
    keeper = ops.equal(context.replica_id_in_sync_group, 0)
    accumulates = pipeline.settings.accumulates
    local = pipeline.local_half(
        grads,
        indices,
        count=1.0 / replicas,
        keeper=keeper,
        clip=accumulates,
    )
    if accumulates:
        context.merge_call(_finish_micro_batch, args=(pipeline, indices, 1))
        return
    # (Each replica's `where` of the keeper is its own tensor already.)
    context.merge_call(
        _update_from_replicas, args=(pipeline, local.grads, None, indices)
    )


def _apply_in_cross_replica_context(pipeline, strategy, grads, indices):
    """Gradients computed outside `strategy.run`: the global micro-batch
    gradient, one sample per micro-batch, which replica 0 keeps."""
    accumulates = pipeline.settings.accumulates

    def local(grads):
        context = tf.distribute.get_replica_context()
        keeper = ops.equal(context.replica_id_in_sync_group, 0)
        result = pipeline.local_half(
            grads,
            indices,
            count=1.0 / strategy.num_replicas_in_sync,
            keeper=keeper,
            clip=accumulates,
        )
        return None if accumulates else result.grads

    kept = strategy.run(local, args=(list(grads),))
    if accumulates:
        _finish_micro_batch(strategy, pipeline, indices, 1)
    else:
        _update_from_replicas(strategy, pipeline, kept, None, indices)


def _update_from_replicas(strategy, pipeline, grads, norms, indices):
    """K == 1: sums the replicas' gradients (one batched all-reduce), then
    updates from the global-batch gradient. With the replicas as samples,
    their squared norms are reduced with them, for the statistics."""
    variables = [pipeline.variables[i] for i in indices]

    def reduce(values, destinations):
        reduced_values = strategy.extended.batch_reduce_to(
            tf.distribute.ReduceOp.SUM,
            list(zip(values, destinations)),
        )
        return [
            strategy.experimental_local_results(r)[0] for r in reduced_values
        ]

    first = tf_variable(variables[0])
    destinations = [tf_variable(v) for v in variables]
    weighted = len(grads) > len(variables)
    if weighted:
        # The replicas' summed count rides in the same batched all-reduce.
        destinations.append(first)
    grads = reduce(grads, destinations)
    samples = samples_per_micro_batch(pipeline)
    norm_sums = None
    if norms is not None:
        norm_sums = reduce(norms, [first] * len(norms))
    weight_gate = None
    if weighted:
        total = grads.pop()
        weight_gate = ops.greater(total, 0.0)
        safe = ops.where(weight_gate, total, 1.0)
        grads = [g / safe for g in grads]
        if norm_sums is not None:
            replicas = float(strategy.num_replicas_in_sync)
            norm_sums = [q / (safe * replicas) for q in norm_sums]
    means = grads
    if pipeline.settings.clip_micro_batches:
        means, _ = pipeline.clip(means)
    gate = None
    if pipeline.settings.on_nonfinite == "skip":
        gate = stages.finite_check(means)
    if weight_gate is not None:
        gate = (
            weight_gate if gate is None else ops.logical_and(gate, weight_gate)
        )
    pipeline.update(
        means,
        indices,
        count=1.0,
        gate=gate,
        samples=samples if norms is not None else 1,
        norm_sums=norm_sums,
        placement=ReplicatedPlacement(strategy),
    )
    pipeline.accumulator.count_micro_step()


def _finish_micro_batch(strategy, pipeline, indices, samples):
    """K > 1: the replicas' sums are written; only the last micro-batch of
    a cycle reads them (the all-reduce) and updates."""
    accumulator = pipeline.accumulator
    first, last, steps = accumulator.cycle_flags()
    accumulator.record_samples(first, samples)
    tf_backend.run_if(
        last,
        lambda: pipeline.finish_cycle(indices, ReplicatedPlacement(strategy)),
    )
    accumulator.advance(first, last, steps)
    accumulator.count_micro_step()


class ReplicatedPlacement(LocalPlacement):
    """Applies the same (reduced, clipped, noised) gradient to every
    replica's copy of each variable: only the gradient moves, and equal
    inputs keep the replicas bitwise identical."""

    def __init__(self, strategy):
        self.strategy = strategy

    def update(self, variable, fn, args=()):
        """Calls `fn(copy, *args)` for every replica's copy of `variable`
        (in cross-replica context)."""
        self.strategy.extended.update(
            tf_variable(variable), fn, args=tuple(args), group=False
        )

    def apply_inner(self, apply, grads, variables):
        """A Keras optimizer's `apply` runs in replica context, where it sums
        the gradients over replicas. Hand it the final gradient on replica 0
        and zeros elsewhere: the sum is then that gradient, bitwise."""

        def apply_on_replica(grads):
            context = tf.distribute.get_replica_context()
            first = ops.equal(context.replica_id_in_sync_group, 0)
            grads = [ops.where(first, g, ops.zeros_like(g)) for g in grads]
            apply(grads, variables)

        self.strategy.extended.call_for_each_replica(
            apply_on_replica, args=(list(grads),)
        )
