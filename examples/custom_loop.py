"""A custom training loop, on TensorFlow or JAX (KERAS_BACKEND).

Each `apply` consumes one micro-batch; with `accumulation_steps=4` the
weights move every 4th call.

- TensorFlow: `tf.GradientTape` + `optimizer.apply`. Called eagerly,
  `apply` runs as one XLA-compiled function (`jit_compile=True`, the
  default); with `--compiled-step` the whole step (forward, backward,
  update) is one `tf.function(jit_compile=True)` and the update traces
  into it.
- JAX: the loop Keras documents for JAX: the model's and the optimizer's
  state as arrays, `jax.value_and_grad` of `model.stateless_call`, and
  `optimizer.stateless_apply`, all in one `jax.jit` with the state's
  buffers donated (`--compiled-step` is then implied).

    python examples/custom_loop.py [--quick] [--compiled-step]
    KERAS_BACKEND=jax python examples/custom_loop.py [--quick]
"""

import argparse
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

import keras_gradtools as kg  # noqa: E402


def tensorflow_loop(model, optimizer, loss_fn, batches, epochs, compiled):
    import tensorflow as tf

    def step(xb, yb):
        with tf.GradientTape() as tape:
            loss = loss_fn(yb, model(xb, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply(grads, model.trainable_variables)
        return loss

    if compiled:
        step = tf.function(step, jit_compile=True)
    for epoch in range(epochs):
        losses = [float(step(xb, yb)) for xb, yb in batches]
        print(f"epoch {epoch + 1}/{epochs}: mean loss {np.mean(losses):.4f}")


def jax_loop(model, optimizer, loss_fn, batches, epochs):
    import jax

    def loss_of(trainable, non_trainable, xb, yb):
        predictions, non_trainable = model.stateless_call(
            trainable, non_trainable, xb, training=True
        )
        return loss_fn(yb, predictions), non_trainable

    gradient = jax.value_and_grad(loss_of, has_aux=True)

    @jax.jit
    def step(state, xb, yb):
        trainable, non_trainable, optimizer_state = state
        (loss, non_trainable), grads = gradient(
            trainable, non_trainable, xb, yb
        )
        trainable, optimizer_state = optimizer.stateless_apply(
            optimizer_state, grads, trainable
        )
        return loss, (trainable, non_trainable, optimizer_state)

    step = jax.jit(step.__wrapped__, donate_argnums=0)
    state = (
        [v.value for v in model.trainable_variables],
        [v.value for v in model.non_trainable_variables],
        [v.value for v in optimizer.variables],
    )
    for epoch in range(epochs):
        losses = []
        for xb, yb in batches:
            loss, state = step(state, xb, yb)
            losses.append(float(loss))
        print(f"epoch {epoch + 1}/{epochs}: mean loss {np.mean(losses):.4f}")
    # Write the arrays back into the variables.
    for variables, values in zip(
        (
            model.trainable_variables,
            model.non_trainable_variables,
            optimizer.variables,
        ),
        state,
    ):
        for variable, value in zip(variables, values):
            variable.assign(value)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--accumulation-steps", type=int, default=4)
    parser.add_argument(
        "--compiled-step",
        action="store_true",
        help="TensorFlow: compile the whole step (always so on JAX)",
    )
    parser.add_argument("--quick", action="store_true", help="2 epochs")
    args = parser.parse_args(argv)
    epochs = 2 if args.quick else args.epochs
    backend = keras.backend.backend()

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
    size = args.batch_size
    batches = [
        (x[i : i + size], y[i : i + size]) for i in range(0, len(x), size)
    ]
    start = time.perf_counter()
    if backend == "jax":
        jax_loop(model, optimizer, loss_fn, batches, epochs)
        how = "one jax.jit step, donated buffers"
    else:
        tensorflow_loop(
            model, optimizer, loss_fn, batches, epochs, args.compiled_step
        )
        how = "one XLA step" if args.compiled_step else "XLA-compiled apply"
    seconds = time.perf_counter() - start
    predictions = keras.ops.convert_to_numpy(model(x))
    accuracy = float(np.mean(np.argmax(predictions, axis=-1) == y))
    micro = int(keras.ops.convert_to_numpy(optimizer.micro_steps))
    updates = int(keras.ops.convert_to_numpy(optimizer.iterations))
    print(
        f"\nsummary: {micro} micro-batches, {updates} updates "
        f"(accumulation_steps={args.accumulation_steps}), train accuracy "
        f"{accuracy:.4f}, {seconds:.1f} s, {backend}, {how}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
