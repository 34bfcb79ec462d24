"""The pieces of an update under XLA on CPU, timed side by side.

Usage:

    python benchmarks/xla_pieces.py [--quick] [--markdown]

The README explains the missed performance targets with these numbers:
what the finite check, a sum of squares (global-norm clipping, the gradient
statistics) and the two halves of the noise (Threefry words, the inverse
transform) each cost on the tensors of `benchmarks/step_cost.py`, against
the same memory-bandwidth floor. Every piece is the package's own function,
compiled alone with `tf.function(jit_compile=True)` and writing its result
to a variable (or, for a reduction, a scalar), so that XLA cannot drop it.
Pieces are timed interleaved over R rounds; ratios are taken per round.
`--quick` is a format smoke test; timings are never asserted. Prints
`benchmark: ok` last.
"""

import argparse
import datetime
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import machine  # noqa: E402  (benchmarks/machine.py)
import report  # noqa: E402  (benchmarks/report.py)
import step_cost  # noqa: E402  (the same tensors)

# (row name, key).
PIECES = (
    ("floor: v.assign(a*v + g)", "floor"),
    ("copy: the words to floats, no transform", "copy"),
    ("finite check: all_finite(grads)", "finite"),
    ("sum of squares: global_norm(grads)", "global_norm"),
    ("Threefry-2x32-20 words, one per sample", "threefry"),
    ("inverse transform: normal_from_bits", "ours_erfinv"),
    ("the same with ops.erfinv", "ops_erfinv"),
    ("whole draw: standard_normal", "normal"),
)

# (label, numerator, denominator, subtract "copy" from both first).
RATIOS = (
    ("finite check / floor", "finite", "floor", False),
    ("sum of squares / finite check", "global_norm", "finite", False),
    ("whole draw / floor", "normal", "floor", False),
    ("Threefry words / whole draw", "threefry", "normal", False),
    ("ops.erfinv / ours, net of the copy", "ops_erfinv", "ours_erfinv", True),
)


def _pieces(shapes, seed):
    """Returns {key: compiled function of no arguments}; each returns a
    scalar read of what it wrote, which the caller fetches to sync."""
    import math

    import numpy as np
    import tensorflow as tf
    from keras import ops

    from keras_gradtools.transforms import all_finite
    from keras_gradtools.transforms import global_norm
    from keras_gradtools.transforms import standard_normal
    from keras_gradtools.transforms.threefry import normal_from_bits
    from keras_gradtools.transforms.threefry import open_uniform
    from keras_gradtools.transforms.threefry import random_words

    rng = np.random.default_rng(seed)
    grads = [
        tf.constant((1e-3 * rng.standard_normal(s)).astype("float32"))
        for s in shapes
    ]
    count = sum(math.prod(s) for s in shapes)
    flat = tf.Variable(tf.zeros((count,)))
    words = tf.Variable(
        rng.integers(0, 2**32, size=count, dtype=np.uint64).astype("uint32")
    )
    states = [tf.Variable(tf.zeros(s)) for s in shapes]
    scalar = tf.Variable(0.0)
    flag = tf.Variable(False)
    step = tf.Variable(0, dtype=tf.int64)

    def floor():
        for v, g in zip(states, grads):
            v.assign(0.9 * v + g)
        return states[0][0, 0]

    def copy():
        flat.assign(2.0 * tf.cast(words, tf.float32))
        return flat[0]

    def finite():
        flag.assign(all_finite(grads))
        return flag.value()

    def norm():
        scalar.assign(global_norm(grads))
        return scalar.value()

    def threefry():
        words.assign(random_words(count, (7, 0), step))
        step.assign_add(1)
        return words[0]

    def ours_erfinv():
        flat.assign(normal_from_bits(words))
        return flat[0]

    def ops_erfinv():
        flat.assign(math.sqrt(2.0) * ops.erfinv(open_uniform(words)))
        return flat[0]

    def normal():
        flat.assign(standard_normal(count, (7, 0), step))
        step.assign_add(1)
        return flat[0]

    functions = {
        "floor": floor,
        "copy": copy,
        "finite": finite,
        "global_norm": norm,
        "threefry": threefry,
        "ours_erfinv": ours_erfinv,
        "ops_erfinv": ops_erfinv,
        "normal": normal,
    }

    compiled = {
        k: tf.function(f, jit_compile=True) for k, f in functions.items()
    }
    return compiled


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="benchmarks/xla_pieces.py", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args(argv)
    import keras
    import tensorflow as tf

    params = 50_000 if args.quick else 4_000_000
    rounds, calls = (2, 2) if args.quick else (20, 10)
    shapes = step_cost._shapes(params)
    pieces = _pieces(shapes, seed=0)
    for f in pieces.values():  # compile
        f().numpy()
    seconds = {key: [] for key in pieces}
    keys = list(pieces)
    for r in range(rounds):
        for key in keys[r % len(keys) :] + keys[: r % len(keys)]:
            start = time.perf_counter()
            for _ in range(calls):
                last = pieces[key]()
            last.numpy()
            seconds[key].append((time.perf_counter() - start) / calls)

    n = sum(a * b for a, b in shapes)
    print("# keras_gradtools: the pieces of an update under XLA\n")
    print(
        "command:  python benchmarks/xla_pieces.py "
        + " ".join(sys.argv[1:] if argv is None else argv)
    )
    print(f"date:     {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC")
    print(
        f"cpu:      {machine.cpu_model()} "
        f"({machine.cpu_count()} cores available)"
    )
    print(f"software: TensorFlow {tf.__version__}, Keras {keras.__version__}")
    print(
        f"model:    {n:,} float32 values in {len(shapes)} tensors "
        f"(those of step_cost.py); {rounds} interleaved rounds of {calls} "
        "calls, a sync after each block\n"
    )
    rows = [
        [name, *(f"{v * 1e3:.3f}" for v in report.summary(seconds[key]))]
        for name, key in PIECES
    ]
    print(
        report.format_table(
            ["piece", "min ms", "median ms", "max ms"], rows, args.markdown
        )
    )
    print()
    rows = []
    for label, a, b, net in RATIOS:
        values = []
        for i in range(rounds):
            x, y = seconds[a][i], seconds[b][i]
            if net:
                x, y = x - seconds["copy"][i], y - seconds["copy"][i]
            values.append(x / y)
        lo, mid, hi = report.summary(values)
        rows.append([label, f"{mid:.3f}", f"{lo:.3f}", f"{hi:.3f}"])
    print(
        report.format_table(
            ["ratio", "median", "min", "max"], rows, args.markdown
        )
    )
    print("\nbenchmark: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
