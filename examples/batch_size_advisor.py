"""Choose `accumulation_steps` from the measured gradient noise scale.

A short run with a GradientVarianceMonitor measures B_simple, the batch
size at which gradient noise equals the signal (McCandlish et al. 2018).
The script then suggests accumulation_steps ~ B_simple / micro-batch and
trains once more with it, to compare updates and accuracy.

    python examples/batch_size_advisor.py [--quick] [--batch-size 32]
"""

import argparse
import math
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

import keras_gradtools as kg  # noqa: E402


def train(x, y, accumulation_steps, batch_size, epochs, seed=0):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(10),
        ]
    )
    model.compile(
        optimizer=kg.Adam(2e-3, accumulation_steps=accumulation_steps),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    monitor = kg.GradientVarianceMonitor(
        probe_data=(x, y), batch_size=batch_size, verbose=0
    )
    history = model.fit(
        x, y, batch_size=batch_size, epochs=epochs, verbose=0,
        validation_split=0.2, callbacks=[monitor],
    )  # fmt: skip
    return model, history, monitor


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="2 epochs")
    args = parser.parse_args(argv)
    epochs = 2 if args.quick else args.epochs
    digits = load_digits()
    x = (digits.data / 16.0).astype("float32")
    y = digits.target.astype("int32")

    print(f"measuring: Adam, batch {args.batch_size}, {epochs} epochs ...")
    measured, history, monitor = train(x, y, 1, args.batch_size, epochs)
    scales = history.history["grad_noise_scale"]
    scale = float(np.median(scales))
    steps = (
        max(1, round(scale / args.batch_size)) if math.isfinite(scale) else 8
    )
    print(f"  {monitor.advice}")
    print(f"suggested accumulation_steps = {steps}\n")

    print(f"checking: accumulation_steps={steps} ...")
    model, tuned, _ = train(x, y, steps, args.batch_size, epochs)
    rows = [
        ("measured", 1, measured, history),
        ("suggested", steps, model, tuned),
    ]
    print(f"\n{'run':<10} {'K':>3} {'updates':>8} {'val acc':>8}")
    for name, k, trained, h in rows:
        updates = int(trained.optimizer.iterations)
        accuracy = h.history["val_accuracy"][-1]
        print(f"{name:<10} {k:>3} {updates:>8} {accuracy:>8.4f}")
    print(
        f"\nsummary: noise scale ~ {scale:.0f} samples (median over "
        f"{len(scales)} epochs) -> accumulation_steps={steps}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
