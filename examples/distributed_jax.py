"""Data-parallel training on JAX with `keras.distribution`.

`DataParallel` over every device JAX sees (on a machine without
accelerators, N CPU devices made with
`XLA_FLAGS=--xla_force_host_platform_device_count=N`, set here before JAX
starts). The digits classifier trains with `model.fit` and keras_gradtools'
Adam (accumulation, noise, clipping); then the same model trains on one
device on the same global batches, and the script shows that the weights
agree and that every device holds the same copy.

    python examples/distributed_jax.py [--quick] [--devices N]
"""

import argparse
import os
import sys


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--accumulation-steps", type=int, default=4)
    parser.add_argument(
        "--devices", type=int, default=2, help="CPU devices without GPUs"
    )
    parser.add_argument("--quick", action="store_true", help="2 epochs")
    args = parser.parse_args(argv)
    os.environ["KERAS_BACKEND"] = "jax"
    os.environ.setdefault(
        "XLA_FLAGS", f"--xla_force_host_platform_device_count={args.devices}"
    )
    # XLA's CPU thread pool has max(cores, devices) threads and a waiting
    # collective holds one: more threads, so that forced devices sharing few
    # cores cannot all wait (docs/distributed.md, "Forced CPU devices").
    os.environ.setdefault("PJRT_NPROC", str(4 * args.devices))
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import jax
    import keras
    import numpy as np
    from sklearn.datasets import load_digits

    import keras_gradtools as kg

    epochs = 2 if args.quick else args.epochs
    digits = load_digits()
    # Every batch, the last one included, must split evenly over the
    # devices (a JAX sharding rule): whole batches only.
    n = len(digits.data) // args.batch_size * args.batch_size
    x = (digits.data[:n] / 16.0).astype("float32")
    y = digits.target[:n].astype("int32")
    initial = None

    def train(distribution):
        nonlocal initial
        keras.distribution.set_distribution(distribution)
        model = keras.Sequential(
            [
                keras.Input((64,)),
                keras.layers.Dense(64, activation="relu"),
                keras.layers.Dense(10),
            ]
        )
        if initial is None:
            initial = model.get_weights()
        model.set_weights(initial)
        model.compile(
            optimizer=kg.Adam(
                2e-3,
                accumulation_steps=args.accumulation_steps,
                noise_eta=1e-4,
                noise_seed=0,
                global_clipnorm=1.0,
            ),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
        )
        history = model.fit(
            x, y, batch_size=args.batch_size, epochs=epochs, shuffle=False,
            verbose=0,
        )  # fmt: skip
        keras.distribution.set_distribution(None)
        return model, history

    devices = jax.devices()
    model, history = train(keras.distribution.DataParallel(devices=devices))
    single, _ = train(None)
    difference = max(
        float(np.max(np.abs(a - b)))
        for a, b in zip(model.get_weights(), single.get_weights())
    )
    identical = all(
        len({np.asarray(s.data).tobytes() for s in v.value.addressable_shards})
        == 1
        for v in model.trainable_variables
    )
    print(
        f"DataParallel over {len(devices)} {devices[0].platform} devices, "
        f"global batch {args.batch_size}: train accuracy "
        f"{history.history['accuracy'][-1]:.4f}"
    )
    print(f"devices' weights bitwise identical: {identical}")
    print(f"max |w(DataParallel) - w(one device)| = {difference:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
