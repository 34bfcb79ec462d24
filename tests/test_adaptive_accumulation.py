"""AdaptiveAccumulation and K as optimizer state: the controller's rule,
the known noise scale, no retracing, the learning-rate factor, logs.
(Resuming after a SIGKILL is in test_saving.py; every replica and device
taking the same K in the distributed tests.)"""

import math

import keras
import numpy as np
import pytest
from helpers import frozen_linear_model
from helpers import linear_regression
from keras import ops

import keras_gradtools as kg
from keras_gradtools.callbacks.adaptive_accumulation import learning_rate_factor
from keras_gradtools.callbacks.adaptive_accumulation import target_steps


@pytest.mark.parametrize(
    "noise_scale, current, expected",
    [
        (64.0, 2, 16),  # B / M = 16: far off, jump to the grid point
        (40.0, 8, 8),  # 10 vs 8: within the factor 2, stay
        (100.0, 8, 32),  # 25: off by 3.1, nearest power of two is 32
        (6.0, 8, 2),  # 1.5: clamped at min_steps... nearest is 2
        (1e6, 8, 64),  # clamped at max_steps
        (float("nan"), 8, 8),  # nothing measured: stay
    ],
)
def test_target_steps_grid_hysteresis_and_clamps(
    noise_scale, current, expected
):
    assert (
        target_steps(noise_scale, 4, current, 2, 64, hysteresis=2.0) == expected
    )


def test_a_wobbling_estimate_does_not_make_k_flap():
    """Estimates from -28% to +40% around B / M = 5.65 (the geometric
    middle of the grid points 4 and 8) never move K once it is at either."""
    for start in (4, 8):
        for wobble in np.linspace(0.72, 1.40, 18):
            assert target_steps(11.3 * wobble, 2, start, 2, 64, 2.0) == start


def test_learning_rate_rules():
    assert learning_rate_factor(None, 8, 2, 1.0, 1.0) == 1.0
    assert learning_rate_factor("linear", 8, 2, 1.0, 1.0) == 4.0
    assert learning_rate_factor("sqrt", 8, 2, 1.0, 1.0) == 2.0
    # AdaScale: r = (S/K0 + G) / (S/K + G); all noise: K / K0; no noise: 1.
    assert learning_rate_factor("adascale", 8, 2, 3.0, 0.5) == pytest.approx(
        (3 / 2 + 0.5) / (3 / 8 + 0.5)
    )
    assert learning_rate_factor("adascale", 8, 2, 1.0, 0.0) == 4.0
    assert learning_rate_factor("adascale", 8, 2, 0.0, 1.0) == 1.0


@pytest.mark.slow
def test_effective_batch_settles_near_the_known_noise_scale():
    """Frozen linear regression (learning rate 0): B_simple = 11 samples.
    With micro-batches of 2, the effective batch settles within a factor
    1.6 of it, after few changes, and the weights never move."""
    x, y, expected = linear_regression(8192, seed=2)
    optimizer = kg.SGD(0.0, max_accumulation_steps=32)
    model = frozen_linear_model(optimizer)
    adaptive = kg.AdaptiveAccumulation(32, update_freq=64)
    history = model.fit(
        x, y, batch_size=2, epochs=1, verbose=0, callbacks=[adaptive]
    )
    effective = optimizer.accumulation_steps * 2
    assert expected / 1.6 <= effective <= expected * 1.6
    steps = [r["accumulation_steps"] for r in adaptive.history]
    changes = sum(a != b for a, b in zip(steps, steps[1:]))
    assert changes <= 2, steps
    assert steps[-8:] == [steps[-1]] * 8  # settled
    np.testing.assert_array_equal(model.get_weights()[0], 0.0)
    assert history.history["accumulation_steps"][-1] == steps[-1]
    assert "learning_rate_factor" in history.history


def _counting_train_step(model):
    """Counts how often `fit`'s step is traced (the Python body runs only
    when tracing)."""
    traces = []
    original = model.train_step

    def train_step(*args):
        traces.append(1)
        return original(*args)

    model.train_step = train_step
    model.make_train_function(force=True)
    return traces


def test_k_changes_between_cycles_without_retracing():
    x, y, _ = linear_regression(256, seed=3)
    optimizer = kg.Adam(1e-2, accumulation_steps=2, max_accumulation_steps=8)
    model = frozen_linear_model(optimizer)
    traces = _counting_train_step(model)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, shuffle=False)
    traced = len(traces)
    assert traced >= 1
    assert int(ops.convert_to_numpy(optimizer.iterations)) == 8
    for steps, updates in ((8, 10), (4, 14), (1, 30)):
        optimizer.accumulation_steps = steps
        model.fit(x, y, batch_size=16, epochs=1, verbose=0, shuffle=False)
        assert int(ops.convert_to_numpy(optimizer.iterations)) == updates
    assert len(traces) == traced  # no retracing
    assert optimizer.accumulation_steps == 1


def test_a_change_of_k_takes_effect_at_the_next_cycle():
    variables = [keras.Variable(np.zeros(3, "float32"))]
    optimizer = kg.SGD(1.0, accumulation_steps=4, max_accumulation_steps=4)
    ones = [np.ones(3, "float32")]
    for _ in range(2):
        optimizer.apply(ones, variables)
    optimizer.accumulation_steps = 2  # mid-cycle: this cycle stays at 4
    for _ in range(2):
        optimizer.apply(ones, variables)
    assert int(ops.convert_to_numpy(optimizer.iterations)) == 1
    for _ in range(2):
        optimizer.apply(ones, variables)
    assert int(ops.convert_to_numpy(optimizer.iterations)) == 2
    np.testing.assert_allclose(ops.convert_to_numpy(variables[0]), -2.0)


def test_learning_rate_factor_multiplies_rates_and_schedules():
    schedule = keras.optimizers.schedules.ExponentialDecay(0.1, 1, 0.5)
    variables = [keras.Variable(np.zeros(2, "float32"))]
    optimizer = kg.SGD(schedule, accumulation_steps=1, max_accumulation_steps=2)
    optimizer.build(variables)
    optimizer.learning_rate_factor = 3.0
    ones = [np.ones(2, "float32")]
    optimizer.apply(ones, variables)  # lr = 0.1 * 3
    optimizer.apply(ones, variables)  # lr = schedule(1) * 3 = 0.05 * 3
    np.testing.assert_allclose(
        ops.convert_to_numpy(variables[0]), -(0.3 + 0.15), rtol=1e-6
    )
    assert optimizer.learning_rate_factor == 3.0


def test_adaptive_accumulation_refuses_what_it_cannot_do():
    model = frozen_linear_model(kg.SGD(0.1, max_accumulation_steps=4))
    x, y, _ = linear_regression(64)
    with pytest.raises(ValueError, match="max_accumulation_steps=4"):
        model.fit(
            x, y, verbose=0, callbacks=[kg.AdaptiveAccumulation(max_steps=8)]
        )
    model = frozen_linear_model(keras.optimizers.SGD(0.1))
    with pytest.raises(ValueError, match="keras_gradtools optimizer"):
        model.fit(x, y, verbose=0, callbacks=[kg.AdaptiveAccumulation(8)])
    model = frozen_linear_model(
        kg.wrap("sgd", max_accumulation_steps=8, accumulation_steps=2)
    )
    with pytest.raises(ValueError, match="learning_rate_rule=None"):
        model.fit(x, y, verbose=0, callbacks=[kg.AdaptiveAccumulation(8)])
    with pytest.raises(ValueError, match="min_steps"):
        kg.AdaptiveAccumulation(8, min_steps=1)
    with pytest.raises(ValueError, match="learning_rate_rule"):
        kg.AdaptiveAccumulation(8, learning_rate_rule="cubic")
    with pytest.raises(ValueError, match="max_accumulation_steps"):
        kg.SGD(accumulation_steps=4, max_accumulation_steps=2)
    optimizer = kg.SGD(accumulation_steps=2, max_accumulation_steps=4)
    with pytest.raises(ValueError, match=r"accumulation_steps.*\[1, 4\]"):
        optimizer.accumulation_steps = 5


def test_tensorboard_carries_k_next_to_the_monitor(tmp_path):
    from keras_gradtools.callbacks.summary_writer import read_events

    x, y, _ = linear_regression(1024, seed=4)
    model = frozen_linear_model(kg.SGD(0.0, max_accumulation_steps=16))
    callbacks = [
        kg.GradientVarianceMonitor(log_dir=str(tmp_path), verbose=0),
        kg.AdaptiveAccumulation(16, log_dir=str(tmp_path)),
    ]
    history = model.fit(
        x, y, batch_size=4, epochs=3, verbose=0, callbacks=callbacks
    )
    tags = read_events(str(tmp_path))["gradients"]
    for name in ("accumulation_steps", "learning_rate_factor"):
        values = [float(v) for _, v in tags[name]]
        assert values == history.history[name]
    assert "grad_noise_scale" in tags
    assert math.isfinite(history.history["grad_noise_scale"][-1])


def test_adaptive_accumulation_moves_beta_2_and_weight_decay_too():
    """The transfer rule shared with the schedules: with K0 = 1 and the
    sqrt rule, at K the learning rate and the weight decay are multiplied
    by sqrt(K) (B / (lr wd) constant) and "macro" Adam decays v by
    beta_2**K per update."""
    x, y, _ = linear_regression(1024, seed=3)
    optimizer = kg.AdamW(
        0.0, weight_decay=0.1, max_accumulation_steps=16, second_moment="macro"
    )
    model = frozen_linear_model(optimizer)
    adaptive = kg.AdaptiveAccumulation(16, update_freq=32)
    model.fit(x, y, batch_size=4, epochs=1, verbose=0, callbacks=[adaptive])
    k = optimizer.accumulation_steps
    assert k >= 2
    assert optimizer.learning_rate_factor == pytest.approx(math.sqrt(k))
    assert optimizer.weight_decay_factor == pytest.approx(math.sqrt(k))
    assert optimizer.effective_beta_2 == pytest.approx(0.999**k)
    assert optimizer.hyperparameter_transfer == {
        "beta_1": False,
        "beta_2": True,
    }
