"""Optimizer state survives a `.keras` round trip in the middle of an
accumulation cycle, noise stream included."""

import keras
import numpy as np
import pytest
from helpers import digits
from helpers import tiny_classifier

import keras_gradtools as kg

FACTORIES = {
    "sgd": lambda: kg.SGD(
        0.05, momentum=0.9, accumulation_steps=4, noise_eta=1e-3, noise_seed=1
    ),
    "adam": lambda: kg.Adam(
        1e-2,
        accumulation_steps=4,
        noise_eta=1e-3,
        noise_seed=2,
        global_clipnorm=1.0,
    ),
    "adamw": lambda: kg.AdamW(1e-2, accumulation_steps=4, noise_eta=1e-3),
    "wrap": lambda: kg.wrap(
        keras.optimizers.RMSprop(1e-3), accumulation_steps=4, noise_eta=1e-3
    ),
}


def _compiled_model(optimizer):
    model = tiny_classifier()
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_resume_mid_cycle_is_bitwise_identical(name, tmp_path):
    x, y = digits(320)
    first, rest = slice(0, 6 * 32), slice(6 * 32, 320)
    model = _compiled_model(FACTORIES[name]())
    model.fit(x[first], y[first], batch_size=32, shuffle=False, verbose=0)
    optimizer = model.optimizer
    assert int(optimizer.micro_steps.numpy()) % optimizer.accumulation_steps
    path = tmp_path / "mid_cycle.keras"
    model.save(path)

    restored = keras.saving.load_model(path)
    assert type(restored.optimizer) is type(optimizer)
    assert restored.optimizer.get_config() == optimizer.get_config()
    for a, b in zip(optimizer.variables, restored.optimizer.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())

    for m in (model, restored):
        m.fit(x[rest], y[rest], batch_size=32, shuffle=False, verbose=0)
    for a, b in zip(model.get_weights(), restored.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert int(restored.optimizer.iterations.numpy()) > 1
