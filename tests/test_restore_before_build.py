"""State restored into an optimizer that is not built yet survives the
`fit` that builds it.

Keras builds the optimizer while it traces the first training step; state
loaded before that (`load_weights` right after `compile`, or a pickled or
deep-copied optimizer) must be applied where it persists, not inside the
trace. Each run is compared with the uninterrupted one.
"""

import copy
import pickle

import keras
import numpy as np
import pytest
from keras import ops

import keras_gradtools as kg

CONFIGURATIONS = {
    "sgd_momentum": lambda: kg.SGD(0.1, momentum=0.9, noise_seed=1),
    "adam_k1": lambda: kg.Adam(0.01, noise_seed=1),
    "adam_macro_k2": lambda: kg.Adam(
        0.01, accumulation_steps=2, second_moment="macro", noise_seed=1
    ),
    "adam_micro_k2": lambda: kg.Adam(
        0.01, accumulation_steps=2, second_moment="micro", noise_seed=1
    ),
    "adamw_noise_k3": lambda: kg.AdamW(
        0.01, accumulation_steps=3, noise_eta=1e-3, noise_seed=1
    ),
    "wrap_adam": lambda: kg.wrap(keras.optimizers.Adam(0.01), noise_seed=1),
}

X = np.random.RandomState(0).normal(size=(12, 4)).astype("float32")
Y = X[:, :1] * 2.0 - X[:, 1:2]


def _model(optimizer):
    keras.utils.set_random_seed(1)
    model = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(3), keras.layers.Dense(1)]
    )
    model.compile(optimizer=optimizer, loss="mse")
    return model


def _fit(model):
    # 3 batches per epoch: with K = 2 the cycles straddle the epochs.
    model.fit(X, Y, batch_size=4, epochs=1, verbose=0, shuffle=False)


def _assert_same_training(a, b):
    assert int(ops.convert_to_numpy(a.optimizer.iterations)) == int(
        ops.convert_to_numpy(b.optimizer.iterations)
    )
    for x, y in zip(a.get_weights(), b.get_weights()):
        np.testing.assert_array_equal(x, y)
    for x, y in zip(a.optimizer.get_weights(), b.optimizer.get_weights()):
        np.testing.assert_array_equal(x, y)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CONFIGURATIONS))
def test_load_weights_before_the_first_fit(name, tmp_path):
    path = str(tmp_path / "state.weights.h5")
    uninterrupted = _model(CONFIGURATIONS[name]())
    _fit(uninterrupted)
    uninterrupted.save_weights(path)
    _fit(uninterrupted)

    resumed = _model(CONFIGURATIONS[name]())
    resumed.load_weights(path)
    assert not resumed.optimizer.built
    _fit(resumed)
    _assert_same_training(resumed, uninterrupted)


@pytest.mark.parametrize("clone", [copy.deepcopy, "pickle"])
@pytest.mark.parametrize("name", ["adam_micro_k2", "sgd_momentum"])
def test_copied_built_optimizer_resumes_in_fit(name, clone):
    if clone == "pickle":

        def clone(optimizer):
            return pickle.loads(pickle.dumps(optimizer))

    uninterrupted = _model(CONFIGURATIONS[name]())
    _fit(uninterrupted)
    weights = uninterrupted.get_weights()
    copied = clone(uninterrupted.optimizer)
    _fit(uninterrupted)

    resumed = _model(copied)
    resumed.set_weights(weights)
    _fit(resumed)
    _assert_same_training(resumed, uninterrupted)
