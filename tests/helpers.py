"""Small helpers shared by the tests (public Keras APIs only)."""

import keras
import numpy as np

SHAPES = [(3, 4), (5,), (2, 3, 2)]


def make_variables(rng, shapes=SHAPES):
    return [
        keras.Variable(rng.normal(size=s).astype("float32")) for s in shapes
    ]


def copy_variables(variables):
    return [keras.Variable(v.numpy()) for v in variables]


def random_gradients(rng, variables, scale=1.0):
    return [
        (scale * rng.normal(size=v.shape)).astype("float32") for v in variables
    ]


def values(variables):
    return [np.asarray(v.numpy()) for v in variables]


def max_abs_difference(a, b):
    return max(float(np.max(np.abs(x - y))) for x, y in zip(a, b))


def tiny_classifier(input_dim=64, classes=10, seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((input_dim,)),
            keras.layers.Dense(32, activation="relu"),
            keras.layers.Dense(classes),
        ]
    )


def compiled_classifier(optimizer, **compile_options):
    """`tiny_classifier()` compiled with `optimizer` and a from-logits
    sparse cross-entropy loss (plus any other `compile` options)."""
    model = tiny_classifier()
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        **compile_options,
    )
    return model


def digits(n=None):
    from sklearn.datasets import load_digits

    data = load_digits()
    x = (data.data / 16.0).astype("float32")
    y = data.target.astype("int32")
    if n is not None:
        x, y = x[:n], y[:n]
    return x, y


# Known answer for the gradient noise scale (monitor tests).
D, NOISE = 8, 1.0


def linear_regression(n, seed=0):
    """y = x.w* + noise, x ~ N(0, I_d). At w = 0 the per-sample noise scale
    is B_simple = (d + 1) + s**2 d / |w*|**2 (Gaussian fourth moments)."""
    rng = np.random.default_rng(seed)
    w_star = rng.normal(size=(D, 1))
    w_star *= 2.0 / np.linalg.norm(w_star)  # |w*|^2 = 4
    x = rng.normal(size=(n, D)).astype("float32")
    y = (x @ w_star + NOISE * rng.normal(size=(n, 1))).astype("float32")
    expected = (D + 1) + NOISE**2 * D / float(np.sum(w_star**2))
    return x, y, expected


def frozen_linear_model(optimizer):
    model = keras.Sequential(
        [
            keras.Input((D,)),
            keras.layers.Dense(1, use_bias=False, kernel_initializer="zeros"),
        ]
    )
    model.compile(optimizer=optimizer, loss="mse")
    return model


ON_TENSORFLOW = keras.backend.backend() == "tensorflow"
ON_JAX = keras.backend.backend() == "jax"
