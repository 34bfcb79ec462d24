"""Counters, schedules, moving averages and non-finite micro-batches."""

import keras
import numpy as np
import pytest
from helpers import copy_variables
from helpers import make_variables
from helpers import max_abs_difference
from helpers import random_gradients
from helpers import values

import keras_gradtools as kg


@pytest.mark.parametrize("jit_compile", [True, False])
def test_weights_move_only_on_the_last_micro_batch(jit_compile, rng):
    k = 4
    variables = make_variables(rng)
    optimizer = kg.Adam(0.1, accumulation_steps=k, jit_compile=jit_compile)
    for cycle in range(2):
        before = values(variables)
        for micro in range(k):
            optimizer.apply(random_gradients(rng, variables), variables)
            moved = max_abs_difference(values(variables), before)
            if micro < k - 1:
                assert moved == 0.0
            else:
                assert moved > 0.0
        assert int(optimizer.iterations.numpy()) == cycle + 1
        assert int(optimizer.micro_steps.numpy()) == (cycle + 1) * k


def test_learning_rate_schedule_is_evaluated_on_updates(rng):
    k = 3
    schedule = keras.optimizers.schedules.PiecewiseConstantDecay(
        boundaries=[0], values=[1.0, 0.0]
    )
    variables = [keras.Variable(np.zeros(4, "float32"))]
    optimizer = kg.SGD(schedule, accumulation_steps=k)
    ones = [np.ones(4, "float32")]
    for _ in range(k):
        optimizer.apply(ones, variables)
    np.testing.assert_allclose(variables[0].numpy(), -1.0)
    # The second update has iterations=1, so learning rate 0. Evaluated on
    # micro-batches (as Keras does) the first update would already use 0.
    for _ in range(k):
        optimizer.apply(ones, variables)
    np.testing.assert_allclose(variables[0].numpy(), -1.0)
    assert float(optimizer.learning_rate) == 0.0


def test_moving_average_is_updated_on_updates_only(rng):
    k = 2
    variables = [keras.Variable(np.zeros(3, "float32"))]
    optimizer = kg.SGD(
        1.0, accumulation_steps=k, use_ema=True, ema_momentum=0.5
    )
    grads = [np.full(3, -1.0, "float32")]
    for _ in range(2 * k):
        optimizer.apply(grads, variables)
    # Updates: w = 1 then 2. EMA: first update copies (1), then
    # 0.5 * 1 + 0.5 * 2 = 1.5. Per micro-batch it would differ.
    average = optimizer._model_variables_moving_average[0]
    np.testing.assert_allclose(variables[0].numpy(), 2.0)
    np.testing.assert_allclose(average.numpy(), 1.5)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("k", [1, 4])
def test_nonfinite_micro_batch_is_skipped_not_accumulated(bad, k, rng):
    variables = make_variables(rng)
    clean = [random_gradients(rng, variables) for _ in range(2 * k)]
    poisoned = list(clean)
    broken = [g.copy() for g in clean[1]]
    broken[0][0, 0] = bad
    poisoned.insert(1, broken)

    skipping = kg.Adam(0.05, accumulation_steps=k, second_moment="macro")
    trained = copy_variables(variables)
    for grads in poisoned[: 2 * k]:
        skipping.apply(grads, trained)
    assert int(skipping.skipped_micro_batches.numpy()) == 1
    # Statistics are NaN by design when there is nothing to measure.
    state = [v for v in skipping.variables if "statistic_" not in v.name]
    for v in trained + state:
        assert np.all(np.isfinite(np.asarray(v.numpy(), "float64")))

    # The cycle that held the bad micro-batch averages its finite ones.
    reference = keras.optimizers.Adam(0.05)
    expected = copy_variables(variables)
    if k == 1:
        reference.apply(clean[0], expected)
    else:
        kept = [clean[0]] + clean[1 : k - 1]
        mean = [np.mean([g[i] for g in kept], axis=0) for i in range(3)]
        reference.apply(mean, expected)
        second = clean[k - 1 : 2 * k - 1]
        reference.apply(
            [np.mean([g[i] for g in second], axis=0) for i in range(3)],
            expected,
        )
    assert max_abs_difference(values(trained), values(expected)) < 2e-6


def test_cycle_of_only_nonfinite_micro_batches_skips_the_update(rng):
    variables = make_variables(rng)
    optimizer = kg.Adam(0.05, accumulation_steps=2)
    before = values(variables)
    nan = [np.full(v.shape, np.nan, "float32") for v in variables]
    optimizer.apply(nan, variables)
    optimizer.apply(nan, variables)
    assert max_abs_difference(values(variables), before) == 0.0
    assert int(optimizer.iterations.numpy()) == 0
    assert int(optimizer.skipped_micro_batches.numpy()) == 2
    optimizer.apply(random_gradients(rng, variables), variables)
    optimizer.apply(random_gradients(rng, variables), variables)
    assert int(optimizer.iterations.numpy()) == 1
    assert all(np.all(np.isfinite(v)) for v in values(variables))


def test_on_nonfinite_apply_is_kerass_behaviour(rng):
    variables = make_variables(rng)
    optimizer = kg.SGD(0.1, on_nonfinite="apply")
    grads = random_gradients(rng, variables)
    grads[0][0, 0] = np.nan
    optimizer.apply(grads, variables)
    assert np.isnan(variables[0].numpy()[0, 0])


def test_gradient_list_must_match_variables(rng):
    variables = make_variables(rng)
    optimizer = kg.Adam()
    with pytest.raises(ValueError, match="3 gradients for 2 variables"):
        optimizer.apply(random_gradients(rng, variables), variables[:2])
    wrong = random_gradients(rng, variables)
    wrong[1] = np.zeros((7,), "float32")
    with pytest.raises(ValueError, match=r"has shape \(7,\)"):
        optimizer.apply(wrong, variables)
    with pytest.raises(ValueError, match="No gradients provided"):
        optimizer.apply([None, None, None], variables)
    integers = [np.ones(v.shape, "int32") for v in variables]
    with pytest.raises(ValueError, match="floating point"):
        optimizer.apply(integers, variables)


def test_only_the_slots_a_configuration_reads_exist(rng):
    variables = make_variables(rng)
    parameters = sum(int(np.prod(v.shape)) for v in variables)

    def slot_elements(optimizer):
        optimizer.build(variables)
        # Per-parameter slots only (the running statistics are tiny
        # per-variable vectors).
        return sum(
            int(np.prod(v.shape))
            for v in optimizer.variables
            if len(v.shape) and "running_" not in v.name
        )

    assert slot_elements(kg.SGD()) == 0
    assert slot_elements(kg.SGD(accumulation_steps=4)) == parameters
    # Statistics keep one scalar per variable (sum of squared norms), not a
    # per-coordinate sum of squares.
    assert slot_elements(
        kg.SGD(accumulation_steps=4, track_gradient_statistics=True)
    ) == parameters + len(variables)
    assert slot_elements(kg.Adam()) == 2 * parameters
    assert (
        slot_elements(kg.Adam(accumulation_steps=4, second_moment="macro"))
        == 3 * parameters
    )
    assert (
        slot_elements(kg.Adam(accumulation_steps=4, second_moment="micro"))
        == 4 * parameters
    )


def test_gradient_statistics_is_a_snapshot(rng):
    variables = [keras.Variable(np.zeros(3, "float32"))]
    optimizer = kg.SGD(
        0.1, accumulation_steps=2, track_gradient_statistics=True
    )
    for g in ([1.0, 2.0, 3.0], [3.0, 2.0, 1.0]):
        optimizer.apply([np.array(g, "float32")], variables)
    first = optimizer.gradient_statistics()
    np.testing.assert_allclose(float(first["grad_norm"]), np.sqrt(12.0))
    for _ in range(2):
        optimizer.apply([np.array([10.0, 0.0, 0.0], "float32")], variables)
    np.testing.assert_allclose(float(first["grad_norm"]), np.sqrt(12.0))
    later = optimizer.gradient_statistics()
    np.testing.assert_allclose(float(later["grad_norm"]), 10.0)
    assert float(later["noise_std"]) == 0.0


@pytest.mark.parametrize("jit_compile", [True, False])
def test_on_nonfinite_raise_eagerly_names_the_variable(jit_compile, rng):
    variables = make_variables(rng)
    optimizer = kg.Adam(
        0.1, accumulation_steps=2, on_nonfinite="raise", jit_compile=jit_compile
    )
    optimizer.apply(random_gradients(rng, variables), variables)
    state = values(variables) + [
        np.array(v.numpy()) for v in optimizer.variables
    ]
    bad = random_gradients(rng, variables)
    bad[1][2] = np.inf
    with pytest.raises(
        FloatingPointError, match=r"micro-batch 1 .*" + variables[1].path
    ):
        optimizer.apply(bad, variables)
    after = values(variables) + [
        np.array(v.numpy()) for v in optimizer.variables
    ]
    for a, b in zip(state, after):
        np.testing.assert_array_equal(a, b)


@pytest.mark.tensorflow_only
def test_on_nonfinite_raise_in_graphs(rng):
    import tensorflow as tf

    variables = make_variables(rng)
    optimizer = kg.SGD(0.1, on_nonfinite="raise")
    optimizer.build(variables)

    def step(grads):
        optimizer.apply(list(grads), variables)

    bad = random_gradients(rng, variables)
    bad[0][0, 0] = np.nan
    bad = tuple(tf.constant(g) for g in bad)
    before = values(variables)
    with pytest.raises(
        tf.errors.InvalidArgumentError, match="non-finite gradient"
    ):
        tf.function(step)(bad)
    assert max_abs_difference(values(variables), before) == 0.0
    with pytest.raises(ValueError, match="XLA"):
        tf.function(step, jit_compile=True)(bad)


@pytest.mark.parametrize("jit_compile", [True, False])
def test_huge_finite_gradient_is_clipped_to_finite_weights(jit_compile):
    """Elements of 1e20 square to inf in float32; the global norm must not
    (Keras's global_clipnorm turns this gradient into NaN weights)."""
    variable = keras.Variable(np.zeros(3, "float32"))
    optimizer = kg.SGD(1.0, global_clipnorm=1.0, jit_compile=jit_compile)
    optimizer.apply([np.array([1e20, 0.0, 0.0], "float32")], [variable])
    np.testing.assert_allclose(variable.numpy(), [-1.0, 0.0, 0.0], rtol=1e-6)


@pytest.mark.parametrize("jit_compile", [True, False])
def test_finite_micro_batches_whose_sum_overflows_are_left_out(jit_compile):
    variable = keras.Variable(np.ones(2, "float32"))
    optimizer = kg.SGD(
        1.0, accumulation_steps=2, global_clipnorm=1.0, jit_compile=jit_compile
    )
    huge = np.array([3e38, 0.0], "float32")
    for _ in range(2):
        optimizer.apply([huge], [variable])
    np.testing.assert_array_equal(variable.numpy(), [1.0, 1.0])
    assert int(optimizer.iterations.numpy()) == 0
    assert int(optimizer.skipped_micro_batches.numpy()) == 1
    # The next cycle is a fresh one.
    for _ in range(2):
        optimizer.apply([np.array([3.0, 4.0], "float32")], [variable])
    np.testing.assert_allclose(variable.numpy(), [0.4, 0.2], rtol=1e-6)


@pytest.mark.parametrize("jit_compile", [True, False])
def test_cycle_with_only_overwritten_variables(jit_compile):
    """Every gradient of the call belongs to a variable Keras overwrites
    with its gradient (float8 scales): the cycle's maximum is written, as
    Keras's own accumulation does, and nothing else is updated."""
    variable = keras.Variable(np.zeros((2,), "float32"))
    variable.overwrite_with_gradient = True
    optimizer = kg.SGD(1.0, accumulation_steps=2, jit_compile=jit_compile)
    for g in ([2.0, 1.0], [1.0, 3.0]):
        optimizer.apply([np.array(g, "float32")], [variable])
    np.testing.assert_array_equal(variable.numpy(), [2.0, 3.0])
