"""Shared fixtures: quiet TensorFlow, a fresh Keras session per test, and
the backend split.

The suite runs once per Keras backend (`KERAS_BACKEND=tensorflow`, the
default here, and `KERAS_BACKEND=jax`). Tests of what exists on one backend
only (`tf.distribute`, `IndexedSlices`, graph assertions; `jax.jit` loops,
`keras.distribution`) carry the marker `tensorflow_only` or `jax_only` and
are deselected on the other backend, not skipped: nothing is missing there.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

BACKEND_MARKERS = {"tensorflow_only": "tensorflow", "jax_only": "jax"}
# Whole modules of one backend, not even imported on the other (importing
# TensorFlow into a JAX test run would be wasteful and hide a missing
# `import tensorflow` guard).
BACKEND_MODULES = {
    "tensorflow": ["test_xla_and_fit.py", "test_distributed.py"],
    "jax": ["test_jax.py", "test_jax_distribution.py"],
}
collect_ignore = [
    module
    for backend, modules in BACKEND_MODULES.items()
    if backend != keras.backend.backend()
    for module in modules
]


def pytest_collection_modifyitems(config, items):
    backend = keras.backend.backend()
    selected, deselected = [], []
    for item in items:
        wanted = {
            BACKEND_MARKERS[m.name]
            for m in item.iter_markers()
            if m.name in BACKEND_MARKERS
        }
        (deselected if wanted and backend not in wanted else selected).append(
            item
        )
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = selected


@pytest.fixture(autouse=True)
def _fresh_session():
    keras.utils.clear_session()
    keras.utils.set_random_seed(1234)
    yield


@pytest.fixture
def rng():
    return np.random.default_rng(20261121)
