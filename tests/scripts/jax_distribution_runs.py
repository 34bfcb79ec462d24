"""`keras.distribution` on JAX with N forced CPU devices.

    python jax_distribution_runs.py DEVICES CHECKS OUT_DIR

Sets `--xla_force_host_platform_device_count=DEVICES` before JAX starts,
runs each comma-separated check and prints one `RESULT {json}` line per
result. `CHECK:N` runs a check on the first N of the devices (a mesh of N
devices: one process serves every device count, saving JAX's start-up
and compilations per count). Checks:

- `data_parallel`: `model.fit` under `DataParallel` for every optimizer and
  K in {1, 4}, noise and global-norm clipping on, against one device on the
  same global batches; every device's copy of every variable compared.
- `collectives`: the collective operations of the compiled train step,
  outside and inside its conditional (the update), for ours and Keras's.
- `model_parallel`: `ModelParallel` on a 2 x (DEVICES/2) mesh with a
  `LayoutMap`: the optimizer's slots take their variable's layout; the
  result equals one device.
- `save`: a mid-cycle `.keras` file saved under `DataParallel`, and the
  weights of carrying on without stopping.
- `restore`: that file loaded here (any device count) and carried on.
- `monitor`: `GradientVarianceMonitor` on the known noise scale.
- `adaptive`: `AdaptiveAccumulation`: one K on every device.
- `transfer`: `BatchSizeSchedule` moving K, the learning-rate factor,
  beta_2 and AdamW's weight decay: the same state on every device, as on
  one device.
"""

import json
import os
import sys

devices, checks, out_dir = int(sys.argv[1]), sys.argv[2].split(","), sys.argv[3]
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
# XLA's CPU client runs the devices' thunks on one pool of max(cores,
# devices) threads (PJRT_NPROC overrides the cores), and a collective holds
# its thread while it waits for the other devices. A device may run two
# collectives at once, so with more forced devices than cores the waiting
# ones can take every thread, the device they wait for gets none, and XLA
# aborts after 40 s (seen once in CI on 2 cores: "Expected 4 threads to join
# the rendezvous, but only 2 of them arrived on time").
os.environ.setdefault("PJRT_NPROC", str(4 * devices))
os.environ["KERAS_BACKEND"] = "jax"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_gradtools as kg  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from helpers import frozen_linear_model  # noqa: E402
from helpers import linear_regression  # noqa: E402

COMMON = dict(noise_eta=0.01, noise_seed=7, global_clipnorm=0.5)
GLOBAL_BATCH = 16


def report(**fields):
    print("RESULT " + json.dumps(fields), flush=True)


def make_optimizer(kind, k):
    common = dict(COMMON, accumulation_steps=k)
    return {
        "sgd": lambda: kg.SGD(0.05, momentum=0.9, **common),
        "adam_macro": lambda: kg.Adam(0.05, second_moment="macro", **common),
        "adam_micro": lambda: kg.Adam(
            0.05,
            second_moment="micro",
            track_gradient_statistics=True,
            **common,
        ),
        "adamw": lambda: kg.AdamW(0.05, weight_decay=0.1, **common),
        "wrap_rmsprop": lambda: kg.wrap(
            keras.optimizers.RMSprop(0.01), **common
        ),
    }[kind]()


KINDS = ("sgd", "adam_macro", "adam_micro", "adamw", "wrap_rmsprop")


def data(samples=128, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(samples, 8)).astype("float32")
    w = rng.normal(size=(8, 2))
    y = np.tanh(x @ w) + 0.1 * rng.normal(size=(samples, 2))
    return x, y.astype("float32")


def make_model(optimizer):
    rng = np.random.default_rng(1)
    inputs = keras.Input((8,))
    hidden = keras.layers.Dense(16, activation="tanh", name="dense_a")(inputs)
    outputs = keras.layers.Dense(2, name="dense_b")(hidden)
    model = keras.Model(inputs, outputs)
    model.set_weights(
        [0.3 * rng.normal(size=w.shape) for w in model.get_weights()]
    )
    model.compile(optimizer=optimizer, loss="mse", jit_compile=True)
    return model


def fit(model, x, y, epochs=2):
    model.fit(
        x, y, batch_size=GLOBAL_BATCH, epochs=epochs, shuffle=False, verbose=0
    )


def train(distribution, kind, k, x, y, epochs=2):
    keras.distribution.set_distribution(distribution)
    model = make_model(make_optimizer(kind, k))
    fit(model, x, y, epochs)
    keras.distribution.set_distribution(None)
    return model


def max_difference(a, b):
    return max(float(np.max(np.abs(np.subtract(u, v)))) for u, v in zip(a, b))


def differing_copies(model):
    """Variables whose copies on the devices differ (replicated ones)."""
    differing = []
    for v in model.variables + model.optimizer.variables:
        shards = v.value.addressable_shards
        if len(shards) < 2 or any(s.index != shards[0].index for s in shards):
            continue
        first = np.asarray(shards[0].data)
        if any(
            not np.array_equal(np.asarray(s.data), first, equal_nan=True)
            for s in shards
        ):
            differing.append(v.path)
    return differing


def data_parallel(used):
    """`DataParallel` over the first `used` devices of this process."""
    return keras.distribution.DataParallel(devices=jax.devices()[:used])


_SINGLE_DEVICE_RUNS = {}


def single_device(kind, k, x, y):
    """The one-device reference of a configuration, trained once for every
    mesh it is compared with."""
    if (kind, k) not in _SINGLE_DEVICE_RUNS:
        _SINGLE_DEVICE_RUNS[kind, k] = train(None, kind, k, x, y)
    return _SINGLE_DEVICE_RUNS[kind, k]


def check_data_parallel(used):
    x, y = data()
    kinds = KINDS if used == 2 else ("adam_micro", "sgd")
    for kind in kinds:
        for k in (1, 4):
            single = single_device(kind, k, x, y)
            distributed = train(data_parallel(used), kind, k, x, y)
            report(
                check="data_parallel",
                devices=used,
                kind=kind,
                k=k,
                max_abs_difference=max_difference(
                    single.get_weights(), distributed.get_weights()
                ),
                differing_copies=differing_copies(distributed),
                iterations=int(distributed.optimizer.iterations.numpy()),
                noise_std=[
                    single.optimizer.noise_std,
                    distributed.optimizer.noise_std,
                ],
            )


def collective_counts(model, x, y):
    """All-reduce and other collectives of the compiled step: in the main
    computation (every micro-batch) and in conditional branches (the
    update, once per cycle)."""
    state = tuple(
        [v.value for v in variables]
        for variables in (
            model.trainable_variables,
            model.non_trainable_variables,
            model.optimizer.variables,
            model.metrics_variables,
        )
    )
    batch = jax.device_put(
        (x[:GLOBAL_BATCH], y[:GLOBAL_BATCH]),
        keras.distribution.distribution()
        .get_data_layout((GLOBAL_BATCH, 8))
        .backend_layout,
    )
    text = (
        jax.jit(model.train_step, donate_argnums=0)
        .lower(state, (batch[0], batch[1], None))
        .compile()
        .as_text()
    )
    return _count_collectives(text)


COLLECTIVES = (
    "all-reduce",
    "reduce-scatter",
    "all-gather",
    "collective-permute",
)


def _count_collectives(text):
    """Counts collective ops per computation, then attributes them to the
    entry computation or to branches of a conditional."""
    computations, name = {}, None
    for line in text.splitlines():
        if line and not line.startswith(" ") and "{" in line:
            name = line.split("(")[0].split()[-1].lstrip("%")
            computations[name] = []
        elif name is not None:
            computations[name].append(line)
    branches = set()
    for lines in computations.values():
        for line in lines:
            if " conditional(" in line:
                for part in line.split("branch_computations={")[1:]:
                    branches |= {
                        b.strip().lstrip("%")
                        for b in part.split("}")[0].split(",")
                    }
    called = _closure(computations, branches)
    counts = {"every_micro_batch": 0, "per_update": 0}
    for name, lines in computations.items():
        found = sum(
            1
            for line in lines
            if any(
                f" {c}(" in line or f" {c}-start(" in line for c in COLLECTIVES
            )
        )
        counts["per_update" if name in called else "every_micro_batch"] += found
    return counts


def _closure(computations, roots):
    """`roots` and every computation they call."""
    seen, stack = set(), list(roots)
    while stack:
        name = stack.pop()
        if name in seen or name not in computations:
            continue
        seen.add(name)
        for line in computations[name]:
            for other in computations:
                if f"%{other}" in line or f"={other}" in line:
                    stack.append(other)
    return seen


def check_collectives(used):
    x, y = data()
    configs = {
        "ours Adam K=4 macro": lambda: kg.Adam(
            0.05, second_moment="macro", accumulation_steps=4
        ),
        "ours Adam K=4 micro": lambda: kg.Adam(
            0.05, second_moment="micro", accumulation_steps=4
        ),
        "ours Adam K=4 micro + noise + clip + statistics": lambda: kg.Adam(
            0.05,
            second_moment="micro",
            accumulation_steps=4,
            noise_eta=0.01,
            global_clipnorm=1.0,
            track_gradient_statistics=True,
        ),
        "ours Adam K=1": lambda: kg.Adam(0.05),
        "keras Adam": lambda: keras.optimizers.Adam(0.05),
        "keras Adam(gradient_accumulation_steps=4)": lambda: (
            keras.optimizers.Adam(0.05, gradient_accumulation_steps=4)
        ),
    }
    for name, make in configs.items():
        keras.distribution.set_distribution(data_parallel(used))
        model = make_model(make())
        fit(model, x[:GLOBAL_BATCH], y[:GLOBAL_BATCH], epochs=1)
        counts = collective_counts(model, x, y)
        keras.distribution.set_distribution(None)
        report(check="collectives", devices=used, config=name, **counts)


def check_model_parallel(used):
    x, y = data()
    mesh = keras.distribution.DeviceMesh(
        (2, used // 2), ("batch", "model"), jax.devices()[:used]
    )
    layouts = keras.distribution.LayoutMap(mesh)
    layouts["dense_a/kernel"] = (None, "model")
    layouts["dense_a/bias"] = ("model",)
    layouts["dense_b/kernel"] = ("model", None)
    for kind in ("adam_micro", "wrap_rmsprop"):
        single = single_device(kind, 4, x, y)
        distribution = keras.distribution.ModelParallel(
            layout_map=layouts, batch_dim_name="batch"
        )
        model = train(distribution, kind, 4, x, y)
        mismatched = []
        for variable in model.trainable_variables:
            spec = variable.value.sharding.spec
            for slot in model.optimizer.variables:
                if slot.shape == variable.shape and slot.path.startswith(
                    model.optimizer.name + "/" + variable.path.replace("/", "_")
                ):
                    if slot.value.sharding.spec != spec:
                        mismatched.append(slot.path)
        report(
            check="model_parallel",
            devices=used,
            kind=kind,
            kernel_spec=str(model.trainable_variables[0].value.sharding.spec),
            mismatched_layouts=mismatched,
            max_abs_difference=max_difference(
                single.get_weights(), model.get_weights()
            ),
        )


SAVE_KIND, SAVE_K = "adam_micro", 4


def check_save(used):
    x, y = data()
    keras.distribution.set_distribution(data_parallel(used))
    model = make_model(make_optimizer(SAVE_KIND, SAVE_K))
    fit(model, x[: 6 * GLOBAL_BATCH], y[: 6 * GLOBAL_BATCH], epochs=1)
    model.save(os.path.join(out_dir, "mid_cycle.keras"))
    fit(model, x[6 * GLOBAL_BATCH :], y[6 * GLOBAL_BATCH :], epochs=1)
    np.savez(os.path.join(out_dir, "continued.npz"), *model.get_weights())
    report(
        check="save",
        devices=used,
        micro_steps=int(model.optimizer.micro_steps.numpy()),
    )


def check_restore(used):
    x, y = data()
    keras.distribution.set_distribution(data_parallel(used))
    model = keras.saving.load_model(os.path.join(out_dir, "mid_cycle.keras"))
    restored_steps = int(model.optimizer.micro_steps.numpy())
    fit(model, x[6 * GLOBAL_BATCH :], y[6 * GLOBAL_BATCH :], epochs=1)
    reference = np.load(os.path.join(out_dir, "continued.npz"))
    report(
        check="restore",
        devices=used,
        micro_steps_restored=restored_steps,
        max_abs_difference=max_difference(
            model.get_weights(),
            [reference[f"arr_{i}"] for i in range(len(reference.files))],
        ),
    )


def check_monitor(used):
    """The known noise scale (helpers.linear_regression) under DataParallel:
    the batch size the monitor sees is the global one."""
    x, y, expected = linear_regression(4096, seed=2)
    keras.distribution.set_distribution(data_parallel(used))
    model = frozen_linear_model(kg.SGD(0.0, accumulation_steps=8))
    log_dir = os.path.join(out_dir, "monitor_logs")
    monitor = kg.GradientVarianceMonitor(log_dir=log_dir, verbose=0)
    history = model.fit(
        x, y, batch_size=16, epochs=1, verbose=0, callbacks=[monitor]
    )
    report(
        check="monitor",
        devices=used,
        expected_noise_scale=expected,
        measured=history.history["grad_noise_scale"][-1],
        batch_size=monitor.records[-1]["batch_size"],
        log_dir=log_dir,
    )


def check_adaptive(used):
    """AdaptiveAccumulation under DataParallel: one K (a replicated
    scalar) for every device, near the known noise scale."""
    x, y, expected = linear_regression(4096, seed=2)
    keras.distribution.set_distribution(data_parallel(used))
    optimizer = kg.SGD(0.0, max_accumulation_steps=32)
    model = frozen_linear_model(optimizer)
    adaptive = kg.AdaptiveAccumulation(32, update_freq=64)
    model.fit(x, y, batch_size=4, epochs=1, verbose=0, callbacks=[adaptive])
    steps = optimizer.pipeline.accumulator.steps.value
    report(
        check="adaptive",
        devices=used,
        expected_noise_scale=expected,
        effective_batch=optimizer.accumulation_steps * 4,
        per_device=[int(np.asarray(s.data)) for s in steps.addressable_shards],
    )


def per_device(variable):
    """The values of a replicated variable's copies, one per device."""
    return [np.asarray(s.data).tolist() for s in variable.addressable_shards]


def transfer_run(distribution, x, y):
    """AdamW "macro" from K0 = 2, scheduled to K = 8 after 64 samples,
    beta_2 and the weight decay following K (sqrt rule)."""
    keras.distribution.set_distribution(distribution)
    optimizer = kg.AdamW(
        0.05,
        weight_decay=0.1,
        accumulation_steps=2,
        max_accumulation_steps=8,
        second_moment="macro",
    )
    model = make_model(optimizer)
    schedule = kg.BatchSizeSchedule([(0, 2), (64, 8)])
    model.fit(
        x, y, batch_size=GLOBAL_BATCH, epochs=2, shuffle=False, verbose=0,
        callbacks=[schedule],
    )  # fmt: skip
    keras.distribution.set_distribution(None)
    return model


def check_transfer(used):
    """The transfer state under DataParallel: K, the learning-rate factor,
    the weight-decay factor and the beta switches hold one value on every
    device, and the run equals one device's."""
    x, y = data()
    single = transfer_run(None, x, y)
    model = transfer_run(data_parallel(used), x, y)
    optimizer = model.optimizer
    report(
        check="transfer",
        devices=used,
        accumulation_steps=optimizer.accumulation_steps,
        learning_rate_factor=optimizer.learning_rate_factor,
        weight_decay_factor=optimizer.weight_decay_factor,
        effective_beta_2=optimizer.effective_beta_2,
        beta_2=optimizer.beta_2,
        single_device=[
            single.optimizer.learning_rate_factor,
            single.optimizer.weight_decay_factor,
            single.optimizer.effective_beta_2,
        ],
        per_device={
            "accumulation_steps": per_device(
                optimizer.pipeline.accumulator.steps.value
            ),
            "learning_rate_factor": per_device(
                optimizer.pipeline.accumulator.learning_rate_factor.value
            ),
            "weight_decay_factor": per_device(
                optimizer._weight_decay_factor.value
            ),
            **{
                f"transfer_{name}": per_device(switch.value)
                for name, switch in optimizer._transfer_switches.items()
            },
        },
        differing_copies=differing_copies(model),
        max_abs_difference=max_difference(
            single.get_weights(), model.get_weights()
        ),
    )


def xla_thread_pool_size():
    """The threads of XLA's CPU client pool in this process (Linux).

    A thread listed may have ended before its name is read (short-lived
    threads of other libraries): it is not one of the pool's, so skip it.
    """
    names = []
    for thread in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{thread}/comm") as comm:
                names.append(comm.read().strip())
        except FileNotFoundError:
            continue
    return sum(name.endswith("XLAEigen") for name in names)


if __name__ == "__main__":
    assert len(jax.devices()) == devices, jax.devices()
    report(check="thread_pool", devices=devices, threads=xla_thread_pool_size())
    for check in checks:
        name, _, used = check.partition(":")
        globals()[f"check_{name}"](int(used or devices))
        keras.distribution.set_distribution(None)
