"""The compiled step of `keras_gradtools.callbacks.GradientProbe`, one per
backend: one batch's gradient of the training loss at the model's current
weights, added with its square to running sums, leaving every variable as
it was. TensorFlow or JAX is imported by the function of its backend only."""

import keras
from keras import ops


def moments_function(model):
    """`(x, y, sample_weight, sums, squares) -> (sums, squares)`: adds one
    batch's float32 gradient of the training loss, at the model's current
    weights, and its square, leaving every variable as it was. One compiled
    call per batch (the sums never leave the device between batches)."""
    if keras.backend.backend() == "jax":
        return _jax_moments_function(model)
    return _tensorflow_moments_function(model)


def _add_moments(sums, squares, grads):
    return (
        [s + g for s, g in zip(sums, grads)],
        [q + g * g for q, g in zip(squares, grads)],
    )


def _tensorflow_moments_function(model):
    import tensorflow as tf

    @tf.function
    def add_batch(x, y, sample_weight, sums, squares):
        # Forward in training mode moves what it moves (BatchNormalization
        # statistics, the loss metric, seed generators): put back in-graph,
        # after the gradient, as each batch must start from the same state.
        state = model.non_trainable_variables + model.metrics_variables
        saved = [tf.identity(v.value) for v in state]
        with tf.GradientTape() as tape:
            y_pred = model(x, training=True)
            loss = model.compute_loss(
                x, y, y_pred, sample_weight, training=True
            )
        grads = [
            tf.zeros(v.shape, "float32")
            if g is None
            else tf.cast(tf.convert_to_tensor(g), "float32")
            for g, v in zip(
                tape.gradient(loss, model.trainable_variables),
                model.trainable_variables,
            )
        ]
        with tf.control_dependencies(grads):
            for variable, value in zip(state, saved):
                variable.assign(value)
        return _add_moments(sums, squares, grads)

    return add_batch


def _jax_moments_function(model):
    import jax

    def loss(trainable, non_trainable, metrics, optimizer, x, y, weight):
        scaled, _ = model.compute_loss_and_updates(
            trainable,
            non_trainable,
            metrics,
            x,
            y,
            weight,
            training=True,
            optimizer_variables=optimizer,
        )
        return scaled

    @jax.jit
    def add_batch(state, x, y, weight, scale, sums, squares):
        grads = jax.grad(loss)(*state, x, y, weight)
        # The loss was scaled for mixed precision (`optimizer.scale_loss`).
        return _add_moments(
            sums, squares, [g.astype("float32") / scale for g in grads]
        )

    def add(x, y, sample_weight, sums, squares):
        optimizer = model.optimizer
        state = tuple(
            [v.value for v in variables]
            for variables in (
                model.trainable_variables,
                model.non_trainable_variables,
                model.metrics_variables,
                optimizer.variables,
            )
        )
        scale = optimizer.scale_loss(ops.ones((), "float32"))
        return add_batch(state, x, y, sample_weight, scale, sums, squares)

    return add
