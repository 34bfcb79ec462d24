"""Per-step cost of keras_gradtools optimizers against Keras's own.

Usage:

    python benchmarks/step_cost.py [--quick] [--params N] [--repeats R]
                                   [--markdown]

Every configuration is timed the way `model.fit` runs an optimizer: one
`tf.function(jit_compile=True)` per configuration calls `opt.apply(grads,
variables)` exactly once per call, so the update traces into the caller's
XLA cluster. The variables are float32 tensors of about N parameters in
total, split over four matrices of transformer-like shapes; the gradients
are fixed random tensors passed in as arguments (the same ones for every
configuration).

Method:

- Configurations are timed interleaved: R rounds, and in every round each
  configuration runs one block of calls (the order rotates from round to
  round). A block is a multiple of K = accumulation_steps calls that starts
  at the first micro-batch of a cycle, so its mean is exactly the mean cost
  per micro-batch. The host syncs (reads a scalar variable) after each
  block; the sync is inside the timed interval.
- For K > 1 configurations each round also times, at the same cycle phase
  every time, the K - 1 accumulate-only calls of a few cycles as one
  interval and the update call (the K-th) as another, with a sync after
  each interval. The per-call sync cost (also measured, reported in the
  header) is included in these two numbers, once per interval.
- Reported: min / median / max over rounds of the per-call time, and
  ratios computed per round (from the same round's blocks) and then
  summarized, so that slow drifts of the machine cancel.

Absolute times are for reference only; the ratios are what the targets
are about. The script never asserts timings (`--quick` is a format smoke
test for CI) and prints `benchmark: ok` as its last line.
"""

import argparse
import datetime
import math
import os
import platform
import shlex
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import machine  # noqa: E402  (benchmarks/machine.py)
import report  # noqa: E402  (benchmarks/report.py)

K = 4  # accumulation steps of the accumulating configurations

# (row name, key, K). Keys are resolved in `_make_optimizer`, so importing
# this module does not import Keras or TensorFlow.
CONFIGS = (
    ("floor: XLA v.assign(a*v + g)", "floor", 1),
    ("keras SGD(momentum=0.9)", "keras_sgd", 1),
    ("ours SGD(momentum=0.9)", "ours_sgd", 1),
    ('ours SGD(momentum=0.9) on_nonfinite="apply"', "ours_sgd_apply", 1),
    ("keras Adam", "keras_adam", 1),
    ("ours Adam", "ours_adam", 1),
    ('ours Adam on_nonfinite="apply"', "ours_adam_apply", 1),
    ("keras AdamW", "keras_adamw", 1),
    ("ours AdamW", "ours_adamw", 1),
    (f"keras Adam(gradient_accumulation_steps={K})", "keras_adam_k", K),
    (f"ours Adam K={K} macro", "ours_adam_k_macro", K),
    (f"ours Adam K={K} micro", "ours_adam_k_micro", K),
    (
        f'ours Adam K={K} macro on_nonfinite="apply"',
        "ours_adam_k_macro_apply",
        K,
    ),
    (
        f"ours Adam K={K} micro track_gradient_statistics",
        "ours_adam_k_statistics",
        K,
    ),
    (
        f"ours Adam K={K} macro track_gradient_statistics",
        "ours_adam_k_macro_statistics",
        K,
    ),
    ("ours Adam noise_eta=0.01", "ours_adam_noise", 1),
    ("ours Adam global_clipnorm=1", "ours_adam_clip", 1),
    (
        f"ours Adam K={K} micro + noise + global_clipnorm=1",
        "ours_adam_k_full",
        K,
    ),
)

# (label, numerator key, denominator key or "ideal", target or None). A
# ratio is computed per round from that round's per-call times.
RATIOS = (
    ("ours/keras Adam (K=1)", "ours_adam", "keras_adam", 1.10),
    (
        'ours on_nonfinite="apply" / keras Adam (K=1)',
        "ours_adam_apply",
        "keras_adam",
        None,
    ),
    ("ours/keras SGD (K=1)", "ours_sgd", "keras_sgd", 1.10),
    (
        'ours on_nonfinite="apply" / keras SGD (K=1)',
        "ours_sgd_apply",
        "keras_sgd",
        None,
    ),
    ("ours/keras AdamW (K=1)", "ours_adamw", "keras_adamw", 1.10),
    (
        f"ours K={K} macro / keras K={K} (per micro-batch)",
        "ours_adam_k_macro",
        "keras_adam_k",
        0.5,
    ),
    (
        f"ours K={K} micro / keras K={K} (per micro-batch)",
        "ours_adam_k_micro",
        "keras_adam_k",
        0.5,
    ),
    (f"ours K={K} macro / ideal", "ours_adam_k_macro", "ideal", 1.3),
    (f"ours K={K} micro / ideal", "ours_adam_k_micro", "ideal", 1.3),
    (
        f'ours K={K} macro on_nonfinite="apply" / ideal',
        "ours_adam_k_macro_apply",
        "ideal",
        None,
    ),
    (
        f"ours K={K} micro / macro",
        "ours_adam_k_micro",
        "ours_adam_k_macro",
        1.2,
    ),
    ("noise / no noise (ours Adam K=1)", "ours_adam_noise", "ours_adam", 3.0),
    (
        "global_clipnorm / without (ours Adam K=1)",
        "ours_adam_clip",
        "ours_adam",
        1.15,
    ),
    (
        f"statistics on / off (ours K={K} micro)",
        "ours_adam_k_statistics",
        "ours_adam_k_micro",
        1.1,
    ),
    (
        f"statistics on / off (ours K={K} macro)",
        "ours_adam_k_macro_statistics",
        "ours_adam_k_macro",
        1.1,
    ),
    ("full pipeline / ideal", "ours_adam_k_full", "ideal", None),
    (
        f"full pipeline / ours K={K} micro",
        "ours_adam_k_full",
        "ours_adam_k_micro",
        None,
    ),
)


def _parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="benchmarks/step_cost.py",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="Tiny sizes (~50k parameters) and 2 rounds: a format smoke "
        "test, not a measurement.",
    )
    parser.add_argument(
        "--params",
        type=int,
        default=None,
        help="Total number of parameters (default 4M, or 50k with --quick).",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="Number of interleaved rounds R (default 30, or 2 with --quick).",
    )
    parser.add_argument(
        "--markdown",
        action="store_true",
        help="Print the tables as GitHub markdown tables.",
    )
    args = parser.parse_args(argv)
    if args.params is None:
        args.params = 50_000 if args.quick else 4_000_000
    if args.repeats is None:
        args.repeats = 2 if args.quick else 30
    if args.params < 12 * 8 * 8:
        parser.error("--params must be at least 768")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    return args


def _shapes(num_params):
    """Four matrices of a transformer block of width d: QKV (d, 3d), the
    attention output (d, d), the MLP up (d, 4d) and down (4d, d) projections,
    12 d**2 parameters in all, with d a multiple of 8."""
    d = max(8, int(round(math.sqrt(num_params / 12) / 8)) * 8)
    return [(d, 3 * d), (d, d), (d, 4 * d), (4 * d, d)]


# ----------------------------------------------------------------------
# Machine description.


# ----------------------------------------------------------------------
# Configurations.


def _make_optimizer(key):
    import keras

    import keras_gradtools as kg

    makers = {
        "keras_sgd": lambda: keras.optimizers.SGD(momentum=0.9),
        "ours_sgd": lambda: kg.SGD(momentum=0.9),
        "ours_sgd_apply": lambda: kg.SGD(momentum=0.9, on_nonfinite="apply"),
        "keras_adam": lambda: keras.optimizers.Adam(),
        "ours_adam": lambda: kg.Adam(),
        "ours_adam_apply": lambda: kg.Adam(on_nonfinite="apply"),
        "keras_adamw": lambda: keras.optimizers.AdamW(),
        "ours_adamw": lambda: kg.AdamW(),
        "keras_adam_k": lambda: keras.optimizers.Adam(
            gradient_accumulation_steps=K
        ),
        "ours_adam_k_macro": lambda: kg.Adam(
            accumulation_steps=K, second_moment="macro"
        ),
        "ours_adam_k_micro": lambda: kg.Adam(
            accumulation_steps=K, second_moment="micro"
        ),
        "ours_adam_k_macro_apply": lambda: kg.Adam(
            accumulation_steps=K, second_moment="macro", on_nonfinite="apply"
        ),
        "ours_adam_k_statistics": lambda: kg.Adam(
            accumulation_steps=K,
            second_moment="micro",
            track_gradient_statistics=True,
        ),
        "ours_adam_k_macro_statistics": lambda: kg.Adam(
            accumulation_steps=K,
            second_moment="macro",
            track_gradient_statistics=True,
        ),
        "ours_adam_noise": lambda: kg.Adam(noise_eta=0.01, noise_seed=1),
        "ours_adam_clip": lambda: kg.Adam(global_clipnorm=1.0),
        "ours_adam_k_full": lambda: kg.Adam(
            accumulation_steps=K,
            second_moment="micro",
            noise_eta=0.01,
            noise_seed=1,
            global_clipnorm=1.0,
        ),
    }
    return makers[key]()


class _Case:
    """One configuration: its variables, compiled step and sync."""

    def __init__(self, name, key, k, shapes, grads, seed):
        import keras
        import numpy as np
        import tensorflow as tf

        self.name = name
        self.key = key
        self.k = k
        self.calls = 0
        rng = np.random.default_rng(seed)
        self.variables = [
            keras.Variable(
                (0.02 * rng.standard_normal(s)).astype("float32"),
                name=f"w{i}",
            )
            for i, s in enumerate(shapes)
        ]
        self.num_params = sum(int(np.prod(s)) for s in shapes)
        variables = self.variables
        if key == "floor":
            self.optimizer = None
            decay = tf.constant(0.9, tf.float32)

            @tf.function(jit_compile=True)
            def step(grads):
                for v, g in zip(variables, grads):
                    v.assign(decay * v + g)

            probe = variables[0]
            self._sync = lambda: float(probe[0, 0])
            self.state_bytes = None
        else:
            opt = _make_optimizer(key)
            opt.build(variables)
            self.optimizer = opt

            @tf.function(jit_compile=True)
            def step(grads):
                opt.apply(grads, variables)

            self._sync = lambda: int(opt.iterations.numpy())
            self.state_bytes = sum(
                int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize
                for v in opt.variables
            )
        # One tf.function per configuration, all from this same code, so
        # TF's "frequent retracing" heuristic would warn; each one traces
        # exactly once, which `check` asserts.
        step._omit_frequent_tracing_warning = True
        self._step = step
        self._grads = grads

    def call(self, n):
        step, grads = self._step, self._grads
        for _ in range(n):
            step(grads)
        self.calls += n

    def sync(self):
        return self._sync()

    def timed_block(self, n):
        """Seconds per call over `n` calls (a multiple of K), one sync."""
        assert n % self.k == 0 and self.calls % self.k == 0
        start = time.perf_counter()
        self.call(n)
        self.sync()
        return (time.perf_counter() - start) / n

    def timed_phases(self, cycles):
        """(seconds per accumulate-only call, seconds per update call) over
        `cycles` cycles; a sync ends every timed interval."""
        assert self.k > 1 and self.calls % self.k == 0
        accumulate = update = 0.0
        self.sync()
        for _ in range(cycles):
            start = time.perf_counter()
            self.call(self.k - 1)
            self.sync()
            middle = time.perf_counter()
            self.call(1)
            self.sync()
            end = time.perf_counter()
            accumulate += middle - start
            update += end - middle
        return accumulate / (cycles * (self.k - 1)), update / cycles

    def check(self):
        """Sanity checks after the run: the blocks stayed aligned with the
        cycles, every update ran, and the weights are finite."""
        import numpy as np

        assert self.calls % self.k == 0, (self.name, self.calls)
        if self.optimizer is not None:
            updates = int(self.optimizer.iterations.numpy())
            assert updates == self.calls // self.k, (
                self.name,
                updates,
                self.calls,
            )
        for v in self.variables:
            assert np.isfinite(v.numpy()).all(), self.name
        traces = self._step.experimental_get_tracing_count()
        assert traces == 1, (self.name, traces)


def _measure_sync_overhead(case, repeats=200):
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        case.sync()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


# ----------------------------------------------------------------------
# Reporting.


def _ms(seconds):
    return f"{seconds * 1e3:.3f}"


def main(argv=None):
    """Runs the benchmark and prints the report. Returns 0."""
    if argv is None:
        argv = sys.argv[1:]
    argv = list(argv)
    args = _parse_args(argv)
    started = time.perf_counter()

    # Only effective if Keras / TensorFlow are not imported yet.
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import numpy as np
    import tensorflow as tf

    if keras.backend.backend() != "tensorflow":
        raise SystemExit(
            "benchmarks/step_cost.py needs the TensorFlow backend "
            f"(KERAS_BACKEND=tensorflow), not {keras.backend.backend()!r}."
        )
    keras.utils.set_random_seed(0)

    shapes = _shapes(args.params)
    num_params = sum(a * b for a, b in shapes)
    rng = np.random.default_rng(1234)
    grads = [
        tf.constant((1e-3 * rng.standard_normal(s)).astype("float32"))
        for s in shapes
    ]
    # A block of calls per round; a multiple of K, long enough that the
    # one sync per block is noise (~0.1-0.3 s per block at 4M parameters).
    if args.quick:
        block, phase_cycles = 2 * K, 1
    else:
        block = max(K, int(round(16 * 4e6 / max(num_params, 1) / K)) * K)
        block = min(block, 64 * K)
        phase_cycles = max(2, block // (2 * K))

    print("# keras_gradtools optimizer step cost")
    print()
    command = shlex.join(["python", "benchmarks/step_cost.py", *argv])
    print(f"command:  {command}")
    print(f"date:     {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}")
    cores = machine.cpu_count()
    print(f"cpu:      {machine.cpu_model()} ({cores} cores available)")
    print(f"load:     {_load()} (1/5/15-min load average at start)")
    print(
        f"software: Python {platform.python_version()}, TensorFlow "
        f"{tf.__version__}, Keras {keras.__version__}, "
        f"keras_gradtools {_version()}{_git_revision()}"
    )
    print(
        f"model:    {num_params:,} float32 parameters in "
        f"{len(shapes)} tensors {', '.join(f'{a}x{b}' for a, b in shapes)}"
    )
    print(
        f"method:   every step is tf.function(jit_compile=True) calling "
        f"opt.apply once; {args.repeats} interleaved rounds, "
        f"{block} calls per block, + {phase_cycles} cycle(s) of phase "
        f"timing per round for K={K}"
    )
    print()

    cases = []
    build_start = time.perf_counter()
    for index, (name, key, k) in enumerate(CONFIGS):
        case = _Case(name, key, k, shapes, grads, seed=index)
        # Trace, compile and warm up (two full cycles).
        case.call(2 * k if args.quick else 4 * k)
        case.sync()
        cases.append(case)
    build_seconds = time.perf_counter() - build_start
    sync_overhead = _measure_sync_overhead(cases[-1])

    per_call = {case.key: [] for case in cases}
    accumulate_only = {case.key: [] for case in cases if case.k > 1}
    update_only = {case.key: [] for case in cases if case.k > 1}
    for round_index in range(args.repeats):
        shift = round_index % len(cases)
        order = cases[shift:] + cases[:shift]
        for case in order:
            per_call[case.key].append(case.timed_block(block))
            if case.k > 1:
                acc, upd = case.timed_phases(phase_cycles)
                accumulate_only[case.key].append(acc)
                update_only[case.key].append(upd)
    for case in cases:
        case.check()
    measure_seconds = time.perf_counter() - build_start - build_seconds

    per_call["ideal"] = [
        (3 * f + a) / 4
        for f, a in zip(per_call["floor"], per_call["keras_adam"])
    ]

    # Table 1: per-call times and optimizer state.
    keras_state = {
        "ours_sgd": "keras_sgd",
        "ours_adam": "keras_adam",
        "ours_adamw": "keras_adamw",
        "ours_adam_k_macro": "keras_adam_k",
        "ours_adam_k_micro": "keras_adam_k",
        "ours_adam_k_macro_apply": "keras_adam_k",
        "ours_adam_k_statistics": "keras_adam_k",
        "ours_adam_k_macro_statistics": "keras_adam_k",
        "ours_adam_noise": "keras_adam",
        "ours_adam_clip": "keras_adam",
        "ours_adam_k_full": "keras_adam_k",
    }
    by_key = {case.key: case for case in cases}
    header = [
        "config",
        "K",
        "median ms/call",
        "min",
        "max",
        "accumulate-only ms",
        "update ms",
        "state B/param",
        "Keras's B/param",
    ]
    rows = []
    for case in cases:
        lo, mid, hi = report.summary(per_call[case.key])
        if case.k > 1:
            acc = _ms(statistics.median(accumulate_only[case.key]))
            upd = _ms(statistics.median(update_only[case.key]))
        else:
            acc = upd = "-"
        if case.state_bytes is None:
            state = reference = "-"
        else:
            state = f"{case.state_bytes / num_params:.2f}"
            other = keras_state.get(case.key)
            reference = (
                f"{by_key[other].state_bytes / num_params:.2f}" if other else ""
            )
        rows.append(
            [
                case.name,
                str(case.k),
                _ms(mid),
                _ms(lo),
                _ms(hi),
                acc,
                upd,
                state,
                reference,
            ]
        )
    lo, mid, hi = report.summary(per_call["ideal"])
    rows.append(
        [
            f"ideal K={K}: (3*floor + keras Adam)/4",
            str(K),
            _ms(mid),
            _ms(lo),
            _ms(hi),
            "",
            "",
            "",
            "",
        ]
    )
    print(
        "Per-call time (a call is one micro-batch; for K > 1 the mean over "
        "whole cycles), min/median/max over rounds. Accumulate-only and "
        "update columns: median over rounds, each timed at its cycle phase "
        f"with a sync after it (sync ~{sync_overhead * 1e3:.3f} ms, "
        "included). State: bytes of optimizer.variables per model parameter."
    )
    print()
    print(report.format_table(header, rows, args.markdown))
    print()

    # Table 2: ratios, computed per round.
    header = ["ratio", "median", "min", "max", "target", "met"]
    rows = []
    for label, num, den, target in RATIOS:
        values = [a / b for a, b in zip(per_call[num], per_call[den])]
        lo, mid, hi = report.summary(values)
        if target is None:
            target_text, met = "-", "-"
        else:
            target_text = f"<= {target:.2f}"
            met = "yes" if mid <= target else "NO"
        rows.append(
            [
                label,
                f"{mid:.3f}",
                f"{lo:.3f}",
                f"{hi:.3f}",
                target_text,
                met,
            ]
        )
    print(
        "Ratios of per-call (per micro-batch) times, computed per round; "
        "'met' compares the median with the target. "
        f"ideal = (3*floor + keras Adam K=1)/4 per micro-batch at K={K}."
    )
    print()
    print(report.format_table(header, rows, args.markdown))
    print()
    print(f"load:     {_load()} (1/5/15-min load average at the end)")
    total = time.perf_counter() - started
    print(
        f"runtime:  {total:.1f} s (compile + warm-up {build_seconds:.1f} s, "
        f"timed rounds {measure_seconds:.1f} s)"
    )
    if args.quick:
        print("note:     --quick is a smoke test; its times mean nothing.")
    print("benchmark: ok")
    return 0


def _load():
    try:
        return "/".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:  # pragma: no cover - not on Linux
        return "?"


def _git_revision():
    """` (git abc1234)`, `+dirty` with local changes; empty outside git."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        revision = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "keras_gradtools"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
    if not revision:
        return ""
    return f" (git {revision}{'+dirty' if dirty else ''})"


def _version():
    try:
        import keras_gradtools

        return keras_gradtools.__version__
    except Exception:  # pragma: no cover - only for a broken install
        return "?"


if __name__ == "__main__":
    sys.exit(main())
