"""`model.fit` at K=1: ours against Keras's Adam, and what of the gap the
finite check explains (issue 25, item 3; docs/performance.md).

The model and data are fit_throughput.py's MLP (19.7M parameters,
micro-batch 64, 1,536 samples per timed epoch). Configurations, each one
compiled model, timed per epoch in interleaved rounds after a warm-up:

- `keras adam`: `keras.optimizers.Adam`;
- `ours`: `kg.Adam` (the default `on_nonfinite="skip"`);
- `ours on_nonfinite=apply`: no finite check (what Keras and optax do);
- `ours check without fallback` (a diagnosis, patched in this process
  only, after the models above are built): the check's sum per tensor
  without the exact fallback that runs under a conditional when the sum
  overflows;
- `ours gate off` (a diagnosis, patched while that one model is built and
  compiled, with the default check): the check is computed (and counted)
  as by default, but the rule's writes no longer wait for it (not a valid
  configuration: it measures what the update's dependence on the check
  costs, as against the check's reductions themselves).

    KERAS_BACKEND=jax python benchmarks/fit_k1.py [--rounds R] [--markdown]

`--quick` (a CI smoke test): a 64-wide MLP, 4 steps, one round.
"""

import argparse
import statistics
import time

import configurations

CONFIGURATIONS = (
    "keras adam",
    "ours",
    "ours on_nonfinite=apply",
    "ours gate off",
    "ours check without fallback",
)
WIDTH = 4400  # 64 -> 4400 -> 4400 -> 10: 19,694,410 parameters
BATCH = 64
STEPS = 24


def _without_fallback():
    """The finite check as the sum per tensor alone (diagnosis only)."""
    from keras import ops

    from keras_gradtools import transforms
    from keras_gradtools.transforms import reductions

    def all_finite(tensors, partial_sums=None):
        if partial_sums is None:
            partial_sums = [reductions.flat_sum(t) for t in tensors]
        return ops.isfinite(reductions.total(partial_sums))

    transforms.all_finite = all_finite


def _model(configuration, x, y, width):
    import keras

    import keras_gradtools as kg

    if configuration == "keras adam":
        optimizer = keras.optimizers.Adam(1e-4)
    elif configuration == "ours on_nonfinite=apply":
        optimizer = kg.Adam(1e-4, on_nonfinite="apply")
    else:
        optimizer = kg.Adam(1e-4)
    model = keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(width, activation="relu"),
            keras.layers.Dense(width, activation="relu"),
            keras.layers.Dense(10),
        ]
    )
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=True,
    )
    model.fit(x[: 2 * BATCH], y[: 2 * BATCH], batch_size=BATCH, verbose=0)
    return model


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    width, steps = (64, 4) if args.quick else (WIDTH, STEPS)
    if args.quick:
        args.rounds = 1
    import keras
    import numpy as np

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.random((BATCH * steps, 64), dtype="float32")
    y = rng.integers(0, 10, BATCH * steps)
    models = {}
    for configuration in CONFIGURATIONS:
        if configuration == "ours check without fallback":
            _without_fallback()
        restore = None
        if configuration == "ours gate off":
            restore = configurations.ungate_updates()
        models[configuration] = _model(configuration, x, y, width)
        if restore is not None:
            restore()
    times = {c: [] for c in CONFIGURATIONS}
    for round_ in range(args.rounds):
        shift = round_ % len(CONFIGURATIONS)
        for configuration in CONFIGURATIONS[shift:] + CONFIGURATIONS[:shift]:
            start = time.perf_counter()
            models[configuration].fit(x, y, batch_size=BATCH, verbose=0)
            times[configuration].append(time.perf_counter() - start)
    print(
        f"backend: {keras.backend.backend()}; MLP 64-{width}-{width}-10, "
        f"micro-batch {BATCH}, {BATCH * steps} samples per epoch, "
        f"{args.rounds} interleaved rounds"
    )
    reference = times[CONFIGURATIONS[0]]
    if args.markdown:
        print("| configuration | samples/s, median | vs Keras (min-max) |")
        print("| --- | ---: | ---: |")
    for configuration in CONFIGURATIONS:
        ratios = [r / t for r, t in zip(reference, times[configuration])]
        rate = BATCH * steps / statistics.median(times[configuration])
        spread = (
            f"{statistics.median(ratios):.2f} "
            f"({min(ratios):.2f}-{max(ratios):.2f})"
        )
        if args.markdown:
            print(f"| {configuration} | {rate:.0f} | {spread} |")
        else:
            print(f"{configuration:32s} {rate:7.0f} samples/s  {spread}")
    print("benchmark: ok")


if __name__ == "__main__":
    main()
