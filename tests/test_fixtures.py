"""The compatibility promise: the `.keras` fixtures in saved_models/ (written
by saved_models/make_fixtures.py on TensorFlow and on JAX, mid-cycle with
noise on) load on either backend with every piece of optimizer state, and
training continues from them to the weights the saving backend reached
without stopping."""

import importlib.util
import pathlib

import keras
import numpy as np
import pytest
from keras import ops

import keras_gradtools as kg

SAVED_MODELS = pathlib.Path(__file__).resolve().parent.parent / "saved_models"
# Different backends round differently (XLA's fusions, oneDNN's matmul):
# the weights agree to float32 rounding of ~10 updates of order-1 weights.
CROSS_BACKEND_ATOL = 1e-5


def _fixtures_module():
    path = SAVED_MODELS / "make_fixtures.py"
    spec = importlib.util.spec_from_file_location("make_fixtures", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


FIXTURES = _fixtures_module()
NAMES = sorted(FIXTURES.fixture_optimizers())


def test_every_fixture_exists_and_is_small():
    for backend in FIXTURES.BACKENDS:
        for name in NAMES:
            for suffix in ("_mid_cycle_noise.keras", "_continued.npz"):
                path = pathlib.Path(
                    FIXTURES.fixture_path(backend, name, suffix)
                )
                assert path.exists(), path
                assert path.stat().st_size < 1_000_000


@pytest.mark.slow
@pytest.mark.parametrize("source", FIXTURES.BACKENDS)
@pytest.mark.parametrize("name", NAMES)
def test_fixture_loads_with_its_state_and_continues(name, source):
    model = keras.saving.load_model(FIXTURES.fixture_path(source, name))
    optimizer = model.optimizer
    expected = FIXTURES.fixture_optimizers()[name]
    assert type(optimizer) is type(expected)
    assert isinstance(optimizer, kg.GradientPipelineOptimizer)
    assert optimizer.get_config() == expected.get_config()
    if isinstance(optimizer, kg.Adam):
        # Written when "micro" was the default: the file keeps its mode.
        assert optimizer.second_moment == "micro"
    assert int(ops.convert_to_numpy(optimizer.micro_steps)) == (
        FIXTURES.MICRO_BATCHES
    )
    assert int(ops.convert_to_numpy(optimizer.iterations)) == (
        FIXTURES.MICRO_BATCHES // FIXTURES.ACCUMULATION_STEPS
    )

    # The same training, redone here, reaches the state the file holds.
    x, y = FIXTURES.fixture_data()
    n = FIXTURES.MICRO_BATCHES * FIXTURES.BATCH_SIZE
    redone = FIXTURES.fixture_model(expected)
    FIXTURES.fit(redone, x[:n], y[:n])
    assert len(optimizer.variables) == len(expected.variables)
    for saved, again in zip(optimizer.variables, expected.variables):
        np.testing.assert_allclose(
            np.asarray(ops.convert_to_numpy(saved), "float64"),
            np.asarray(ops.convert_to_numpy(again), "float64"),
            rtol=1e-5,
            atol=CROSS_BACKEND_ATOL,
            equal_nan=True,
            err_msg=saved.path,
        )

    # Continued here, it ends where the saving backend ended without
    # stopping.
    FIXTURES.fit(model, x[n:], y[n:])
    assert int(ops.convert_to_numpy(optimizer.iterations)) == 2
    reference = np.load(FIXTURES.fixture_path(source, name, "_continued.npz"))
    weights = model.get_weights()
    assert len(weights) == len(reference.files)
    for i, weight in enumerate(weights):
        np.testing.assert_allclose(
            weight, reference[f"arr_{i}"], rtol=1e-5, atol=CROSS_BACKEND_ATOL
        )


def test_a_file_of_version_0_1_is_refused_with_a_clear_message():
    path = SAVED_MODELS / "v0.1" / "adam_mid_cycle_noise.keras"
    with pytest.raises(ValueError, match="keras_gradtools 0.1"):
        keras.saving.load_model(path)
    model = keras.saving.load_model(path, compile=False)
    assert len(model.get_weights()) == 4
