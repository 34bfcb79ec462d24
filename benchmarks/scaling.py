"""How the cost of a step grows with the model: parameters and tensors.

Usage:

    python benchmarks/scaling.py [--quick] [--markdown] [--plot PATH]
                                 [--rows-json PATH] [--replot ROWS.json]

On each backend (a process of its own), for models of 0.25M to 64M
float32 parameters in 8 tensors, and for 4M parameters in 4 to 256 tensors:
the accumulate-only micro-step and the update step of Adam with K = 4, for
ours (`second_moment="macro"`, `on_nonfinite="apply"`, like with like),
Keras's `Adam(gradient_accumulation_steps=4)` and, on JAX,
`optax.MultiSteps(optax.adam(), 4)`, beside a bandwidth floor `v = a*v + g`
over the same tensors. Each configuration is one XLA-compiled step
(`tf.function(jit_compile=True)` / `jax.jit` with donated state);
configurations are interleaved over rounds and each phase's median is
reported, with its ratio to the floor. With `--plot`, a log-log PNG: one
line per optimizer, per micro-batch (mean over a cycle) against parameters
and against tensors. `--quick` is a format smoke test. Prints
`benchmark: ok` last.
"""

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import report  # noqa: E402

K = 4
SIZES = (250_000, 1_000_000, 4_000_000, 16_000_000, 64_000_000)
TENSORS = (4, 16, 64, 256)
FIXED_SIZE = 4_000_000


def _layouts(quick):
    if quick:
        return [(20_000, 8), (80_000, 8), (80_000, 32)]
    return [(p, 8) for p in SIZES] + [
        (FIXED_SIZE, t) for t in TENSORS if t != 8
    ]


def _shapes(params, tensors):
    per = max(64, params // tensors)
    columns = 256 if per >= 256 * 16 else 16
    return [(per // columns, columns)] * tensors


def _configs(backend):
    configs = [("floor", "floor"), ("ours", "ours"), ("keras", "keras")]
    if backend == "jax":
        configs.append(("optax MultiSteps", "optax"))
    return configs


# ----------------------------------------------------------------------
# One backend (child process).


def _tensorflow_case(key, shapes, rng):
    import keras
    import tensorflow as tf

    import keras_gradtools as kg

    variables = [
        keras.Variable((0.02 * rng.standard_normal(s)).astype("float32"))
        for s in shapes
    ]
    grads = [
        tf.constant((1e-3 * rng.standard_normal(s)).astype("float32"))
        for s in shapes
    ]
    if key == "floor":

        @tf.function(jit_compile=True)
        def step():
            for v, g in zip(variables, grads):
                v.assign(0.9 * v + g)

        sync = lambda: float(variables[0][0, 0])  # noqa: E731
    else:
        optimizer = (
            kg.Adam(
                accumulation_steps=K,
                second_moment="macro",
                on_nonfinite="apply",
            )
            if key == "ours"
            else keras.optimizers.Adam(gradient_accumulation_steps=K)
        )
        optimizer.build(variables)

        @tf.function(jit_compile=True)
        def step():
            optimizer.apply(grads, variables)

        sync = lambda: int(optimizer.iterations.numpy())  # noqa: E731
    return step, sync


def _jax_case(key, shapes, rng):
    import jax

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import jax_step_cost

    initial = [
        (0.02 * rng.standard_normal(s)).astype("float32") for s in shapes
    ]
    grads = [
        jax.numpy.asarray((1e-3 * rng.standard_normal(s)).astype("float32"))
        for s in shapes
    ]
    name = {
        "floor": "floor",
        "ours": "ours_macro_apply",
        "keras": "keras_adam_k",
        "optax": "optax_multisteps",
    }[key]
    function, state = jax_step_cost._make(name, grads, initial)
    function = jax.jit(function, donate_argnums=0)
    box = {"state": state}

    def step():
        box["state"] = function(box["state"], grads)

    def sync():
        jax.block_until_ready(box["state"])

    return step, sync


def _phases(step, sync, cycles):
    """(accumulate-only seconds per call, update seconds per call)."""
    accumulate = update = 0.0
    sync()
    for _ in range(cycles):
        start = time.perf_counter()
        for _ in range(K - 1):
            step()
        sync()
        middle = time.perf_counter()
        step()
        sync()
        end = time.perf_counter()
        accumulate += middle - start
        update += end - middle
    return accumulate / (cycles * (K - 1)), update / cycles


def child(backend, quick, out):
    import numpy as np

    make = _jax_case if backend == "jax" else _tensorflow_case
    rounds = 2 if quick else 5
    rows = []
    for params, tensors in _layouts(quick):
        shapes = _shapes(params, tensors)
        total = sum(a * b for a, b in shapes)
        cycles = 1 if quick else max(1, int(8e6 / total))
        rng = np.random.default_rng(0)
        cases = {
            name: make(key, shapes, rng) for name, key in _configs(backend)
        }
        for step, sync in cases.values():  # compile, warm up
            for _ in range(2 * K):
                step()
            sync()
        times = {name: [] for name in cases}
        for r in range(rounds):
            names = list(cases)
            names = names[r % len(names) :] + names[: r % len(names)]
            for name in names:
                times[name].append(_phases(*cases[name], cycles))
        for name, measured in times.items():
            accumulate = statistics.median(a for a, _ in measured)
            update = statistics.median(u for _, u in measured)
            rows.append(
                {
                    "backend": backend,
                    "params": total,
                    "tensors": tensors,
                    "config": name,
                    "accumulate_ms": accumulate * 1e3,
                    "update_ms": update * 1e3,
                    "per_micro_batch_ms": ((K - 1) * accumulate + update)
                    / K
                    * 1e3,
                }
            )
    with open(out, "w") as f:
        json.dump(rows, f)


# ----------------------------------------------------------------------
# Both backends, tables and the picture.


def _table(rows, backend, markdown):
    floors = {
        (r["params"], r["tensors"]): r
        for r in rows
        if r["backend"] == backend and r["config"] == "floor"
    }
    lines = []
    for r in rows:
        if r["backend"] != backend or r["config"] == "floor":
            continue
        floor = floors[r["params"], r["tensors"]]
        lines.append(
            [
                f"{r['params'] / 1e6:.2f}M",
                r["tensors"],
                r["config"],
                f"{r['accumulate_ms']:.2f}",
                f"{r['update_ms']:.2f}",
                f"{r['per_micro_batch_ms']:.2f}",
                f"{r['per_micro_batch_ms'] / floor['per_micro_batch_ms']:.2f}",
            ]
        )
    return report.format_table(
        [
            "parameters",
            "tensors",
            "config",
            "accumulate ms",
            "update ms",
            "per micro-batch ms",
            "/ floor",
        ],
        lines,
        markdown,
    )


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    backends = sorted({r["backend"] for r in rows}, reverse=True)
    figure, axes = plt.subplots(
        len(backends), 2, figsize=(11, 4 * len(backends)), squeeze=False,
        constrained_layout=True,
    )  # fmt: skip
    for row, backend in zip(axes, backends):
        mine = [r for r in rows if r["backend"] == backend]
        fewest = min(r["tensors"] for r in mine)
        for axis, vary, fixed_key, fixed in (
            (row[0], "params", "tensors", 8 if fewest <= 8 else fewest),
            (row[1], "tensors", "params", None),
        ):
            for config in dict.fromkeys(r["config"] for r in mine):
                points = sorted(
                    (r[vary], r["per_micro_batch_ms"])
                    for r in mine
                    if r["config"] == config
                    and (
                        r[fixed_key] == fixed
                        if fixed is not None
                        # The tensor sweep: every layout of about
                        # FIXED_SIZE parameters (shapes round the total).
                        else abs(r["params"] / FIXED_SIZE - 1) < 0.05
                    )
                )
                if points:
                    axis.plot(*zip(*points), marker="o", label=config)
            axis.set_xscale("log")
            axis.set_yscale("log")
            ticks = sorted(
                {x for line in axis.get_lines() for x in line.get_xdata()}
            )
            if vary == "tensors":
                axis.set_xticks(ticks, [str(int(t)) for t in ticks])
                axis.minorticks_off()
            axis.set_xlabel(
                "parameters" if vary == "params" else "tensors (same total)"
            )
            axis.set_ylabel("ms per micro-batch (K = 4)")
            axis.set_title(f"{backend}", loc="left")
            axis.grid(True, which="both", alpha=0.3)
            axis.legend(fontsize=8)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="benchmarks/scaling.py", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--plot", default=None)
    parser.add_argument(
        "--backends",
        default="tensorflow,jax",
        help="Comma-separated Keras backends to measure (default: both).",
    )
    parser.add_argument(
        "--rows-json",
        default=None,
        help="Also write the measured rows (floor included) to this file.",
    )
    parser.add_argument(
        "--replot",
        default=None,
        help="Draw --plot from a --rows-json file instead of measuring.",
    )
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child, args.quick, args.out)
        return 0
    if args.replot:
        with open(args.replot) as f:
            plot(json.load(f), args.plot)
        print(f"picture: {args.plot}")
        return 0
    print("# Cost against model size and tensor count")
    print()
    print("command: " + shlex.join(["python", "benchmarks/scaling.py", *argv]))
    print()
    rows = []
    backends = [b for b in args.backends.split(",") if b]
    for backend in backends:
        with tempfile.TemporaryDirectory() as directory:
            out = os.path.join(directory, "rows.json")
            command = [sys.executable, os.path.abspath(__file__)]
            command += ["--child", backend, "--out", out]
            command += ["--quick"] if args.quick else []
            subprocess.run(
                command,
                check=True,
                env=dict(
                    os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3"
                ),
            )
            with open(out) as f:
                rows += json.load(f)
    for backend in backends:
        print(f"## {backend}")
        print()
        print(_table(rows, backend, args.markdown))
        print()
    if args.rows_json:
        with open(args.rows_json, "w") as f:
            json.dump(rows, f, indent=1)
    if args.plot:
        plot(rows, args.plot)
        print(f"picture: {args.plot}")
    print("benchmark: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
