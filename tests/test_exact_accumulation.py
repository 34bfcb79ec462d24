"""Accumulation that equals one big batch when micro-batches differ
(docs/design.md §7): padded sequences, ragged batches, sample weights."""

import os
import subprocess
import sys

import keras
import numpy as np
import numpy_reference as ref
import pytest
from helpers import PADDED_LENGTHS
from helpers import padded_tagger as _tagger
from helpers import padded_tagging_data as _padded_data
from keras import ops
from processes import parse_results

import keras_gradtools as kg


def _regressor(optimizer, loss="mse"):
    keras.utils.set_random_seed(2)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(optimizer=optimizer, loss=loss)
    return model


def _difference(a, b):
    return max(
        float(np.max(np.abs(u - v)))
        for u, v in zip(a.get_weights(), b.get_weights())
    )


@pytest.mark.parametrize(
    "ours, keras_optimizer",
    [
        (
            lambda: kg.SGD(0.5, accumulation_steps=4),
            lambda: keras.optimizers.SGD(0.5),
        ),
        # Ours at K=1 (equal to Keras's Adam on dense gradients, see
        # test_keras_equivalence): Keras's own Adam updates an Embedding's
        # moments lazily (row by row) on TensorFlow.
        (
            lambda: kg.Adam(0.05, accumulation_steps=4),
            lambda: kg.Adam(0.05),
        ),
    ],
    ids=["sgd", "adam"],
)
def test_padded_micro_batches_equal_one_big_batch(ours, keras_optimizer):
    x, y = _padded_data(PADDED_LENGTHS)
    big = _tagger(keras_optimizer())
    big.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    exact = _tagger(ours())
    assert kg.exact_accumulation(exact) is exact
    exact.fit(x, y, batch_size=4, epochs=2, shuffle=False, verbose=0)
    plain = _tagger(ours())
    plain.fit(x, y, batch_size=4, epochs=2, shuffle=False, verbose=0)
    assert int(exact.optimizer.iterations) == 2
    assert _difference(exact, big) < 2e-6
    # Without it, a mean of means (Keras's accumulation does the same).
    assert _difference(plain, big) > 1e-3


def test_ragged_last_batch_equals_one_batch_of_all_samples():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(10, 3)).astype("float32")
    y = rng.normal(size=(10, 2)).astype("float32")
    big = _regressor(keras.optimizers.SGD(0.1))
    big.fit(x, y, batch_size=10, epochs=3, shuffle=False, verbose=0)
    exact = kg.exact_accumulation(_regressor(kg.SGD(0.1, accumulation_steps=3)))
    # Micro-batches of 4, 4 and 2 samples.
    exact.fit(x, y, batch_size=4, epochs=3, shuffle=False, verbose=0)
    plain = _regressor(kg.SGD(0.1, accumulation_steps=3))
    plain.fit(x, y, batch_size=4, epochs=3, shuffle=False, verbose=0)
    assert _difference(exact, big) < 1e-6
    assert _difference(plain, big) > 1e-3


def test_sample_weights_under_mean_with_sample_weight():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(8, 3)).astype("float32")
    y = rng.normal(size=(8, 2)).astype("float32")
    weights = np.array([1, 1, 1, 1, 5, 0, 3, 2], "float32")
    loss = keras.losses.MeanSquaredError(reduction="mean_with_sample_weight")
    big = _regressor(keras.optimizers.SGD(0.1), loss)
    big.fit(x, y, sample_weight=weights, batch_size=8, shuffle=False, verbose=0)
    exact = kg.exact_accumulation(
        _regressor(kg.SGD(0.1, accumulation_steps=2), loss)
    )
    exact.fit(
        x, y, sample_weight=weights, batch_size=4, shuffle=False, verbose=0
    )
    assert _difference(exact, big) < 1e-6


def test_loss_count_follows_keras_reductions():
    y_pred = keras.layers.Embedding(5, 3, mask_zero=True)(
        np.array([[1, 2, 0], [3, 0, 0]])
    )
    y_true = np.zeros((2, 3, 3), "float32")
    assert float(kg.loss_count("mse", y_true, y_pred)) == 3.0
    plain = np.ones((4, 5, 2), "float32")
    assert float(kg.loss_count("mse", np.ones((4, 5, 2)), plain)) == 20.0
    summed = keras.losses.MeanSquaredError(reduction="sum")
    assert float(kg.loss_count(summed, plain, plain)) == 1.0
    weighted = keras.losses.MeanSquaredError(
        reduction="mean_with_sample_weight"
    )
    count = kg.loss_count(weighted, plain, plain, np.array([1.0, 2, 0, 4]))
    assert float(count) == 7.0


def _linear_problem(seed=5):
    rng = np.random.default_rng(seed)
    variables = [
        keras.Variable(rng.normal(size=(3, 2)).astype("float32")),
        keras.Variable(rng.normal(size=(2,)).astype("float32")),
    ]
    micro = [[rng.normal(size=(3, 2)), rng.normal(size=(2,))] for _ in range(8)]
    return variables, micro


@pytest.mark.parametrize("second_moment", ["micro", "macro"])
def test_custom_loop_counts_match_the_float64_reference(second_moment):
    """`apply(grads, count=n)`: the weighted mean, Adam's weighted mean
    squares and the weighted statistics, against float64 NumPy."""
    variables, micro = _linear_problem()
    counts = [3.0, 11.0, 1.0, 7.0, 2.0, 2.0, 9.0, 4.0]
    optimizer = kg.Adam(
        0.01,
        accumulation_steps=4,
        second_moment=second_moment,
        track_gradient_statistics=True,
    )
    reference = ref.ReferenceOptimizer(
        ref.AdamRule(0.01, second_moment=second_moment, accumulation_steps=4),
        [ops.convert_to_numpy(v) for v in variables],
        accumulation_steps=4,
    )
    for grads, count in zip(micro, counts):
        optimizer.apply(
            [np.asarray(g, "float32") for g in grads], variables, count=count
        )
        reference.apply(grads, count=count)
    for variable, expected in zip(variables, reference.weights):
        np.testing.assert_allclose(
            ops.convert_to_numpy(variable), expected, rtol=2e-5, atol=2e-6
        )
    stats = optimizer.gradient_statistics()
    for name in ("variance", "mean_norm_sq", "noise_scale", "grad_norm"):
        np.testing.assert_allclose(
            float(stats[name]), reference.statistics[name], rtol=2e-4
        )


@pytest.mark.slow
def test_equal_counts_change_nothing():
    """Equal counts weigh equally: the unweighted update and statistics."""
    variables, micro = _linear_problem()
    copies = [keras.Variable(ops.convert_to_numpy(v)) for v in variables]
    weighted = kg.Adam(
        0.01, accumulation_steps=4, track_gradient_statistics=True
    )
    plain = kg.Adam(0.01, accumulation_steps=4, track_gradient_statistics=True)
    for grads in micro:
        grads = [np.asarray(g, "float32") for g in grads]
        weighted.apply(grads, variables, count=6.0)
        plain.apply(grads, copies)
    for a, b in zip(variables, copies):
        np.testing.assert_allclose(
            ops.convert_to_numpy(a), ops.convert_to_numpy(b), rtol=1e-6
        )
    np.testing.assert_allclose(
        float(weighted.gradient_statistics()["noise_scale"]),
        float(plain.gradient_statistics()["noise_scale"]),
        rtol=1e-4,
    )


def test_zero_and_nonfinite_counts_contribute_nothing():
    variables, micro = _linear_problem()
    copies = [keras.Variable(ops.convert_to_numpy(v)) for v in variables]
    optimizer = kg.SGD(0.1, accumulation_steps=4)
    expected = kg.SGD(0.1, accumulation_steps=2)
    counts = [2.0, 0.0, float("nan"), 5.0]
    for grads, count in zip(micro[:4], counts):
        optimizer.apply(
            [np.asarray(g, "float32") for g in grads], variables, count=count
        )
    for grads, count in [(micro[0], 2.0), (micro[3], 5.0)]:
        expected.apply(
            [np.asarray(g, "float32") for g in grads], copies, count=count
        )
    assert int(optimizer.iterations) == 1
    assert int(optimizer.skipped_micro_batches) == 1
    for a, b in zip(variables, copies):
        np.testing.assert_allclose(
            ops.convert_to_numpy(a), ops.convert_to_numpy(b), rtol=1e-6
        )


def test_a_cycle_of_zero_counts_and_a_zero_count_at_k1_move_nothing():
    variables, micro = _linear_problem()
    before = [ops.convert_to_numpy(v) for v in variables]
    for steps in (1, 2):
        optimizer = kg.Adam(0.1, accumulation_steps=steps)
        for grads in micro[:2]:
            optimizer.apply(
                [np.asarray(g, "float32") for g in grads], variables, count=0
            )
        assert int(optimizer.iterations) == 0
        for variable, value in zip(variables, before):
            np.testing.assert_array_equal(ops.convert_to_numpy(variable), value)


def test_count_needs_weighted_state():
    variables, micro = _linear_problem()
    grads = [np.asarray(g, "float32") for g in micro[0]]
    optimizer = kg.SGD(0.1, accumulation_steps=2)
    optimizer.apply(grads, variables)
    with pytest.raises(ValueError, match="weighted_accumulation"):
        optimizer.apply(grads, variables, count=3.0)
    fresh = kg.SGD(0.1, accumulation_steps=2)
    fresh.apply(grads, variables, count=3.0)
    assert fresh.weighted_accumulation
    assert fresh.get_config()["weighted_accumulation"] is True


def test_exact_accumulation_refuses_what_it_cannot_weigh():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    with pytest.raises(ValueError, match="compile"):
        kg.exact_accumulation(model)
    model.compile(optimizer=keras.optimizers.SGD(), loss="mse")
    with pytest.raises(ValueError, match="keras_gradtools optimizer"):
        kg.exact_accumulation(model)
    built = _regressor(kg.SGD(0.1, accumulation_steps=2))
    built.fit(np.ones((4, 3)), np.ones((4, 2)), verbose=0)
    with pytest.raises(ValueError, match="built already"):
        kg.exact_accumulation(built)
    inputs = keras.Input((3,))
    two = keras.Model(
        inputs, [keras.layers.Dense(1)(inputs), keras.layers.Dense(1)(inputs)]
    )
    two.compile(optimizer=kg.SGD(0.1), loss=["mse", "mae"])
    with pytest.raises(ValueError, match="count_fn"):
        kg.exact_accumulation(two)


@pytest.mark.slow
def test_count_fn_and_mid_cycle_save_restore(tmp_path):
    """A custom count, and the cycle's summed count saved mid-cycle: the
    restored run equals the uninterrupted one bitwise."""
    x, y = _padded_data(PADDED_LENGTHS, seed=6)

    def valid_tokens(x, y, y_pred, sample_weight):
        return ops.sum(ops.cast(ops.not_equal(x, 0), "float32"))

    def model():
        m = _tagger(kg.Adam(0.05, accumulation_steps=4))
        return kg.exact_accumulation(m, count_fn=valid_tokens)

    whole = model()
    whole.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0)
    first = model()
    first.fit(x[:8], y[:8], batch_size=4, shuffle=False, verbose=0)
    assert int(first.optimizer.iterations) == 0
    path = str(tmp_path / "mid_cycle.keras")
    first.save(path)
    resumed = keras.saving.load_model(path)
    assert resumed.optimizer.weighted_accumulation
    kg.exact_accumulation(resumed, count_fn=valid_tokens)
    resumed.fit(x[8:], y[8:], batch_size=4, shuffle=False, verbose=0)
    assert int(resumed.optimizer.iterations) == 1
    for a, b in zip(whole.get_weights(), resumed.get_weights()):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_mixed_float16_through_keras_loss_scale_optimizer():
    """Keras wraps ours in a LossScaleOptimizer: the count still reaches
    ours, and the update equals the big batch's to float16 rounding."""
    x, y = _padded_data()
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        models = {}
        for name, optimizer, batch in [
            ("big", kg.SGD(0.5), 16),
            ("exact", kg.SGD(0.5, accumulation_steps=4), 4),
            ("plain", kg.SGD(0.5, accumulation_steps=4), 4),
        ]:
            model = _tagger(optimizer)
            if name == "exact":
                kg.exact_accumulation(model)
            model.fit(
                x, y, batch_size=batch, epochs=2, shuffle=False, verbose=0
            )
            models[name] = model
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert isinstance(
        models["exact"].optimizer, keras.optimizers.LossScaleOptimizer
    )
    assert _difference(models["exact"], models["big"]) < 5e-4
    assert _difference(models["plain"], models["big"]) > 1e-2


@pytest.mark.slow
def test_adaptive_accumulation_reads_weighted_statistics():
    """AdaptiveAccumulation over counted micro-batches: K moves, every
    update is finite, and the noise scale is measured (in micro-batches)."""
    x, y = _padded_data(np.tile(PADDED_LENGTHS, 4), seed=8)
    optimizer = kg.SGD(0.2, accumulation_steps=2, max_accumulation_steps=8)
    model = kg.exact_accumulation(_tagger(optimizer))
    adaptive = kg.AdaptiveAccumulation(8, update_freq=2)
    model.fit(
        x,
        y,
        batch_size=4,
        epochs=2,
        shuffle=False,
        verbose=0,
        callbacks=[adaptive],
    )
    stats = optimizer.gradient_statistics()
    assert np.isfinite(float(stats["variance"]))
    assert float(stats["variance"]) > 0
    assert all(np.isfinite(w).all() for w in model.get_weights())
    assert int(optimizer.iterations) > 0
    assert optimizer.accumulation_steps > 2


@pytest.mark.jax_only
@pytest.mark.slow
def test_jax_data_parallel_counts_are_global():
    """keras.distribution.DataParallel over 2 forced CPU devices (a process
    of its own): equal to one device on the big batch at K = 1 and 2."""
    script = os.path.join(
        os.path.dirname(__file__), "scripts", "jax_exact_runs.py"
    )
    completed = subprocess.run(
        [sys.executable, script], capture_output=True, text=True, timeout=300
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    results = {r["k"]: r for r in parse_results(completed.stdout)}
    assert sorted(results) == [1, 2]
    for result in results.values():
        assert result["max_abs_difference"] <= 1e-6, result
    assert results[2]["without_exact"] > 1e-3
