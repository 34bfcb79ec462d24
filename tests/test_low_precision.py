"""Variables narrower than float32 (bfloat16, float16) train: every slot
is float32 and the rule computes in float32, casting only its step.

Keras gives a slot its variable's dtype; in bfloat16 `beta_2 = 0.999`
rounds to 1, Adam's bias correction `1 - beta_2**t` to 0, and the weights
never move (pinned below: README, "Differences from Keras").
"""

import keras
import numpy as np
import pytest
from keras import ops

import keras_gradtools as kg

OPTIMIZERS = {
    "adam_k1": lambda: kg.Adam(1e-2),
    "adam_macro_k2": lambda: kg.Adam(
        1e-2, accumulation_steps=2, second_moment="macro"
    ),
    "adam_micro_k2": lambda: kg.Adam(
        1e-2, accumulation_steps=2, second_moment="micro"
    ),
    "adamw_k2": lambda: kg.AdamW(1e-2, accumulation_steps=2),
    "sgd_momentum": lambda: kg.SGD(5e-2, momentum=0.9),
}


def _data():
    rng = np.random.RandomState(0)
    x = rng.normal(size=(64, 8)).astype("float32")
    y = (x @ rng.normal(size=(8, 1))).astype("float32")
    return x, y


def _bfloat16_model(optimizer):
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(16, activation="tanh", dtype="bfloat16"),
            keras.layers.Dense(1, dtype="bfloat16"),
        ]
    )
    model.compile(optimizer=optimizer, loss="mse")
    return model


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_bfloat16_model_trains_with_float32_slots(name):
    x, y = _data()
    model = _bfloat16_model(OPTIMIZERS[name]())
    assert model.weights[0].dtype == "bfloat16"
    before = model.evaluate(x, y, verbose=0)
    model.fit(x, y, batch_size=8, epochs=8, verbose=0)
    after = model.evaluate(x, y, verbose=0)
    assert after < 0.7 * before, (before, after)
    slots = [
        v
        for v in model.optimizer.variables
        if tuple(v.shape) == tuple(model.weights[0].shape)
    ]
    assert slots and all(v.dtype == "float32" for v in slots)
    for weight in model.weights:
        assert weight.dtype == "bfloat16"


def test_kerass_adam_does_not_move_bfloat16_weights():
    """What ours goes beyond: Keras's Adam computes in the variable's
    dtype, where its bias correction is 0 (pinned so that a change in
    Keras shows up here and in the README's differences table)."""
    variable = keras.Variable(np.ones((4,)), dtype="bfloat16")
    optimizer = keras.optimizers.Adam(1e-2)
    for _ in range(3):
        optimizer.apply([ops.ones((4,), dtype="bfloat16")], [variable])
    np.testing.assert_array_equal(ops.convert_to_numpy(variable), 1.0)

    ours = keras.Variable(np.ones((4,)), dtype="bfloat16")
    optimizer = kg.Adam(1e-2)
    for _ in range(3):
        optimizer.apply([ops.ones((4,), dtype="bfloat16")], [ours])
    moved = ops.convert_to_numpy(ops.cast(ours, "float32"))
    # Three Adam steps of about lr each on a constant gradient, each
    # rounded to bfloat16 (spacing 2**-7 just below 1).
    np.testing.assert_allclose(moved, 1.0 - 3e-2, atol=2**-7)
