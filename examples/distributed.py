"""Data-parallel training with tf.distribute: accumulation, noise and
clipping on the gradient summed over replicas.

Picks the strategy the machine allows: TPUStrategy if a TPU is attached,
else MirroredStrategy over the GPUs, else MirroredStrategy over logical CPU
devices (2 by default; real data parallelism without an accelerator). It
trains the digits classifier with `model.fit` (or, with `--custom-loop`,
`strategy.run` inside `tf.function`: the loop that also works under
MultiWorkerMirroredStrategy), then trains the same model on one device with
the same global batches and shows that the weights agree and that every
replica's copy is bitwise identical.

    python examples/distributed.py [--quick] [--custom-loop] [--replicas N]
"""

import argparse
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import tensorflow as tf  # noqa: E402


def choose_strategy(cpu_replicas):
    """TPU, then GPUs, then logical CPUs. Must run before TensorFlow has
    initialised its devices (logical CPUs are configured here)."""
    try:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver()
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return tf.distribute.TPUStrategy(resolver), "TPU"
    except (ValueError, tf.errors.NotFoundError, RuntimeError):
        pass
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        return tf.distribute.MirroredStrategy(), f"{len(gpus)} GPU(s)"
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * cpu_replicas
    )
    devices = [f"/cpu:{i}" for i in range(cpu_replicas)]
    return (
        tf.distribute.MirroredStrategy(devices),
        f"{cpu_replicas} logical CPU devices",
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument(
        "--batch-size", type=int, default=64, help="global micro-batch"
    )
    parser.add_argument("--accumulation-steps", type=int, default=4)
    parser.add_argument(
        "--replicas", type=int, default=2, help="logical CPUs without GPUs"
    )
    parser.add_argument("--custom-loop", action="store_true")
    parser.add_argument("--quick", action="store_true", help="2 epochs")
    args = parser.parse_args(argv)
    epochs = 2 if args.quick else args.epochs
    strategy, where = choose_strategy(args.replicas)

    import keras
    import numpy as np
    from sklearn.datasets import load_digits

    import keras_gradtools as kg

    digits = load_digits()
    x = (digits.data / 16.0).astype("float32")
    y = digits.target.astype("int32")
    usable = len(x) // args.batch_size * args.batch_size
    x, y = x[:usable], y[:usable]  # whole global batches only

    def build():
        keras.utils.set_random_seed(0)
        model = keras.Sequential(
            [
                keras.Input((64,)),
                keras.layers.Dense(64, activation="relu"),
                keras.layers.Dense(10),
            ]
        )
        optimizer = kg.Adam(
            3e-3,
            accumulation_steps=args.accumulation_steps,
            second_moment="macro",
            noise_eta=1e-4,
            noise_seed=0,
            global_clipnorm=1.0,
            jit_compile=False,  # XLA cannot place logical CPU devices
        )
        return model, optimizer

    def train(strategy, verbose):
        with strategy.scope():
            model, optimizer = build()
            model.compile(
                optimizer=optimizer,
                loss=keras.losses.SparseCategoricalCrossentropy(
                    from_logits=True
                ),
                metrics=["accuracy"],
                jit_compile=False,
            )
            if args.custom_loop:
                # strategy.run needs the optimizer's state made beforehand.
                optimizer.build(model.trainable_variables)
        if not args.custom_loop:
            model.fit(
                x,
                y,
                batch_size=args.batch_size,
                epochs=epochs,
                shuffle=False,
                verbose=verbose,
            )
            return model, optimizer
        custom_loop(strategy, model, optimizer, verbose)
        return model, optimizer

    def custom_loop(strategy, model, optimizer, verbose):
        loss_fn = keras.losses.SparseCategoricalCrossentropy(
            from_logits=True, reduction="sum"
        )
        dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(
            args.batch_size
        )

        def replica_step(xb, yb):
            with tf.GradientTape() as tape:
                # Sum over the local batch / global batch: the replicas'
                # gradients then add up to the global-batch mean.
                loss = loss_fn(yb, model(xb, training=True)) / args.batch_size
            grads = tape.gradient(loss, model.trainable_variables)
            optimizer.apply(grads, model.trainable_variables)
            return loss

        @tf.function
        def step(xb, yb):
            losses = strategy.run(replica_step, args=(xb, yb))
            return strategy.reduce("SUM", losses, axis=None)

        distributed = strategy.experimental_distribute_dataset(dataset)
        for epoch in range(epochs):
            losses = [float(step(xb, yb)) for xb, yb in distributed]
            if verbose:
                print(
                    f"epoch {epoch + 1}/{epochs}: mean loss "
                    f"{np.mean(losses):.4f}"
                )

    print(
        f"Training on {where}: {strategy.num_replicas_in_sync} replicas, "
        f"global micro-batch {args.batch_size}, accumulation_steps="
        f"{args.accumulation_steps}, "
        f"{'custom loop (strategy.run)' if args.custom_loop else 'model.fit'}"
    )
    start = time.perf_counter()
    model, optimizer = train(strategy, verbose=1)
    seconds = time.perf_counter() - start
    print("Same global batches on one device, for comparison ...")
    single, _ = train(tf.distribute.get_strategy(), verbose=0)

    difference = max(
        float(np.max(np.abs(a - b)))
        for a, b in zip(model.get_weights(), single.get_weights())
    )
    identical = all(
        len({np.asarray(c).tobytes() for c in copies}) == 1
        for copies in (
            strategy.experimental_local_results(v.value)
            for v in model.trainable_variables
        )
    )
    accuracy = float(np.mean(np.argmax(model.predict(x, verbose=0), -1) == y))
    print(
        f"\nsummary: {strategy.num_replicas_in_sync} replicas on {where}; "
        f"{int(optimizer.iterations.numpy())} updates from "
        f"{int(optimizer.micro_steps.numpy())} micro-batches; train accuracy "
        f"{accuracy:.4f}; {seconds:.1f} s\n"
        f"  replicas' weights bitwise identical: {identical}\n"
        f"  max |w(strategy) - w(one device)| = {difference:.1e} "
        "(float32 rounding)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
