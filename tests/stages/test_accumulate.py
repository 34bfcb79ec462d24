"""Stage 1, accumulation (docs/design.md §1): the sums G (and S) of a
cycle's micro-batch gradients and the mean g_bar = G / n the update reads.

(a) The pure functions of `keras_gradtools.transforms.accumulation`;
(b) the stage seen through `optimizer.apply`: SGD at learning rate 1 moves
the weights by -g_bar, compared with the float64 reference.
"""

import keras
import numpy as np
import numpy_reference as ref
import pytest
from reference import assert_weights
from reference import f64 as _np
from reference import micro_batches
from reference import weights
from reference import zero_variables

import keras_gradtools as kg
from keras_gradtools import transforms

RTOL = 1e-6

# ----------------------------------------------------------------------
# (a) The pure functions.


def test_restart_or_add(rng):
    accumulated = rng.normal(size=4).astype("float32")
    value = rng.normal(size=4).astype("float32")
    np.testing.assert_allclose(
        _np(transforms.restart_or_add(accumulated, value, False)),
        accumulated.astype(np.float64) + value,
        rtol=RTOL,
    )
    np.testing.assert_array_equal(
        _np(transforms.restart_or_add(accumulated, value, True)), value
    )
    bad = value.copy()
    bad[1] = np.nan
    kept = _np(transforms.restart_or_add(accumulated, bad, False, False))
    np.testing.assert_array_equal(kept, accumulated)
    stale = np.full(4, np.nan, "float32")  # a NaN never survives a restart
    np.testing.assert_array_equal(
        _np(transforms.restart_or_add(stale, value, True)), value
    )


def test_restart_or_maximum_is_kerass_rule():
    """The cycle maximum, with the zero Keras's accumulator restarts from."""
    value = np.array([-1.0, 2.0, 0.5], "float32")
    np.testing.assert_array_equal(
        _np(transforms.restart_or_maximum(np.ones(3, "float32"), value, True)),
        [0.0, 2.0, 0.5],
    )
    np.testing.assert_array_equal(
        _np(transforms.restart_or_maximum(np.ones(3, "float32"), value, False)),
        [1.0, 2.0, 1.0],
    )


def test_micro_batch_variance_and_second_moment_input(rng):
    g = rng.normal(size=(4, 6))
    mean, mean_square = g.mean(0), (g**2).mean(0)
    w = _np(
        transforms.micro_batch_variance(
            mean_square.astype("float32"), mean.astype("float32")
        )
    )
    np.testing.assert_allclose(w, g.var(0), rtol=1e-5, atol=1e-6)
    assert (w >= 0).all()
    update = rng.normal(size=6)
    u = _np(
        transforms.micro_second_moment_input(
            update.astype("float32"), w.astype("float32")
        )
    )
    np.testing.assert_allclose(u, update**2 + w, rtol=1e-6)


def test_restart_or_add_sums_each_cycle_from_its_first_micro_batch(rng):
    """Two cycles of 3 folded with the restart flag: the sum after each
    cycle is that cycle's alone (the first cycle's never leaks in)."""
    cycles = [rng.normal(size=(3, 5)).astype("float32") for _ in range(2)]
    total = np.full(5, 1e6, "float32")  # a stale sum from before
    for cycle in cycles:
        for i, g in enumerate(cycle):
            total = transforms.restart_or_add(total, g, i == 0)
        np.testing.assert_allclose(
            _np(total), cycle.astype(np.float64).sum(0), rtol=1e-6, atol=1e-6
        )


def test_micro_batch_variance_clamps_rounding_at_zero():
    """Identical micro-batches: S / n - g_bar**2 is zero, or a rounding
    error of either sign, and W must be exactly 0 where it would be
    negative."""
    mean = np.array([0.1, 3.0, -7.3], "float32")
    below = (mean.astype(np.float64) ** 2 * (1 - 1e-6)).astype("float32")
    np.testing.assert_array_equal(
        _np(transforms.micro_batch_variance(below, mean)), [0.0, 0.0, 0.0]
    )


# ----------------------------------------------------------------------
# (b) Through the optimizer.


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_the_update_applies_the_mean_of_the_cycle(rng, k):
    variables = zero_variables()
    optimizer = kg.SGD(1.0, accumulation_steps=k, jit_compile=False)
    reference = ref.ReferenceOptimizer(ref.SGDRule(1.0), weights(variables), k)
    for cycle, scale in enumerate((1.0, 0.3)):
        for grads in micro_batches(rng, k, scale=scale):
            optimizer.apply(grads, variables)
            reference.apply(grads)
        assert_weights(variables, reference.weights, what=f"cycle {cycle}")
        assert int(optimizer.iterations) == reference.iterations == cycle + 1
        assert int(optimizer.micro_steps) == reference.micro_steps


def test_each_cycle_restarts_its_sums():
    """K = 2: a first cycle of [100] twice, then [1] and [3]: the second
    update moves by the second cycle's mean, 2, alone."""
    variable = keras.Variable(np.zeros(1, "float32"))
    optimizer = kg.SGD(1.0, accumulation_steps=2, jit_compile=False)
    for g in (100.0, 100.0):
        optimizer.apply([np.array([g], "float32")], [variable])
    np.testing.assert_array_equal(variable.numpy(), [-100.0])
    for g in (1.0, 3.0):
        optimizer.apply([np.array([g], "float32")], [variable])
    np.testing.assert_array_equal(variable.numpy(), [-102.0])


@pytest.mark.filterwarnings("ignore:Gradients do not exist:UserWarning")
def test_a_missing_gradient_counts_as_zero_in_the_mean():
    """K = 2; the first variable has no gradient in the first micro-batch:
    its mean is (0 + [4, 6]) / 2, not [4, 6]."""
    variables = [keras.Variable(np.zeros(2, "float32")) for _ in range(2)]
    optimizer = kg.SGD(1.0, accumulation_steps=2, jit_compile=False)
    optimizer.apply([None, np.array([1.0, 2.0], "float32")], variables)
    optimizer.apply(
        [np.array([4.0, 6.0], "float32"), np.array([3.0, 4.0], "float32")],
        variables,
    )
    np.testing.assert_array_equal(variables[0].numpy(), [-2.0, -3.0])
    np.testing.assert_array_equal(variables[1].numpy(), [-2.0, -3.0])


@pytest.mark.parametrize("counts", [(1.0, 3.0, 2.0), (2.0, 0.0, 5.0)])
def test_weighted_micro_batches_give_the_count_weighted_mean(rng, counts):
    """docs/design.md §7: g_bar = sum w_i g_i / sum w_i; a count of 0
    contributes nothing."""
    k = len(counts)
    variables = zero_variables()
    optimizer = kg.SGD(
        1.0, accumulation_steps=k, weighted_accumulation=True, jit_compile=False
    )
    reference = ref.ReferenceOptimizer(ref.SGDRule(1.0), weights(variables), k)
    for grads, count in zip(micro_batches(rng, k), counts):
        optimizer.apply(grads, variables, count=count)
        reference.apply(grads, count=count)
    assert reference.iterations == 1
    assert_weights(variables, reference.weights)


def test_the_within_cycle_variance_reaches_adam_micro(rng):
    """Adam "micro" reads S as well as G: one update at K = 3 equals the
    reference's u = g_tilde**2 + W, and differs from "macro" (no W)."""
    k = 3
    grads = micro_batches(rng, k)
    results = {}
    for mode in ("micro", "macro"):
        variables = zero_variables()
        optimizer = kg.Adam(
            0.1, second_moment=mode, accumulation_steps=k, jit_compile=False
        )
        reference = ref.ReferenceOptimizer(
            ref.AdamRule(0.1, second_moment=mode, accumulation_steps=k),
            weights(variables),
            k,
        )
        for g in grads:
            optimizer.apply(g, variables)
            reference.apply(g)
        assert_weights(variables, reference.weights, rtol=1e-5, what=mode)
        results[mode] = reference.weights
    assert (
        ref.global_norm(
            [a - b for a, b in zip(results["micro"], results["macro"])]
        )
        > 1e-3
    )
