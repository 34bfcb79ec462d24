"""Writes the compatibility fixtures in saved_models/<backend>/.

One small `.keras` file per optimizer, each saved in the middle of an
accumulation cycle with noise on: a tiny digits classifier after
`MICRO_BATCHES` micro-batches of `accumulation_steps=4` (one update and two
micro-batches into the second cycle), and beside it `<name>_continued.npz`,
the weights the same training reaches without stopping. The files written
on TensorFlow and on JAX are both kept: `tests/test_fixtures.py` loads every
one of them on each backend, checks the state and continues training to
the saving backend's weights, so a version that cannot read them, or a
backend that trains differently, fails CI. Rewrite them only on purpose,
once per backend:

    KERAS_BACKEND=tensorflow python saved_models/make_fixtures.py
    KERAS_BACKEND=jax python saved_models/make_fixtures.py

`saved_models/v0.1/` holds a file written by keras_gradtools 0.1, whose
state layout this version refuses with a message saying so.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

import keras_gradtools as kg  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
BACKENDS = ("tensorflow", "jax")
BATCH_SIZE = 16
MICRO_BATCHES = 6
ACCUMULATION_STEPS = 4
NOISE_SEED = 2026


def fixture_optimizers():
    common = dict(
        accumulation_steps=ACCUMULATION_STEPS,
        noise_eta=1e-3,
        noise_seed=NOISE_SEED,
        global_clipnorm=1.0,
    )
    return {
        "sgd": kg.SGD(0.05, momentum=0.9, nesterov=True, **common),
        "adam": kg.Adam(1e-2, second_moment="micro", **common),
        # Written when "micro" was the default; it stays in the file's
        # config, which is what loading restores.
        "adamw": kg.AdamW(
            1e-2,
            weight_decay=0.01,
            amsgrad=True,
            second_moment="micro",
            **common,
        ),
        "wrap_rmsprop": kg.wrap(keras.optimizers.RMSprop(1e-3), **common),
    }


def fixture_data():
    digits = load_digits()
    x = (digits.data[:128] / 16.0).astype("float32")
    return x, digits.target[:128].astype("int32")


def fixture_model(optimizer):
    """The model, with the same initial weights on every backend (Keras's
    initializers draw from each backend's own generator)."""
    model = keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(16, activation="relu"),
            keras.layers.Dense(10),
        ]
    )
    rng = np.random.default_rng(0)
    model.set_weights(
        [
            (rng.normal(size=w.shape) / np.sqrt(w.shape[0])).astype("float32")
            for w in model.get_weights()
        ]
    )
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def fit(model, x, y):
    model.fit(x, y, batch_size=BATCH_SIZE, shuffle=False, verbose=0)


def fixture_path(backend, name, suffix="_mid_cycle_noise.keras"):
    return os.path.join(HERE, backend, f"{name}{suffix}")


def main():
    backend = keras.backend.backend()
    os.makedirs(os.path.join(HERE, backend), exist_ok=True)
    x, y = fixture_data()
    n = MICRO_BATCHES * BATCH_SIZE
    for name, optimizer in fixture_optimizers().items():
        model = fixture_model(optimizer)
        fit(model, x[:n], y[:n])
        path = fixture_path(backend, name)
        model.save(path)
        fit(model, x[n:], y[n:])
        np.savez(
            fixture_path(backend, name, "_continued.npz"),
            *model.get_weights(),
        )
        print(f"{path}: {os.path.getsize(path)} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
