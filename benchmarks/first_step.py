"""Time to the first `fit` step on a deep MLP, and what in the pipeline it
goes to (a diagnosis for issue 25; docs/performance.md).

Each configuration runs in a fresh process (nothing compiled is shared):
a 61-layer MLP (122 tensors), `fit(jit_compile=True)` for one step, timed
from the call to its return, then a second step. Besides the shipped
configurations, two diagnostic ones replace a piece of the pipeline in
that process only:

- `finite check fused`: the check as one reduction over all gradients
  (`all(isfinite(concatenate(flattened)))`) instead of a sum per tensor
  with an exact fallback behind a conditional;
- `gate off`: the check is still computed (and counted) but the update no
  longer waits for it (not a valid configuration: it measures what the
  dependence of every write on the check costs).

On JAX the report also splits the first step as JAX's own log does
(`jax_log_compiles`): seconds tracing and seconds in XLA's compiler, summed
over every function compiled during that first `fit` (the train step's
dominate); the rest is host work and the step itself.

With `--rounds R` the configurations run R times, interleaved, and each
is reported as the median (min-max) of its ratio to the first one within
a round.

    KERAS_BACKEND=tensorflow python benchmarks/first_step.py [--markdown]
        [--rounds R] [--configurations A,B,...]
"""

import argparse
import os
import re
import statistics
import subprocess
import sys
import time

import configurations

CONFIGURATIONS = (
    "keras adam",
    "keras accumulation K=4",
    "ours K=1",
    "ours K=1 on_nonfinite=apply",
    "ours K=1 finite check fused",
    "ours K=1 gate off",
    "ours K=4 macro",
    "ours K=4 micro",
    "ours K=4 clip+noise+statistics",
)


def _optimizer(configuration):
    return configurations.adam_optimizer(configuration, noise_eta=1e-3)


def _diagnostic_patch(configuration):
    """Replaces one piece of the pipeline in this process (diagnosis)."""
    from keras import ops

    from keras_gradtools import transforms

    if configuration.endswith("finite check fused"):

        def all_finite(tensors, partial_sums=None):
            del partial_sums
            flat = ops.concatenate([ops.reshape(t, (-1,)) for t in tensors])
            return ops.all(ops.isfinite(flat))

        transforms.all_finite = all_finite
    if configuration.endswith("gate off"):
        configurations.ungate_updates()


class _CompileLog:
    """Sums the tracing and XLA-compile seconds JAX logs (JAX only)."""

    PATTERNS = {
        "trace": re.compile(r"Finished tracing.* in ([0-9.]+) sec"),
        "compile": re.compile(r"Finished XLA compilation.* in ([0-9.]+) sec"),
    }

    def __init__(self):
        self.seconds = {"trace": -1.0, "compile": -1.0}

    def reset(self):
        """Counts from now on (the model's building compiles a few small
        functions before the step)."""
        if self.seconds["trace"] >= 0:
            self.seconds = {"trace": 0.0, "compile": 0.0}

    def install(self):
        import logging

        import jax

        jax.config.update("jax_log_compiles", True)
        self.seconds = {"trace": 0.0, "compile": 0.0}
        log = self

        class Handler(logging.Handler):
            def emit(self, record):
                message = record.getMessage()
                for kind, pattern in log.PATTERNS.items():
                    found = pattern.search(message)
                    if found:
                        log.seconds[kind] += float(found.group(1))

        logger = logging.getLogger("jax")
        logger.addHandler(Handler())
        # Not to the console: the report is the RESULT line.
        logger.propagate = False


def run_one(configuration, hidden_layers):
    """Times the first and second `fit` step in this process."""
    import keras
    import numpy as np

    _diagnostic_patch(configuration)
    compile_log = _CompileLog()
    if keras.backend.backend() == "jax":
        compile_log.install()
    keras.utils.set_random_seed(0)
    layers = [keras.Input((32,))]
    layers += [
        keras.layers.Dense(32, activation="relu") for _ in range(hidden_layers)
    ]
    model = keras.Sequential(layers + [keras.layers.Dense(10)])
    model.compile(
        optimizer=_optimizer(configuration),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=True,
    )
    rng = np.random.default_rng(0)
    x = rng.random((64, 32), dtype="float32")
    y = rng.integers(0, 10, 64)
    times = []
    compile_log.reset()
    for _ in range(2):
        start = time.perf_counter()
        model.fit(x, y, batch_size=64, epochs=1, verbose=0)
        times.append(time.perf_counter() - start)
        if len(times) == 1:
            split = dict(compile_log.seconds)
    print(
        f"RESULT {times[0]:.3f} {times[1]:.4f} {split['trace']:.3f} "
        f"{split['compile']:.3f}",
        flush=True,
    )


def measure(configuration, hidden_layers):
    completed = subprocess.run(
        [
            sys.executable,
            os.path.abspath(__file__),
            "--one",
            configuration,
            "--hidden-layers",
            str(hidden_layers),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
    )
    for line in completed.stdout.splitlines():
        if line.startswith("RESULT "):
            # first step, second step, tracing, XLA compile (-1: unknown)
            return tuple(float(value) for value in line.split()[1:])
    raise RuntimeError(completed.stderr[-3000:])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a 6-layer MLP, Keras's Adam and ours K=1 (a smoke test)",
    )
    parser.add_argument("--hidden-layers", type=int, default=60)
    parser.add_argument(
        "--configurations",
        default=",".join(CONFIGURATIONS),
    )
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args(argv)
    if args.one:
        run_one(args.one, args.hidden_layers)
        return
    import keras

    configurations = args.configurations.split(",")
    unknown = set(configurations) - set(CONFIGURATIONS)
    if unknown:
        parser.error(f"unknown configurations: {sorted(unknown)}")
    if args.quick:
        args.hidden_layers = 5
        configurations = [CONFIGURATIONS[0], CONFIGURATIONS[2]]
    times = {c: [] for c in configurations}
    for _ in range(args.rounds):
        for configuration in configurations:
            times[configuration].append(
                measure(configuration, args.hidden_layers)
            )
    reference = [row[0] for row in times[configurations[0]]]
    split = keras.backend.backend() == "jax"
    layers = args.hidden_layers + 1
    print(
        f"backend: {keras.backend.backend()}; {layers}-layer MLP, "
        f"{2 * layers} tensors; {args.rounds} interleaved round(s)"
    )
    header = ["configuration", "first step (s)", "vs first row", "second (s)"]
    if split:
        header += ["of it tracing (s)", "of it XLA compile (s)"]
    if args.markdown:
        print("| " + " | ".join(header) + " |")
        print("| --- |" + " ---: |" * (len(header) - 1))
    else:
        print("  ".join(header))
    for name in configurations:
        rows = times[name]
        ratios = [row[0] / b for row, b in zip(rows, reference)]
        ratio = f"{statistics.median(ratios):.2f}x"
        if args.rounds > 1:
            ratio += f" ({min(ratios):.2f}-{max(ratios):.2f})"
        cells = [
            name,
            f"{statistics.median(row[0] for row in rows):.1f}",
            ratio,
            f"{statistics.median(row[1] for row in rows):.3f}",
        ]
        if split:
            cells += [
                f"{statistics.median(row[k] for row in rows):.1f}"
                for k in (2, 3)
            ]
        if args.markdown:
            print("| " + " | ".join(cells) + " |")
        else:
            print("  ".join(cells))
    print("benchmark: ok")


if __name__ == "__main__":
    main()
