"""A custom training loop: GradientTape + `optimizer.apply`, compiled by XLA.

Each `apply` consumes one micro-batch; with `accumulation_steps=4` the
weights move every 4th call. Called eagerly, `apply` runs as one
XLA-compiled function (`jit_compile=True`, the default); with
`--compiled-step` the whole step (forward, backward, update) is one
`tf.function(jit_compile=True)` and the update traces into it.

    python examples/custom_loop.py [--quick] [--compiled-step]
"""

import argparse
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

import keras_gradtools as kg  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--accumulation-steps", type=int, default=4)
    parser.add_argument("--compiled-step", action="store_true")
    parser.add_argument("--quick", action="store_true", help="2 epochs")
    args = parser.parse_args(argv)
    epochs = 2 if args.quick else args.epochs

    digits = load_digits()
    x = (digits.data / 16.0).astype("float32")
    y = digits.target.astype("int32")
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(10),
        ]
    )
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    optimizer = kg.Adam(
        3e-3,
        accumulation_steps=args.accumulation_steps,
        noise_eta=1e-4,
        noise_seed=0,
        global_clipnorm=1.0,
    )
    optimizer.build(model.trainable_variables)

    def step(xb, yb):
        with tf.GradientTape() as tape:
            loss = loss_fn(yb, model(xb, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply(grads, model.trainable_variables)
        return loss

    if args.compiled_step:
        step = tf.function(step, jit_compile=True)

    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(args.batch_size)
    start = time.perf_counter()
    for epoch in range(epochs):
        losses = [float(step(xb, yb)) for xb, yb in dataset]
        print(f"epoch {epoch + 1}/{epochs}: mean loss {np.mean(losses):.4f}")
    seconds = time.perf_counter() - start
    accuracy = float(np.mean(np.argmax(model(x), axis=-1) == y))
    print(
        f"\nsummary: {int(optimizer.micro_steps)} micro-batches, "
        f"{int(optimizer.iterations)} updates (accumulation_steps="
        f"{args.accumulation_steps}), train accuracy {accuracy:.4f}, "
        f"{seconds:.1f} s, "
        f"{'one XLA step' if args.compiled_step else 'XLA-compiled apply'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
