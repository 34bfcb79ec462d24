"""The compatibility promise: the `.keras` fixtures in saved_models/ (written
by saved_models/make_fixtures.py, mid-cycle with noise on) load with every
piece of optimizer state, and training continues from them."""

import importlib.util
import pathlib

import keras
import numpy as np
import pytest

import keras_gradtools as kg

SAVED_MODELS = pathlib.Path(__file__).resolve().parent.parent / "saved_models"


def _fixtures_module():
    path = SAVED_MODELS / "make_fixtures.py"
    spec = importlib.util.spec_from_file_location("make_fixtures", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


FIXTURES = _fixtures_module()
NAMES = sorted(FIXTURES.fixture_optimizers())


def test_every_fixture_exists_and_is_small():
    for name in NAMES:
        path = SAVED_MODELS / f"{name}_mid_cycle_noise.keras"
        assert path.exists(), path
        assert path.stat().st_size < 1_000_000


@pytest.mark.parametrize("name", NAMES)
def test_fixture_loads_with_its_state_and_continues(name):
    path = SAVED_MODELS / f"{name}_mid_cycle_noise.keras"
    model = keras.saving.load_model(path)
    optimizer = model.optimizer
    expected = FIXTURES.fixture_optimizers()[name]
    assert type(optimizer) is type(expected)
    assert isinstance(optimizer, kg.GradientPipelineOptimizer)
    assert optimizer.get_config() == expected.get_config()
    assert int(optimizer.micro_steps.numpy()) == FIXTURES.MICRO_BATCHES
    assert int(optimizer.iterations.numpy()) == (
        FIXTURES.MICRO_BATCHES // FIXTURES.ACCUMULATION_STEPS
    )

    # The same training, redone now, reaches the state the file holds.
    x, y = FIXTURES.fixture_data()
    n = FIXTURES.MICRO_BATCHES * FIXTURES.BATCH_SIZE
    fresh = FIXTURES.fixture_model()
    fresh.compile(optimizer=expected, loss=model.loss)
    fresh.fit(
        x[:n], y[:n], batch_size=FIXTURES.BATCH_SIZE, shuffle=False, verbose=0
    )
    assert len(optimizer.variables) == len(expected.variables)
    for saved, redone in zip(optimizer.variables, expected.variables):
        np.testing.assert_allclose(
            np.asarray(saved.numpy(), "float64"),
            np.asarray(redone.numpy(), "float64"),
            rtol=1e-5,
            atol=1e-6,
            equal_nan=True,
            err_msg=saved.name,
        )

    before = [w.copy() for w in model.get_weights()]
    model.fit(
        x[n:], y[n:], batch_size=FIXTURES.BATCH_SIZE, shuffle=False, verbose=0
    )
    assert int(optimizer.iterations.numpy()) == 2
    after = model.get_weights()
    assert all(np.isfinite(w).all() for w in after)
    assert any(not np.array_equal(a, b) for a, b in zip(before, after))
