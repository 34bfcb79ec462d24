"""Shared fixtures: quiet TensorFlow, a fresh Keras session per test, and
the backend split.

The suite runs once per Keras backend (`KERAS_BACKEND=tensorflow`, the
default here, and `KERAS_BACKEND=jax`). Tests of what exists on one backend
only (`tf.distribute`, `IndexedSlices`, graph assertions; `jax.jit` loops,
`keras.distribution`) carry the marker `tensorflow_only` or `jax_only` and
are deselected on the other backend, not skipped: nothing is missing there.

Tiers: `python -m pytest tests/stages` runs one fast unit-test module per
pipeline stage (seconds); `python -m pytest -m "not slow" -n 2` the fast
tier (a few minutes on 2 cores), which leaves out the tests marked `slow`
(those that train models, start subprocesses or run benchmarks, each with a
fast test of the same feature kept in the tier); no `-m` runs everything.
"""

import gc
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
    "tensorflow": [
        "test_xla_and_fit.py",
        "test_distributed.py",
        "test_distributed_equality.py",
        "test_multi_worker.py",
    ],
    "jax": ["test_jax.py", "test_jax_distribution.py"],
}
collect_ignore = [
    module
    for backend, modules in BACKEND_MODULES.items()
    if backend != keras.backend.backend()
    for module in modules
]


# The modules with the longest setup (subprocesses training under real
# strategies and device meshes, benchmark and example scripts), run first:
# pytest-xdist hands whole files to its workers in collection order
# (`--dist loadfile --no-loadscope-reorder`, run_both_backends.py), so the
# longest ones must not start last.
LONGEST_FIRST = (
    "test_distributed.py",
    "test_distributed_equality.py",
    "test_jax_distribution.py",
    "test_multi_worker.py",
    "test_benchmarks.py",
    "test_examples.py",
)


# The JAX suite runs in one process: its device-mesh file, whose processes
# keep both cores busy, goes last, where it fills the time the TensorFlow
# suite may have left free, rather than first, beside the TensorFlow
# strategy processes.
LAST_ON_JAX = ("test_jax_distribution.py",)


def _longest_first(item):
    name = item.path.name
    if keras.backend.backend() == "jax" and name in LAST_ON_JAX:
        return len(LONGEST_FIRST) + 1
    return (
        LONGEST_FIRST.index(name)
        if name in LONGEST_FIRST
        else len(LONGEST_FIRST)
    )


def pytest_collection_finish(session):
    # What is alive now (TensorFlow or JAX, Keras, the test modules) stays
    # alive to the end: out of the garbage collector's sight, the full
    # collection in every test's `clear_session()` scans only what tests
    # make (0.4 s -> 0.1 ms per test with TensorFlow loaded, measured).
    gc.collect()
    gc.freeze()


def pytest_collection_modifyitems(config, items):
    items.sort(key=_longest_first)  # stable: file order kept otherwise
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
