"""Per-micro-batch cost on JAX, side by side with the peers JAX users pick.

Usage:

    python benchmarks/jax_step_cost.py [--quick] [--params N] [--tensors T]
                                       [--repeats R] [--markdown]

Every configuration is one `jax.jit` step with the whole state donated
(`donate_argnums=0`), called once per micro-batch with fixed random
gradients: a bandwidth floor `v = a*v + g`, `optax.adam`,
`optax.MultiSteps(optax.adam(), 4)`, Keras's `Adam` (with and without
`gradient_accumulation_steps=4`) through `stateless_apply`, and ours through
`stateless_apply` in several settings. The parameters (N in all, default
16.8M) are T float32 matrices (default 8).

Method (as `step_cost.py`): configurations interleaved over R rounds, the
order rotating; in every round each runs a block of calls that is a
multiple of K = 4 starting at a cycle boundary, then blocks until the
result is ready; ratios are computed within each round and summarized
(median, min, max). Absolute times are for reference only; no timing is
asserted (`--quick` is a format smoke test for CI). Prints `benchmark: ok`
last.
"""

import argparse
import datetime
import os
import platform
import shlex
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import machine  # noqa: E402
import report  # noqa: E402

K = 4

# (row, key, K)
CONFIGS = (
    ("floor: v = a*v + g", "floor", 1),
    ("optax.adam", "optax_adam", 1),
    (f"optax.MultiSteps(optax.adam(), {K})", "optax_multisteps", K),
    ("keras Adam", "keras_adam", 1),
    (f"keras Adam(gradient_accumulation_steps={K})", "keras_adam_k", K),
    ('ours Adam on_nonfinite="apply"', "ours_adam_apply", 1),
    ("ours Adam", "ours_adam", 1),
    ('ours Adam global_clipnorm=1 on_nonfinite="apply"', "ours_adam_clip", 1),
    ('ours Adam noise_eta=0.01 on_nonfinite="apply"', "ours_adam_noise", 1),
    (f'ours Adam K={K} macro on_nonfinite="apply"', "ours_macro_apply", K),
    (f"ours Adam K={K} macro", "ours_macro", K),
    (f'ours Adam K={K} micro on_nonfinite="apply"', "ours_micro_apply", K),
    (f"ours Adam K={K} micro", "ours_micro", K),
    (
        f'ours Adam K={K} macro + statistics on_nonfinite="apply"',
        "ours_macro_statistics_apply",
        K,
    ),
    (f"ours Adam K={K} macro + statistics", "ours_macro_statistics", K),
)

# (label, numerator, denominator or "ideal", target)
RATIOS = (
    (
        f"ours K={K} macro / ideal (like with like)",
        "ours_macro_apply",
        "ideal",
        1.3,
    ),
    (f"ours K={K} macro default / ideal", "ours_macro", "ideal", None),
    (
        f"ours K={K} macro / optax MultiSteps",
        "ours_macro_apply",
        "optax_multisteps",
        None,
    ),
    (
        f"ours K={K} macro / keras K={K}",
        "ours_macro_apply",
        "keras_adam_k",
        None,
    ),
    (f"ours K={K} micro / macro", "ours_micro_apply", "ours_macro_apply", 1.2),
    (
        "ours K=1 / optax.adam (like with like)",
        "ours_adam_apply",
        "optax_adam",
        1.1,
    ),
    ("ours K=1 default / optax.adam", "ours_adam", "optax_adam", None),
    ("ours K=1 / keras Adam", "ours_adam_apply", "keras_adam", None),
    ("noise / no noise (K=1)", "ours_adam_noise", "ours_adam_apply", 3.0),
    (
        "global_clipnorm / without (K=1)",
        "ours_adam_clip",
        "ours_adam_apply",
        1.15,
    ),
    (
        f"statistics on / off (K={K} macro, default)",
        "ours_macro_statistics",
        "ours_macro",
        1.1,
    ),
    (
        f"statistics on / off (K={K} macro, like with like)",
        "ours_macro_statistics_apply",
        "ours_macro_apply",
        None,
    ),
    ("optax MultiSteps / ideal", "optax_multisteps", "ideal", None),
    (f"keras K={K} / ideal", "keras_adam_k", "ideal", None),
)


def _parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="benchmarks/jax_step_cost.py",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--params", type=int, default=None)
    parser.add_argument("--tensors", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args(argv)
    if args.params is None:
        args.params = 40_000 if args.quick else 16_777_216
    if args.repeats is None:
        args.repeats = 2 if args.quick else 15
    return args


def shapes(params, tensors):
    """`tensors` matrices of (rows, 1024) or smaller, `params` in all."""
    per = max(1, params // tensors)
    columns = 1024 if per >= 1024 * 8 else 8
    return [(max(1, per // columns), columns)] * tensors


class Case:
    """One configuration: its jitted, donated step and its state."""

    def __init__(self, name, key, k, grads, initial):
        import jax

        self.name, self.key, self.k = name, key, k
        self.calls = 0
        self.grads = grads
        self.step, self.state = _make(key, grads, initial)
        self.step = jax.jit(self.step, donate_argnums=0)

    def run(self, calls):
        import jax

        state, step, grads = self.state, self.step, self.grads
        for _ in range(calls):
            state = step(state, grads)
        jax.block_until_ready(state)
        self.state = state
        self.calls += calls

    def timed(self, calls):
        start = time.perf_counter()
        self.run(calls)
        return (time.perf_counter() - start) / calls


def _make(key, grads, initial):
    """`(step(state, grads) -> state, initial state)` for a configuration."""
    import jax.numpy as jnp
    import keras

    params = [jnp.asarray(w) for w in initial]
    if key == "floor":
        return (
            lambda state, g: [0.9 * v + x for v, x in zip(state, g)],
            params,
        )
    if key.startswith("optax"):
        import optax

        tx = optax.adam(1e-3)
        if key == "optax_multisteps":
            tx = optax.MultiSteps(tx, every_k_schedule=K)

        def optax_step(state, g):
            p, s = state
            updates, s = tx.update(g, s, p)
            return optax.apply_updates(p, updates), s

        return optax_step, (params, tx.init(params))
    optimizer = _keras_optimizer(key)
    variables = [keras.Variable(w) for w in initial]
    optimizer.build(variables)

    def keras_step(state, g):
        p, s = state
        p, s = optimizer.stateless_apply(s, g, p)
        return p, s

    return keras_step, (
        [v.value for v in variables],
        [v.value for v in optimizer.variables],
    )


def _keras_optimizer(key):
    import keras

    import keras_gradtools as kg

    apply = {"on_nonfinite": "apply"}
    return {
        "keras_adam": lambda: keras.optimizers.Adam(1e-3),
        "keras_adam_k": lambda: keras.optimizers.Adam(
            1e-3, gradient_accumulation_steps=K
        ),
        "ours_adam_apply": lambda: kg.Adam(1e-3, **apply),
        "ours_adam": lambda: kg.Adam(1e-3),
        "ours_adam_clip": lambda: kg.Adam(1e-3, global_clipnorm=1.0, **apply),
        "ours_adam_noise": lambda: kg.Adam(
            1e-3, noise_eta=0.01, noise_seed=1, **apply
        ),
        "ours_macro_apply": lambda: kg.Adam(
            1e-3, accumulation_steps=K, second_moment="macro", **apply
        ),
        "ours_macro": lambda: kg.Adam(
            1e-3, accumulation_steps=K, second_moment="macro"
        ),
        "ours_micro_apply": lambda: kg.Adam(
            1e-3, accumulation_steps=K, second_moment="micro", **apply
        ),
        "ours_micro": lambda: kg.Adam(
            1e-3, accumulation_steps=K, second_moment="micro"
        ),
        "ours_macro_statistics_apply": lambda: kg.Adam(
            1e-3,
            accumulation_steps=K,
            second_moment="macro",
            track_gradient_statistics=True,
            **apply,
        ),
        "ours_macro_statistics": lambda: kg.Adam(
            1e-3,
            accumulation_steps=K,
            second_moment="macro",
            track_gradient_statistics=True,
        ),
    }[key]()


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parse_args(argv)
    os.environ["KERAS_BACKEND"] = "jax"
    import jax
    import keras
    import numpy as np
    import optax

    if keras.backend.backend() != "jax":
        raise SystemExit("benchmarks/jax_step_cost.py needs KERAS_BACKEND=jax")
    rng = np.random.default_rng(0)
    layout = shapes(args.params, args.tensors)
    params = sum(a * b for a, b in layout)
    initial = [
        (0.02 * rng.standard_normal(s)).astype("float32") for s in layout
    ]
    grads = [
        jax.numpy.asarray((1e-3 * rng.standard_normal(s)).astype("float32"))
        for s in layout
    ]
    block = 2 * K if args.quick else max(K, int(round(64e6 / params / K)) * K)
    print("# keras_gradtools on JAX: optimizer step cost against the peers")
    print()
    print(
        "command:  "
        + shlex.join(["python", "benchmarks/jax_step_cost.py", *argv])
    )
    print(f"date:     {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}")
    cores = machine.cpu_count()
    print(f"cpu:      {machine.cpu_model()} ({cores} cores available)")
    print(
        f"software: Python {platform.python_version()}, JAX {jax.__version__}, "
        f"Keras {keras.__version__}, optax {optax.__version__}"
    )
    print(
        f"model:    {params:,} float32 parameters in {len(layout)} tensors "
        f"of {layout[0]}; K = {K}; {args.repeats} rounds of {block} calls"
    )
    print()
    cases = [Case(name, key, k, grads, initial) for name, key, k in CONFIGS]
    for case in cases:  # compile and warm up
        case.run(case.k * 2)
    times = {case.key: [] for case in cases}
    for round_index in range(args.repeats):
        shift = round_index % len(cases)
        for case in cases[shift:] + cases[:shift]:
            times[case.key].append(case.timed(block))
    rows = []
    for case in cases:
        low, median, high = report.summary(times[case.key])
        rows.append(
            [
                case.name,
                case.k,
                f"{median * 1e3:.2f}",
                f"{low * 1e3:.2f}",
                f"{high * 1e3:.2f}",
            ]
        )
    print("Per call (one micro-batch), ms:")
    print()
    print(
        report.format_table(
            ["config", "K", "median ms", "min", "max"], rows, args.markdown
        )
    )
    print()
    ratio_rows = []
    for label, top, bottom, target in RATIOS:
        values = []
        for r in range(args.repeats):
            if bottom == "ideal":
                below = (3 * times["floor"][r] + times["optax_adam"][r]) / 4
            else:
                below = times[bottom][r]
            values.append(times[top][r] / below)
        low, median, high = report.summary(values)
        met = "-" if target is None else ("yes" if median <= target else "NO")
        ratio_rows.append(
            [
                label,
                f"{median:.3f}",
                f"{low:.3f}",
                f"{high:.3f}",
                "-" if target is None else f"<= {target:.2f}",
                met,
            ]
        )
    print("Ratios (per round, then median / min / max):")
    print()
    print(
        report.format_table(
            ["ratio", "median", "min", "max", "target", "met"],
            ratio_rows,
            args.markdown,
        )
    )
    print()
    print("ideal = (3 * floor + optax.adam) / 4: per micro-batch, three bare")
    print("accumulations and one plain Adam step.")
    print("benchmark: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
