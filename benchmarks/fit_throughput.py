"""End-to-end `model.fit` throughput and peak memory, ours against Keras's.

Usage:

    python benchmarks/fit_throughput.py [--quick] [--rounds R] [--markdown]

Throughput: for each model (a small CNN on 8x8 digits, an MLP with ~20M
parameters on random data), every configuration trains for the same number
of micro-batches of size M in each of R interleaved rounds (the order rotates
each round), after a warm-up epoch that compiles everything. A configuration
is one compiled model per optimizer, fed by `fit` with `jit_compile=True`.
Reported: samples per second of the epoch itself (timed from
`on_epoch_begin` to `on_epoch_end`; median over rounds) and, per round, the
ratios that matter:

- ours K=4 / ours K=1 at the same micro-batch M (target >= 0.9): what
  accumulation costs per sample;
- ours K=4 / Keras `Adam(gradient_accumulation_steps=4)`;
- GradientVarianceMonitor overhead: ours K=4 with the monitor as users run
  it (statistics measured in the update, read once per epoch) / without
  (target <= 3% slower).

Memory: each optimizer configuration trains 8 micro-batches of a
~50M-parameter MLP in a fresh subprocess; reported are the optimizer state
in bytes per parameter, the resident memory once the model is built, and
the peak resident memory while compiling and training (Linux: VmHWM, reset
after the model is built).

It runs on the backend KERAS_BACKEND names (TensorFlow by default).
Absolute numbers are for reference only; timings are never asserted.
`--quick` shrinks everything for a CI smoke test and prints
`benchmark: ok` last.
"""

import argparse
import datetime
import json
import os
import shlex
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import machine  # noqa: E402  (benchmarks/machine.py)
import report  # noqa: E402  (benchmarks/report.py)

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

K = 4
CONFIGS = (
    ("keras Adam, K=1", "keras_k1"),
    ("ours Adam, K=1", "ours_k1"),
    (f"keras Adam(gradient_accumulation_steps={K})", "keras_k4"),
    (f"ours Adam K={K} (micro)", "ours_k4"),
    (f"ours Adam K={K} + GradientVarianceMonitor", "ours_k4_monitor"),
)
# Peak memory: the configurations above (the monitor adds no state) and
# the "macro" second moment, which keeps no sum of squares.
MEMORY_CONFIGS = tuple(c for c in CONFIGS if c[1] != "ours_k4_monitor") + (
    (f"ours Adam K={K} (macro)", "ours_k4_macro"),
)
RATIOS = (
    (f"ours K={K} / ours K=1 (samples/s)", "ours_k4", "ours_k1", ">= 0.90"),
    (f"ours K={K} / keras K={K} (samples/s)", "ours_k4", "keras_k4", ""),
    (
        "monitor overhead: with / without (time)",
        "ours_k4",
        "ours_k4_monitor",
        "<= 1.03",
    ),
    ("ours K=1 / keras K=1 (samples/s)", "ours_k1", "keras_k1", ""),
)


def make_optimizer(key):
    import keras

    import keras_gradtools as kg

    return {
        "keras_k1": lambda: keras.optimizers.Adam(1e-3),
        "ours_k1": lambda: kg.Adam(1e-3),
        "keras_k4": lambda: keras.optimizers.Adam(
            1e-3, gradient_accumulation_steps=K
        ),
        "ours_k4": lambda: kg.Adam(1e-3, accumulation_steps=K),
        "ours_k4_monitor": lambda: kg.Adam(1e-3, accumulation_steps=K),
        "ours_k4_macro": lambda: kg.Adam(
            1e-3, accumulation_steps=K, second_moment="macro"
        ),
    }[key]()


def make_model(name, quick):
    import keras

    keras.utils.set_random_seed(0)
    if name == "cnn":
        return keras.Sequential(
            [
                keras.Input((8, 8, 1)),
                keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
                keras.layers.Conv2D(64, 3, padding="same", activation="relu"),
                keras.layers.GlobalAveragePooling2D(),
                keras.layers.Dense(10),
            ]
        )
    width = 256 if quick else 4400
    return keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(width, activation="relu"),
            keras.layers.Dense(width, activation="relu"),
            keras.layers.Dense(10),
        ]
    )


def make_data(name, samples):
    import numpy as np

    if name == "cnn":
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = (digits.images / 16.0).astype("float32")[..., None]
        y = digits.target.astype("int32")
        repeat = -(-samples // len(x))
        return np.tile(x, (repeat, 1, 1, 1))[:samples], np.tile(y, repeat)[
            :samples
        ]
    rng = np.random.default_rng(0)
    x = rng.normal(size=(samples, 64)).astype("float32")
    y = rng.integers(0, 10, size=samples).astype("int32")
    return x, y


class Case:
    def __init__(self, model_name, key, batch, quick):
        import keras

        import keras_gradtools as kg

        self.key = key
        self.model = make_model(model_name, quick)
        self.optimizer = make_optimizer(key)
        self.model.compile(
            optimizer=self.optimizer,
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            jit_compile=True,
        )
        self.callbacks = []
        if key == "ours_k4_monitor":
            # As users run it: measuring once per epoch (the default).
            self.callbacks = [kg.GradientVarianceMonitor(verbose=0)]
        self.batch = batch

    def run(self, x, y):
        timer = epoch_timer()
        self.model.fit(
            x,
            y,
            batch_size=self.batch,
            epochs=1,
            shuffle=False,
            verbose=0,
            callbacks=self.callbacks + [timer],
        )
        return len(x) / timer.seconds


def epoch_timer():
    """Returns a callback whose `seconds` is the duration of the last epoch,
    from `on_epoch_begin` to `on_epoch_end` (which reads the epoch's logs,
    so the device work is done).

    The whole `fit` call is not timed: on this machine some calls spend a
    fixed ~2.2 s outside the epoch (setting up or tearing down the data
    pipeline), whatever the optimizer, which made whole-call timings
    bimodal.
    """
    import keras

    class EpochTimer(keras.callbacks.Callback):
        seconds = None

        def on_epoch_begin(self, epoch, logs=None):
            self._start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.seconds = time.perf_counter() - self._start

    return EpochTimer()


def throughput(model_name, batch, steps, rounds, quick):
    x, y = make_data(model_name, batch * steps)
    cases = [Case(model_name, key, batch, quick) for _, key in CONFIGS]
    for case in cases:  # warm-up: compile
        case.run(x[: batch * 2 * K], y[: batch * 2 * K])
    samples = {case.key: [] for case in cases}
    for r in range(rounds):
        order = cases[r % len(cases) :] + cases[: r % len(cases)]
        for case in order:
            samples[case.key].append(case.run(x, y))
    params = sum(
        int(v.numpy().size) for v in cases[0].model.trainable_variables
    )
    return params, samples


def summarize(samples):
    rows = []
    for name, key in CONFIGS:
        values = samples[key]
        rows.append((name, min(values), statistics.median(values), max(values)))
    ratios = []
    for label, a, b, target in RATIOS:
        per_round = [x / y for x, y in zip(samples[a], samples[b])]
        ratios.append(
            (
                label,
                min(per_round),
                statistics.median(per_round),
                max(per_round),
                target,
            )
        )
    return rows, ratios


MEMORY_CHILD = """
import json, os, sys
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
sys.path.insert(0, {bench_dir!r})
import numpy as np
import fit_throughput as ft
import keras
width = {width}
model = keras.Sequential([keras.Input((width,)), keras.layers.Dense(width),
                          keras.layers.Dense(10)])
before = ft.resident_mb()
ft.reset_peak()
optimizer = ft.make_optimizer({key!r})
loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
model.compile(optimizer=optimizer, loss=loss, jit_compile=True)
x = np.zeros((16, width), "float32"); y = np.zeros((16,), "int32")
# 8 micro-batches, two whole cycles of K=4: every slot has been written.
model.fit(x, y, batch_size=2, epochs=1, verbose=0)
peak = ft.peak_mb()
params = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
state = sum(
    int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize
    for v in optimizer.variables
)
print(json.dumps({{"params": params, "state": state, "model_mb": before,
      "peak_mb": peak}}))
"""


def _proc_status_mb(field):
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(field)


def resident_mb():
    """Resident memory of this process now, in MiB (Linux)."""
    return _proc_status_mb("VmRSS")


def reset_peak():
    """Restarts the peak-resident counter (Linux >= 4.0: clear_refs 5), so
    that the peak measured next belongs to what runs after it."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def peak_mb():
    """Peak resident memory since `reset_peak`, in MiB."""
    return _proc_status_mb("VmHWM")


def memory(quick):
    """Peak memory of the training step, one fresh process per optimizer.

    Zero-initialized slots are not resident until written (the kernel maps
    untouched zero pages lazily), so each child trains 8 micro-batches
    before reading the peak; the peak is counted from after the model is
    built, so the weights' initializers do not hide the difference between
    optimizers.
    """
    width = 600 if quick else 7000  # 7000**2 + 7000*10 ~ 49M parameters
    bench_dir = os.path.dirname(os.path.abspath(__file__))
    results = []
    configs = MEMORY_CONFIGS[:1] if quick else MEMORY_CONFIGS
    for name, key in configs:
        code = MEMORY_CHILD.format(bench_dir=bench_dir, width=width, key=key)
        out = (
            subprocess.run(
                [sys.executable, "-c", code],
                capture_output=True,
                text=True,
                timeout=600,
                check=True,
            )
            .stdout.strip()
            .splitlines()[-1]
        )
        data = json.loads(out)
        results.append(
            (
                name,
                data["params"],
                data["state"] / data["params"],
                data["model_mb"],
                data["peak_mb"],
            )
        )
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="benchmarks/fit_throughput.py",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args(argv)
    rounds = args.rounds or (1 if args.quick else 5)
    started = time.perf_counter()
    import keras

    backend = keras.backend.backend()
    engine = __import__(backend)
    command = "python benchmarks/fit_throughput.py " + shlex.join(
        argv if argv is not None else sys.argv[1:]
    )
    print("# keras_gradtools fit throughput and memory\n")
    print(f"command:  {command.strip()}")
    print(f"date:     {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC")
    print(f"machine:  {machine.cpu_model()}, {machine.cpu_count()} cores")
    print(
        f"software: Keras {keras.__version__} on {backend} {engine.__version__}"
    )
    print(
        f"method:   model.fit(jit_compile=True), {rounds} interleaved "
        f"rounds, K={K}\n"
    )
    models = (("cnn", 32, 400), ("mlp", 64, 48))
    if args.quick:  # one small model, few steps: the report's format only
        models = (("mlp", 64, 8),)
    for model_name, batch, steps in models:
        params, samples = throughput(
            model_name, batch, steps, rounds, args.quick
        )
        rows, ratios = summarize(samples)
        print(
            f"## {model_name}: {params:,} parameters, micro-batch {batch}, "
            f"{batch * steps} samples per timed epoch\n"
        )
        print(
            report.format_table(
                ["config", "min samples/s", "median", "max"],
                [
                    (n, f"{a:.0f}", f"{b:.0f}", f"{c:.0f}")
                    for n, a, b, c in rows
                ],
                args.markdown,
            )
        )
        print()
        print(
            report.format_table(
                ["ratio", "min", "median", "max", "target"],
                [
                    (n, f"{a:.3f}", f"{b:.3f}", f"{c:.3f}", t or "-")
                    for n, a, b, c, t in ratios
                ],
                args.markdown,
            )
        )
        print()
    print("## peak memory, 8 micro-batches of fit in a fresh process\n")
    print(
        report.format_table(
            [
                "config",
                "parameters",
                "state B/param",
                "state MiB",
                "RSS after model MiB",
                "peak RSS in fit MiB",
                "peak - model MiB",
            ],
            [
                (
                    n,
                    f"{p:,}",
                    f"{s:.2f}",
                    f"{s * p / 2**20:.0f}",
                    f"{before:.0f}",
                    f"{peak:.0f}",
                    f"{peak - before:.0f}",
                )
                for n, p, s, before, peak in memory(args.quick)
            ],
            args.markdown,
        )
    )
    print(f"\nruntime:  {time.perf_counter() - started:.1f} s")
    print("benchmark: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
