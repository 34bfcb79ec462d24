"""Save in the middle of an accumulation cycle, load, continue: the weights
equal those of a run that never stopped, bit for bit (noise on).

    python examples/resume.py [--quick] [--output-dir DIR]
"""

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

import keras_gradtools as kg  # noqa: E402


def build(seed=0):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(32, activation="relu"),
            keras.layers.Dense(10),
        ]
    )
    model.compile(
        optimizer=kg.Adam(
            1e-2, accumulation_steps=4, noise_eta=1e-3, noise_seed=1
        ),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--output-dir", default=os.path.join("outputs", "resume")
    )
    parser.add_argument("--quick", action="store_true", help="fewer batches")
    args = parser.parse_args(argv)
    os.makedirs(args.output_dir, exist_ok=True)
    digits = load_digits()
    x = (digits.data / 16.0).astype("float32")
    y = digits.target.astype("int32")
    n = 320 if args.quick else len(x)
    first, rest = slice(0, 6 * 32), slice(6 * 32, n)

    model = build()
    model.fit(x[first], y[first], batch_size=32, shuffle=False, verbose=0)
    optimizer = model.optimizer
    position = int(optimizer.micro_steps) % optimizer.accumulation_steps
    path = os.path.join(args.output_dir, "mid_cycle.keras")
    model.save(path)
    print(
        f"saved {path}: {int(optimizer.iterations)} updates, "
        f"{position} of {optimizer.accumulation_steps} micro-batches into "
        "the next cycle"
    )

    resumed = keras.saving.load_model(path)
    for m in (model, resumed):
        m.fit(x[rest], y[rest], batch_size=32, shuffle=False, verbose=0)
    differences = [
        float(np.max(np.abs(a - b)))
        for a, b in zip(model.get_weights(), resumed.get_weights())
    ]
    identical = all(d == 0.0 for d in differences)
    print(
        f"summary: continued {int(resumed.optimizer.iterations)} updates in "
        f"both; largest weight difference {max(differences):.1e} "
        f"({'bitwise identical' if identical else 'DIFFERENT'})"
    )
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
