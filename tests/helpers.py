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


# Sequences of 6 tokens from a vocabulary of 7 (0 is padding), in groups of
# 4 whose valid lengths differ: 1, 6, 2 and 5 tokens each.
PADDED_VOCAB, PADDED_STEPS = 7, 6
PADDED_LENGTHS = np.repeat([1, 6, 2, 5], 4)


def padded_tagging_data(lengths=PADDED_LENGTHS, seed=0):
    """`(x, y)`: padded token ids and a tag per position."""
    rng = np.random.default_rng(seed)
    x = np.zeros((len(lengths), PADDED_STEPS), "int32")
    for i, length in enumerate(lengths):
        x[i, :length] = rng.integers(1, PADDED_VOCAB, length)
    y = rng.integers(0, PADDED_VOCAB, (len(lengths), PADDED_STEPS))
    return x, y


def padded_tagger(optimizer, **compile_options):
    """Embedding(mask_zero=True) -> Dense tagger, compiled with a masked
    SparseCategoricalCrossentropy (the same weights for every seed)."""
    keras.utils.set_random_seed(1)
    inputs = keras.Input((PADDED_STEPS,), dtype="int32")
    hidden = keras.layers.Embedding(PADDED_VOCAB, 4, mask_zero=True)(inputs)
    outputs = keras.layers.Dense(PADDED_VOCAB)(hidden)
    model = keras.Model(inputs, outputs)
    compile_options.setdefault(
        "loss", keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    model.compile(optimizer=optimizer, **compile_options)
    return model
