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


def digits(n=None):
    from sklearn.datasets import load_digits

    data = load_digits()
    x = (data.data / 16.0).astype("float32")
    y = data.target.astype("int32")
    if n is not None:
        x, y = x[:n], y[:n]
    return x, y
