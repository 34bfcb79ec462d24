"""Writes the compatibility fixtures in saved_models/.

One small `.keras` file per optimizer, each saved in the middle of an
accumulation cycle with noise on: a tiny digits classifier after
`MICRO_BATCHES` micro-batches of `accumulation_steps=4` (one update and two
micro-batches into the second cycle). `tests/test_fixtures.py` loads them,
checks the state and continues training; a later version that cannot do
that fails CI. Rewrite them only on purpose:

    python saved_models/make_fixtures.py
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

import keras_gradtools as kg  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
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
        "adamw": kg.AdamW(1e-2, weight_decay=0.01, amsgrad=True, **common),
        "wrap_rmsprop": kg.wrap(keras.optimizers.RMSprop(1e-3), **common),
    }


def fixture_data():
    digits = load_digits()
    x = (digits.data[:128] / 16.0).astype("float32")
    return x, digits.target[:128].astype("int32")


def fixture_model():
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(16, activation="relu"),
            keras.layers.Dense(10),
        ]
    )


def main():
    x, y = fixture_data()
    n = MICRO_BATCHES * BATCH_SIZE
    for name, optimizer in fixture_optimizers().items():
        model = fixture_model()
        model.compile(
            optimizer=optimizer,
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        model.fit(x[:n], y[:n], batch_size=BATCH_SIZE, shuffle=False, verbose=0)
        path = os.path.join(HERE, f"{name}_mid_cycle_noise.keras")
        model.save(path)
        print(f"{path}: {os.path.getsize(path)} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
