"""Trains under MirroredStrategy on logical CPUs and reports what it finds.

Logical devices must be configured before TensorFlow starts, so the tests
run this in a fresh process. It makes 3 logical CPUs and, for each
configuration, trains the same model on the same global batches on one
device and under a strategy over 2 or 3 of them, then prints one JSON line
per check:

    python mirrored_runs.py CHECK[,CHECK...] OUT_DIR

with CHECK one of equality (2 replicas), equality3 (3 replicas), estimator,
save_mid_cycle, restore (onto 1 and 2 replicas), restore3, monitor,
clip_after_sum, keras_contract. One
process runs one replica count besides 1: collective groups of different
sizes do not mix in a process.

- equality: max |w_strategy - w_single|, whether every mirrored model and
  optimizer variable is bitwise identical on every replica, and the update
  counts, for every optimizer x K x (custom loop, fit).
- estimator: Adam "micro" and the statistics against a float64 NumPy
  computation from the per-replica gradients (docs/design.md §5).
- save_mid_cycle, restore, restore3: save in the middle of a cycle on 2
  replicas, restore onto 1, 2 and 3, finish, compare with an uninterrupted
  run.
- monitor: GradientVarianceMonitor in fit under the strategy.
- keras_contract: what Keras's optimizers accept (plain tf.Variables,
  gradients from outside `strategy.run`, in cross-replica context or
  captured by every replica, a lazy build in an eager `strategy.run`,
  constraints), against one device and against Keras's SGD; the refusal
  to build inside a traced `strategy.run`; AdaptiveAccumulation.
"""

import functools
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import tensorflow as tf  # noqa: E402

tf.config.set_logical_device_configuration(
    tf.config.list_physical_devices("CPU")[0],
    [tf.config.LogicalDeviceConfiguration()] * 3,
)

import keras  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import numpy_reference as reference  # noqa: E402

import keras_gradtools as kg  # noqa: E402
from scripts.distributed_common import EQUALITY2_CASES  # noqa: E402
from scripts.distributed_common import custom_loop  # noqa: E402
from scripts.distributed_common import data  # noqa: E402
from scripts.distributed_common import make_model  # noqa: E402
from scripts.distributed_common import make_optimizer  # noqa: E402
from scripts.distributed_common import report  # noqa: E402

_STRATEGIES = {}


def strategy_over(replicas):
    """One strategy per replica count and process: collective groups of
    different sizes do not mix in one process, so the 2- and 3-replica
    checks run in separate processes."""
    if replicas == 1:
        return tf.distribute.get_strategy()
    if replicas not in _STRATEGIES:
        _STRATEGIES[replicas] = tf.distribute.MirroredStrategy(
            [f"/cpu:{i}" for i in range(replicas)]
        )
    return _STRATEGIES[replicas]


def train(replicas, kind, k, mode, x, y, global_batch, **overrides):
    strategy = strategy_over(replicas)
    with strategy.scope():
        model = make_model()
        optimizer = make_optimizer(kind, k, **overrides)
        if mode == "fit":
            model.compile(optimizer=optimizer, loss="mse", jit_compile=False)
        else:
            optimizer.build(model.trainable_variables)
    grads = None
    if mode == "fit":
        model.fit(
            x, y, batch_size=global_batch, epochs=1, shuffle=False, verbose=0
        )
    else:
        grads = custom_loop(
            strategy, model, optimizer, x, y, global_batch
        ).grads
    return strategy, model, optimizer, grads


def differing_replicas(strategy, model, optimizer):
    """Paths of mirrored variables whose copies are not bitwise equal."""
    differing = []
    for variable in list(model.variables) + list(optimizer.variables):
        value = getattr(variable, "value", variable)
        if "SyncOnRead" in type(value).__name__:
            continue  # per-replica partial sums, by design
        copies = [
            np.asarray(c).tobytes()
            for c in strategy.experimental_local_results(value)
        ]
        if len(set(copies)) > 1:
            differing.append(getattr(variable, "path", variable.name))
    return differing


def max_difference(a, b):
    return max(
        float(np.max(np.abs(np.asarray(u) - np.asarray(v))))
        for u, v in zip(a, b)
    )


# On 3 replicas: the custom loop, K = 4, one configuration per path.
EQUALITY3_KINDS = ("adam_macro", "adam_micro_sync", "wrap_rmsprop")


def check_equality(replica_counts):
    for replicas in replica_counts:
        global_batch = 4 * replicas
        x, y = data(global_batch, 8)
        if replicas == 2:
            cases = list(EQUALITY2_CASES)
        else:
            cases = [(kind, 4, "loop") for kind in EQUALITY3_KINDS]
        references = {}
        for kind, k, mode in cases:
            if (kind, k) not in references:
                # One single-device run per configuration serves both modes
                # (the loop's loss is fit's mean squared error).
                references[kind, k] = train(
                    1, kind, k, "loop", x, y, global_batch
                )
            _, single_model, single_opt, _ = references[kind, k]
            strategy, model, opt, _ = train(
                replicas, kind, k, mode, x, y, global_batch
            )
            report(
                check="equality",
                replicas=replicas,
                mode=mode,
                kind=kind,
                k=k,
                max_abs_difference=max_difference(
                    single_model.get_weights(), model.get_weights()
                ),
                weight_scale=max(
                    float(np.max(np.abs(w))) for w in single_model.get_weights()
                ),
                differing_replicas=differing_replicas(strategy, model, opt),
                iterations=[
                    int(single_opt.iterations.numpy()),
                    int(opt.iterations.numpy()),
                ],
                micro_steps=[
                    int(single_opt.micro_steps.numpy()),
                    int(opt.micro_steps.numpy()),
                ],
                noise_std=[single_opt.noise_std, opt.noise_std],
            )


def replica_estimate(cycle, replicas):
    """docs/design.md §5: each replica's micro-batch gradient g_rk is a sample
    h = R * g_rk at the local batch size; variances are reported at the
    global micro-batch size, Var(h) / R."""
    samples = [
        [replicas * g for g in replica_grads]
        for step in cycle
        for replica_grads in step
    ]
    n = len(samples)
    mean = [sum(column) / n for column in zip(*samples)]
    mean_square = [sum(h * h for h in column) / n for column in zip(*samples)]
    within = [
        np.maximum(q - g * g, 0.0) / replicas for q, g in zip(mean_square, mean)
    ]
    stats = reference.gradient_statistics(samples)
    stats["variance"] /= replicas
    stats["noise_scale"] /= replicas
    return mean, within, stats


def check_estimator(replicas=2, k=4):
    """Adam "micro" and the statistics use the per-replica gradients as
    samples; compare with float64 NumPy on the recorded gradients."""
    global_batch = 4 * replicas
    x, y = data(global_batch, 8, seed=3)
    single_weights = make_model().get_weights()
    strategy, model, opt, recorded = train(
        replicas,
        "adam_micro",
        k,
        "loop",
        x,
        y,
        global_batch,
        noise_eta=0.0,
        track_gradient_statistics=True,
    )
    rule = reference.AdamRule(
        learning_rate=0.05, second_moment="micro", accumulation_steps=k
    )
    weights = [np.asarray(w, np.float64) for w in single_weights]
    stats = None
    for t, start in enumerate(range(0, len(recorded), k), start=1):
        mean, within, stats = replica_estimate(
            recorded[start : start + k], replicas
        )
        clipped, factors = reference.clip(mean, "global_clipnorm", 0.5)
        variance = [c**2 * w for c, w in zip(factors, within)]
        rule.step(weights, clipped, variance, t)
    measured = {
        name: float(value) for name, value in opt.gradient_statistics().items()
    }
    # K = 1: the replicas are the only samples of the variance.
    _, _, single_step_opt, single_step = train(
        replicas,
        "adam_statistics",
        1,
        "loop",
        x,
        y,
        global_batch,
        noise_eta=0.0,
    )
    expected_k1 = replica_estimate(single_step[-1:], replicas)[2]
    report(
        check="estimator",
        k=1,
        replicas=replicas,
        expected_statistics=expected_k1,
        measured_statistics={
            name: float(value)
            for name, value in single_step_opt.gradient_statistics().items()
        },
    )
    report(
        check="estimator",
        k=k,
        replicas=replicas,
        max_abs_difference=max_difference(weights, model.get_weights()),
        differing_replicas=differing_replicas(strategy, model, opt),
        expected_statistics=stats,
        measured_statistics=measured,
    )


def restore(replicas, kind, k, options, source, saved):
    target = strategy_over(replicas)
    with target.scope():
        if source == "checkpoint":
            model = make_model()
            optimizer = make_optimizer(kind, k, **options)
            optimizer.build(model.trainable_variables)
            tf.train.Checkpoint(model=model, optimizer=optimizer).read(
                saved[source]
            ).assert_consumed()
        else:
            model = keras.saving.load_model(saved[source])
            optimizer = model.optimizer
    return target, model, optimizer


CHECKPOINT_K, CHECKPOINT_BATCH = 4, 12
CHECKPOINT_KINDS = ("adam_macro", "adam_micro")


def _checkpoint_options(kind):
    return {"track_gradient_statistics": kind == "adam_micro"}


def _checkpoint_data():
    x, y = data(CHECKPOINT_BATCH, 8, seed=5)
    middle = 6 * CHECKPOINT_BATCH  # 1 update and 2 micro-batches
    return (x[:middle], y[:middle]), (x[middle:], y[middle:]), (x, y)


def save_mid_cycle(directory):
    """Train 6 micro-batches (K = 4) on 2 replicas and save: a checkpoint
    and a `.keras` file per optimizer. Adam "macro" keeps only sums;
    "micro" also sums of squares of per-replica samples."""
    (x, y), _, _ = _checkpoint_data()
    for kind in CHECKPOINT_KINDS:
        strategy, model, opt, _ = train(
            2,
            kind,
            CHECKPOINT_K,
            "loop",
            x,
            y,
            CHECKPOINT_BATCH,
            **_checkpoint_options(kind),
        )
        tf.train.Checkpoint(model=model, optimizer=opt).write(
            os.path.join(directory, f"{kind}_mid_cycle")
        )
        with strategy.scope():
            model.compile(optimizer=opt, loss="mse")
        model.save(os.path.join(directory, f"{kind}_mid_cycle.keras"))
        partial_sums = [
            float(np.sum(c))
            for c in strategy.experimental_local_results(
                opt.pipeline.accumulator.gradient_sums[0].value
            )
        ]
        with open(os.path.join(directory, f"{kind}_sums.json"), "w") as f:
            json.dump(partial_sums, f)


def check_checkpoint(directory, replica_counts):
    """Restore the mid-cycle saves onto each replica count, finish the
    epoch, compare with an uninterrupted run (on one device for "macro",
    on 2 replicas for "micro", whose samples depend on the replicas)."""
    _, (x_tail, y_tail), (x, y) = _checkpoint_data()
    k, global_batch = CHECKPOINT_K, CHECKPOINT_BATCH
    for kind in CHECKPOINT_KINDS:
        options = _checkpoint_options(kind)
        saved = {
            "checkpoint": os.path.join(directory, f"{kind}_mid_cycle"),
            "keras": os.path.join(directory, f"{kind}_mid_cycle.keras"),
        }
        with open(os.path.join(directory, f"{kind}_sums.json")) as f:
            partial_sums = json.load(f)
        whole = None
        reference_replicas = 1 if kind == "adam_macro" else 2
        if reference_replicas == 1 or reference_replicas in replica_counts:
            _, whole, _, _ = train(
                reference_replicas,
                kind,
                k,
                "loop",
                x,
                y,
                global_batch,
                **options,
            )
        for replicas in replica_counts:
            for source in ("checkpoint", "keras"):
                result = dict(
                    check="checkpoint",
                    kind=kind,
                    source=source,
                    replicas=replicas,
                    partial_sums_saved=partial_sums,
                )
                try:
                    target, restored, restored_opt = restore(
                        replicas, kind, k, options, source, saved
                    )
                    result["micro_steps_restored"] = int(
                        restored_opt.micro_steps.numpy()
                    )
                    restored_sums = (
                        restored_opt.pipeline.accumulator.gradient_sums
                    )
                    result["sums_restored"] = [
                        float(np.sum(c))
                        for c in target.experimental_local_results(
                            restored_sums[0].value
                        )
                    ]
                    custom_loop(
                        target,
                        restored,
                        restored_opt,
                        x_tail,
                        y_tail,
                        global_batch,
                    )
                    result["iterations"] = int(restored_opt.iterations.numpy())
                    if whole is not None:
                        result["max_abs_difference"] = max_difference(
                            whole.get_weights(), restored.get_weights()
                        )
                except Exception as error:  # reported, judged by the test
                    result["error"] = f"{type(error).__name__}: {error}"
                report(**result)


def check_monitor(directory, replicas=2):
    """The known noise scale of a frozen linear regression, measured by the
    monitor in `fit` under the strategy, and written to TensorBoard."""
    from helpers import frozen_linear_model
    from helpers import linear_regression

    global_batch = 16
    x, y, expected = linear_regression(global_batch * 4 * 200)
    with strategy_over(replicas).scope():
        model = frozen_linear_model(
            kg.SGD(0.0, accumulation_steps=4, jit_compile=False)
        )
    log_dir = os.path.join(directory, "logs")
    monitor = kg.GradientVarianceMonitor(
        log_dir=log_dir, per_layer=True, histogram_freq=1, verbose=0
    )
    history = model.fit(
        x,
        y,
        batch_size=global_batch,
        epochs=1,
        verbose=0,
        callbacks=[monitor],
    )
    report(
        check="monitor",
        replicas=replicas,
        expected_noise_scale=expected,
        history={
            k: [float(v) for v in vs] for k, vs in history.history.items()
        },
        batch_size=monitor.records[-1]["batch_size"],
        log_dir=log_dir,
    )


CONTRACT_WHERE = (
    "single",
    "cross_replica",
    "replica",
    "replica_captured",
    "replica_lazy",
)


def check_keras_contract(replicas=2):
    """What Keras's optimizers accept under the strategy, ours too: a plain
    tf.Variable among the trainable ones; gradients computed outside
    `strategy.run`, applied in cross-replica context or captured by every
    replica (once, not once per replica); an optimizer built lazily by its
    first `apply` in an eager `strategy.run`; variable constraints; and K
    changed by AdaptiveAccumulation, the same on every replica."""
    strategy = strategy_over(replicas)
    rng = np.random.default_rng(4)
    grads = [
        [rng.normal(size=s).astype("float32") for s in ((3, 2), (2,))]
        for _ in range(4)
    ]

    def variables(scope):
        with scope():
            return [
                tf.Variable(np.full((3, 2), -0.2, "float32")),
                keras.Variable(np.zeros(2, "float32")),
            ]

    for k in (1, 2):
        weights = {}
        for where in CONTRACT_WHERE:
            scope = (
                tf.distribute.get_strategy().scope
                if where == "single"
                else strategy.scope
            )
            with scope():
                optimizer = kg.SGD(
                    0.1,
                    momentum=0.9,
                    accumulation_steps=k,
                    noise_eta=0.01,
                    noise_seed=3,
                    sync_micro_batches=True,
                    jit_compile=False,
                )
            vs = variables(scope)
            vs[1].constraint = keras.constraints.NonNeg()
            if where != "replica_lazy":
                with scope():
                    optimizer.build(vs)
            replica_step = _replica_step(strategy, optimizer, vs, replicas)
            for g in grads:
                tensors = [tf.constant(x) for x in g]
                if where == "replica":
                    replica_step(tensors, share=True)
                elif where == "replica_captured":
                    # The same tensors on every replica: the global gradient.
                    replica_step(tensors, share=False)
                elif where == "replica_lazy":
                    # Eager: the first call builds the optimizer.
                    strategy.run(
                        _apply_share,
                        args=(optimizer, vs, tensors, replicas),
                    )
                else:
                    with scope():
                        optimizer.apply(tensors, vs)
            weights[where] = [np.asarray(v.numpy()) for v in vs]
            differing = [
                i
                for i, v in enumerate(vs)
                if len(
                    {
                        np.asarray(c).tobytes()
                        for c in strategy.experimental_local_results(
                            v.value if isinstance(v, keras.Variable) else v
                        )
                    }
                )
                > 1
            ]
            report(
                check="keras_contract",
                k=k,
                where=where,
                iterations=int(optimizer.iterations.numpy()),
                constrained_min=float(np.min(weights[where][1])),
                differing_replicas=differing,
                max_abs_difference=max_difference(
                    weights["single"], weights[where]
                ),
                variable_kinds=sorted(
                    type(getattr(v, "value", v)).__name__
                    for v in optimizer.variables
                ),
            )
    _keras_captured_and_lazy(strategy, grads, replicas)
    _traced_lazy_build(strategy)
    _mixed_gradients(strategy)
    _adaptive_on_replicas(strategy, replicas)


def _replica_step(strategy, optimizer, variables, replicas):
    """One traced step (not one per call) applying `grads` in every
    replica: each replica's own share of them (`share`), or the same
    tensors on every replica."""

    @tf.function
    def step(grads, share):
        def on_replica(grads):
            if share:
                # Each replica's own tensors: the sum over replicas is g.
                grads = [g / replicas for g in grads]
            optimizer.apply(grads, variables)

        strategy.run(on_replica, args=(grads,))

    return step


def _apply_share(optimizer, variables, grads, replicas):
    """Applies this replica's own share of `grads` (summing to `grads`)."""
    optimizer.apply([g / replicas for g in grads], variables)


def _captured_step(strategy, optimizer, variable, grad):
    """A traced step in which every replica applies `grad`, an eager tensor
    it captures (Keras fails on a function argument handed to every
    replica: "destinations can not be empty")."""

    @tf.function
    def step():
        strategy.run(lambda: optimizer.apply([grad], [variable]))

    return step


def _keras_captured_and_lazy(strategy, grads, replicas):
    """Keras's SGD on the same gradients: one device, captured by every
    replica of a traced `strategy.run` (built beforehand) and applied by an
    eager `strategy.run` that builds it: the weights each reaches."""
    weights = {}
    for where in ("single", "replica_captured", "replica_lazy"):
        scope = (
            tf.distribute.get_strategy().scope
            if where == "single"
            else strategy.scope
        )
        with scope():
            optimizer = keras.optimizers.SGD(0.1, momentum=0.9)
            variable = keras.Variable(np.zeros(2, "float32"))
            if where != "replica_lazy":
                optimizer.build([variable])

        for g in grads:
            grad = tf.constant(g[1])
            if where == "single":
                optimizer.apply([grad], [variable])
            elif where == "replica_captured":
                _captured_step(strategy, optimizer, variable, grad)()
            else:
                strategy.run(
                    _apply_share, args=(optimizer, [variable], [grad], replicas)
                )
        weights[where] = np.asarray(variable.numpy())
        report(
            check="keras_contract_keras",
            where=where,
            max_abs_difference=max_difference(
                [weights["single"]], [weights[where]]
            ),
        )


def _mixed_gradients(strategy):
    """One gradient captured by every replica, one each replica's own: the
    error `apply` raises (neither counting is right for both)."""
    with strategy.scope():
        optimizer = kg.SGD(0.1, jit_compile=False)
        first = keras.Variable(np.zeros(2, "float32"))
        second = keras.Variable(np.zeros(2, "float32"))
        optimizer.build([first, second])
    shared = tf.constant([1.0, 2.0])

    @tf.function
    def step():
        def on_replica():
            own = tf.ones([2]) * tf.cast(
                tf.distribute.get_replica_context().replica_id_in_sync_group,
                "float32",
            )
            optimizer.apply([shared, own], [first, second])

        strategy.run(on_replica)

    result = dict(check="mixed_gradients")
    try:
        step()
    except ValueError as error:
        result["error"] = str(error)
    result["iterations"] = int(optimizer.iterations.numpy())
    report(**result)


def _traced_lazy_build(strategy):
    """Ours, unbuilt, first applied inside a traced `strategy.run`: the
    error it raises."""
    with strategy.scope():
        optimizer = kg.SGD(0.1, jit_compile=False)
        variable = keras.Variable(np.zeros(2, "float32"))

    @tf.function
    def step():
        def on_replica():
            context = tf.distribute.get_replica_context()
            grad = tf.fill(
                [2], tf.cast(context.replica_id_in_sync_group, "float32")
            )
            optimizer.apply([grad], [variable])

        strategy.run(on_replica)

    result = dict(check="traced_lazy_build")
    try:
        step()
    except ValueError as error:
        result["error"] = str(error)
    result["built"] = bool(optimizer.built)
    report(**result)


def _adaptive_on_replicas(strategy, replicas):
    from helpers import frozen_linear_model
    from helpers import linear_regression

    x, y, expected = linear_regression(4096, seed=2)
    with strategy.scope():
        optimizer = kg.SGD(0.0, max_accumulation_steps=32, jit_compile=False)
        model = frozen_linear_model(optimizer)
    adaptive = kg.AdaptiveAccumulation(32, update_freq=64)
    model.fit(x, y, batch_size=4, epochs=1, verbose=0, callbacks=[adaptive])
    accumulator = optimizer.pipeline.accumulator
    per_replica = [
        [
            int(np.asarray(c))
            for c in strategy.experimental_local_results(
                accumulator.steps.value
            )
        ],
        [
            float(np.asarray(c))
            for c in strategy.experimental_local_results(
                accumulator.learning_rate_factor.value
            )
        ],
    ]
    report(
        check="adaptive",
        replicas=replicas,
        expected_noise_scale=expected,
        effective_batch=optimizer.accumulation_steps * 4,
        per_replica=per_replica,
        changes=[r["accumulation_steps"] for r in adaptive.history],
    )


def check_clip_after_sum(replicas=2):
    """docs/design.md §5: replica gradients [3, 0], [0, 4], global_clipnorm=1,
    SGD with learning rate 1. Clipping the sum [3, 4] moves the weight by
    -[0.6, 0.8]; clipping each replica first (Keras) by -[1, 1]."""
    strategy = strategy_over(replicas)
    moved = {}
    for name, factory in (
        ("ours", lambda: kg.SGD(1.0, global_clipnorm=1.0, jit_compile=False)),
        ("keras", lambda: keras.optimizers.SGD(1.0, global_clipnorm=1.0)),
    ):
        with strategy.scope():
            weight = keras.Variable(np.zeros(2, "float32"))
            optimizer = factory()
            optimizer.build([weight])

        def replica_step(optimizer, weight):
            context = tf.distribute.get_replica_context()
            first = tf.equal(context.replica_id_in_sync_group, 0)
            grad = tf.where(first, [3.0, 0.0], [0.0, 4.0])
            optimizer.apply([grad], [weight])

        step = functools.partial(replica_step, optimizer, weight)
        tf.function(lambda step=step: strategy.run(step))()
        moved[name] = [float(v) for v in weight.numpy()]
    report(check="clip_after_sum", replicas=replicas, **moved)


def check_exact(replicas=2):
    """`exact_accumulation` with replicas whose valid tokens differ: each
    replica's count rides with its gradient (K = 1: in the batched
    all-reduce; K = 2: through the SUM accumulators), so that the update
    equals one device's on the big batch, as does Keras's SGD there."""
    from helpers import padded_tagger
    from helpers import padded_tagging_data

    import keras_gradtools as kg

    x, y = padded_tagging_data(seed=7)

    def tagger(optimizer):
        return padded_tagger(optimizer, jit_compile=False)

    def statistics(optimizer):
        stats = optimizer.gradient_statistics()
        return [float(stats["variance"]), float(stats["mean_norm_sq"])]

    strategy = strategy_over(replicas)
    for k in (1, 2):
        big = tagger(keras.optimizers.SGD(0.5))
        big.fit(x, y, batch_size=8 * k, shuffle=False, verbose=0)
        found = {}
        for exact in (True, False):
            with strategy.scope():
                optimizer = kg.SGD(
                    0.5, accumulation_steps=k, track_gradient_statistics=True
                )
                model = tagger(optimizer)
            if exact:
                kg.exact_accumulation(model)
            model.fit(x, y, batch_size=8, shuffle=False, verbose=0)
            found[exact] = max_difference(
                model.get_weights(), big.get_weights()
            )
            if exact:
                found["statistics"] = statistics(optimizer)
        # One device, the replicas' halves as micro-batches: the same
        # samples per update, in micro-batches of half the size.
        single = kg.SGD(
            0.5, accumulation_steps=k * replicas, track_gradient_statistics=True
        )
        model = kg.exact_accumulation(tagger(single))
        model.fit(x, y, batch_size=8 // replicas, shuffle=False, verbose=0)
        print(
            "RESULT "
            + json.dumps(
                {
                    "check": "exact",
                    "k": k,
                    "replicas": replicas,
                    "max_abs_difference": found[True],
                    "without_exact": found[False],
                    "statistics": found["statistics"],
                    "one_device_statistics": statistics(single),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    checks, directory = sys.argv[1].split(","), sys.argv[2]
    runs = {
        "equality": lambda: check_equality((2,)),
        "equality3": lambda: check_equality((3,)),
        "estimator": check_estimator,
        "save_mid_cycle": lambda: save_mid_cycle(directory),
        "restore": lambda: check_checkpoint(directory, (1, 2)),
        "restore3": lambda: check_checkpoint(directory, (3,)),
        "monitor": lambda: check_monitor(directory),
        "clip_after_sum": check_clip_after_sum,
        "keras_contract": check_keras_contract,
        "exact": check_exact,
    }
    import time

    for check in checks:
        start = time.perf_counter()
        runs[check]()
        print(f"TIMING {check} {time.perf_counter() - start:.1f}s", flush=True)
