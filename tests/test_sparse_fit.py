"""`model.fit` with an `Embedding` on TensorFlow: the sparse path in a
traced step.

An `Embedding`'s gradient is a `tf.IndexedSlices` whose number of rows is
unknown when `fit` traces its step. With `accumulation_steps >= 2` those
rows are scattered into the sums, and the finite check, the statistics and
clipping reduce them; each must take a tensor of unknown static length
(issue 23: `fit` failed there with `None // int`). Every configuration is
compared with the same training through `apply` with the Embedding's
gradient densified first, on the same batches.
"""

import functools

import keras
import numpy as np
import pytest

import keras_gradtools as kg

pytestmark = pytest.mark.tensorflow_only  # IndexedSlices are TensorFlow's

VOCABULARY, LENGTH, BATCH, BATCHES = 30, 6, 8, 8
# Ids below 24 only: rows 24..29 get no gradient (and must not move).
USED_IDS = 24


def _data():
    rng = np.random.default_rng(0)
    # Repeated ids within a batch: their rows are summed before scattering.
    x = rng.integers(0, USED_IDS, size=(BATCH * BATCHES, LENGTH))
    y = rng.normal(size=(BATCH * BATCHES, 1)).astype("float32")
    return x.astype("int32"), y


def _model():
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [
            keras.Input((LENGTH,), dtype="int32"),
            keras.layers.Embedding(VOCABULARY, 4),
            keras.layers.GlobalAveragePooling1D(),
            keras.layers.Dense(1),
        ]
    )


def _fit(optimizer, jit_compile):
    x, y = _data()
    model = _model()
    model.compile(optimizer=optimizer, loss="mse", jit_compile=jit_compile)
    model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    return model


@functools.cache
def _densified_loop(name, steps):
    """The same batches through `apply`, with every gradient dense: the
    weights and the statistics (if kept), computed once per configuration
    (both `jit_compile` values compare with it)."""
    import tensorflow as tf

    cls, options = CONFIGURATIONS[name]
    optimizer = cls(accumulation_steps=steps, **options)
    x, y = _data()
    model = _model()
    kinds = set()
    for start in range(0, len(x), BATCH):
        xb, yb = x[start : start + BATCH], y[start : start + BATCH]
        with tf.GradientTape() as tape:
            loss = keras.ops.mean(keras.ops.square(model(xb) - yb))
        grads = tape.gradient(loss, model.trainable_variables)
        kinds |= {type(g).__name__ for g in grads}
        optimizer.apply(
            [tf.convert_to_tensor(g) for g in grads], model.trainable_variables
        )
    assert "IndexedSlices" in kinds  # the gradient fit gets is sparse
    statistics = None
    if optimizer.track_gradient_statistics:
        statistics = {
            key: float(value)
            for key, value in optimizer.gradient_statistics().items()
        }
    return model.get_weights(), statistics


CONFIGURATIONS = {
    "sgd_momentum": (kg.SGD, dict(learning_rate=0.1, momentum=0.9)),
    "adam_statistics_global_clipnorm": (
        kg.Adam,
        dict(
            learning_rate=0.05,
            track_gradient_statistics=True,
            global_clipnorm=0.05,
        ),
    ),
    "adam_clipnorm_noise": (
        kg.Adam,
        dict(learning_rate=0.05, clipnorm=0.02, noise_eta=1e-3, noise_seed=3),
    ),
    "sgd_statistics_apply_nonfinite": (
        kg.SGD,
        dict(
            learning_rate=0.1,
            track_gradient_statistics=True,
            on_nonfinite="apply",
        ),
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("jit_compile", [True, False])
@pytest.mark.parametrize(
    "name,steps",
    [
        ("sgd_momentum", 2),
        ("adam_statistics_global_clipnorm", 4),
        ("adam_clipnorm_noise", 2),
        ("sgd_statistics_apply_nonfinite", 4),
    ],
)
def test_fit_with_an_embedding_equals_densified_gradients(
    name, steps, jit_compile
):
    cls, options = CONFIGURATIONS[name]
    fitted_optimizer = cls(accumulation_steps=steps, **options)
    fitted = _fit(fitted_optimizer, jit_compile)
    weights, statistics = _densified_loop(name, steps)

    assert int(fitted_optimizer.iterations.numpy()) == BATCHES // steps
    assert int(fitted_optimizer.micro_steps.numpy()) == BATCHES
    initial = _model().get_weights()
    table = fitted.get_weights()[0]
    # Trained: the rows the ids touch moved; the others did not, unless
    # noise moved them too.
    assert not np.allclose(table[:USED_IDS], initial[0][:USED_IDS])
    if "noise_eta" not in options:
        np.testing.assert_array_equal(table[USED_IDS:], initial[0][USED_IDS:])
    for got, expected in zip(fitted.get_weights(), weights):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    if statistics is not None:
        measured = fitted_optimizer.gradient_statistics()
        assert float(measured["variance"]) > 0.0
        for key, value in statistics.items():
            np.testing.assert_allclose(
                float(measured[key]), value, rtol=1e-4, err_msg=key
            )


def test_fit_with_an_embedding_equals_keras_accumulation():
    """Against Keras's own `gradient_accumulation_steps` (SGD with momentum
    and a constant learning rate: the two agree in exact arithmetic)."""
    ours = _fit(kg.SGD(0.1, momentum=0.9, accumulation_steps=4), True)
    theirs = _fit(
        keras.optimizers.SGD(0.1, momentum=0.9, gradient_accumulation_steps=4),
        True,
    )
    for got, expected in zip(ours.get_weights(), theirs.get_weights()):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
