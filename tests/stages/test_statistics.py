"""Stage 5, gradient statistics (docs/design.md §3): from one cycle of n
micro-batch gradients, before clipping, tr(Sigma_M), the unbiased |E g|**2,
B_simple, the SNR and |g_bar|.

(a) The formulas of `keras_gradtools.transforms.statistics` against the
float64 reference and hand-computed values; (b) the stage through
`optimizer.gradient_statistics()`.
"""

import math

import keras
import numpy as np
import numpy_reference as ref
import pytest
from reference import f64 as _np
from reference import micro_batches
from reference import zero_variables

import keras_gradtools as kg
from keras_gradtools import transforms

KEYS = ("variance", "mean_norm_sq", "noise_scale", "snr", "grad_norm")

# ----------------------------------------------------------------------
# (a) The formulas.


def test_gradient_statistics_reference_formulas():
    """The reference statistics on a hand-computable case: two
    micro-batches [1, 3] and [3, 5] -> mean [2, 4], s^2 = [2, 2]."""
    stats = ref.gradient_statistics(
        [[np.array([1.0, 3.0])], [np.array([3.0, 5.0])]]
    )
    assert stats["variance"] == pytest.approx(4.0)
    assert stats["mean_norm_sq"] == pytest.approx(20.0 - 2.0)
    assert stats["noise_scale"] == pytest.approx(4.0 / 18.0)
    assert stats["snr"] == pytest.approx(18.0 / 2.0)
    assert stats["grad_norm"] == pytest.approx(np.sqrt(20.0))


@pytest.mark.parametrize("replicas", [1.0, 2.0, 3.0])
def test_one_variance_function_per_coordinate_and_per_tensor(rng, replicas):
    """The same function gives s2 per coordinate from (S, g_bar**2) and
    tr(Sigma) per tensor from (Q, |g_bar|**2), at the micro-batch size."""
    count, r = 4, int(replicas)
    # n * R samples at 1 / R of the micro-batch: h = R * g_r.
    local = rng.normal(size=(count * r, 7)) / r
    square_sum = (local**2).sum(0)
    mean = local.sum(0) / count
    samples = r * local
    expected = samples.var(0, ddof=1) / r
    per_coordinate = _np(
        transforms.micro_batch_variance_from_sums(
            square_sum.astype("float32"),
            (mean**2).astype("float32"),
            count,
            replicas,
        )
    )
    np.testing.assert_allclose(per_coordinate, expected, rtol=1e-5)
    per_tensor = float(
        transforms.micro_batch_variance_from_sums(
            np.float32(square_sum.sum()),
            np.float32((mean**2).sum()),
            count,
            replicas,
        )
    )
    assert per_tensor == pytest.approx(expected.sum(), rel=1e-5)


def test_statistics_from_sums_match_the_reference(rng):
    micro = [[rng.normal(1.0, 2.0, size=(3, 2))] for _ in range(4)]
    expected = ref.gradient_statistics(micro)
    g = np.array([m[0] for m in micro])
    variance = g.var(0, ddof=1).sum()
    stats = transforms.gradient_statistics_from_sums(
        variance, float((g.mean(0) ** 2).sum()), 4.0
    )
    for key in ("variance", "mean_norm_sq", "noise_scale", "snr"):
        assert float(stats[key]) == pytest.approx(expected[key], rel=1e-5)
    assert float(stats["signal_resolved"]) == 1.0


def test_an_unresolved_signal_gives_a_lower_bound():
    # variance 8 over 4 micro-batches; |g_bar|**2 = 1.5 < 8 / 4: the
    # unbiased |E g|**2 is -0.5.
    stats = transforms.gradient_statistics_from_sums(8.0, 1.5, 4.0)
    assert float(stats["mean_norm_sq"]) == pytest.approx(-0.5)
    assert float(stats["signal_resolved"]) == 0.0
    assert float(stats["snr"]) == 0.0
    # B_simple >= variance / |g_bar|**2 = 8 / 1.5.
    assert float(stats["noise_scale"]) == pytest.approx(8 / 1.5)
    one_sample = transforms.gradient_statistics_from_sums(8.0, 1.5, 1.0)
    assert all(math.isnan(float(v)) for v in one_sample.values())


def test_statistics_from_sums_by_hand():
    """The two micro-batches [1, 3] and [3, 5] from their parts:
    Q = 1 + 9 + 9 + 25 = 44, |g_bar|**2 = 20, n = 2."""
    variance = float(transforms.micro_batch_variance_from_sums(44.0, 20.0, 2.0))
    assert variance == pytest.approx(4.0)  # (44 / 2 - 20) * 2 / 1
    stats = transforms.gradient_statistics_from_sums(variance, 20.0, 2.0)
    assert float(stats["mean_norm_sq"]) == pytest.approx(18.0)
    assert float(stats["noise_scale"]) == pytest.approx(4.0 / 18.0)
    assert float(stats["snr"]) == pytest.approx(9.0)
    assert float(stats["signal_resolved"]) == 1.0


def test_no_variance_means_no_noise_and_an_unbounded_snr():
    noise_scale, snr, resolved = transforms.noise_scale_and_snr(0.0, 5.0, 4.0)
    assert float(noise_scale) == 0.0
    assert math.isinf(float(snr))
    assert float(resolved) == 1.0


def test_smoothed_is_one_step_of_a_moving_average():
    assert float(transforms.smoothed(1.0, 3.0, 0.75)) == pytest.approx(1.5)
    assert float(transforms.smoothed(0.0, 2.0, 0.95)) == pytest.approx(0.1)


# ----------------------------------------------------------------------
# (b) Through the optimizer.


def _statistics(optimizer):
    return {k: float(v) for k, v in optimizer.gradient_statistics().items()}


def test_the_statistics_of_one_cycle_by_hand():
    variable = keras.Variable(np.zeros(2, "float32"))
    optimizer = kg.SGD(
        0.1,
        accumulation_steps=2,
        track_gradient_statistics=True,
        jit_compile=False,
    )
    for g in ([1.0, 3.0], [3.0, 5.0]):
        optimizer.apply([np.array(g, "float32")], [variable])
    stats = _statistics(optimizer)
    assert stats["variance"] == pytest.approx(4.0, rel=1e-6)
    assert stats["mean_norm_sq"] == pytest.approx(18.0, rel=1e-6)
    assert stats["noise_scale"] == pytest.approx(4.0 / 18.0, rel=1e-6)
    assert stats["snr"] == pytest.approx(9.0, rel=1e-6)
    assert stats["grad_norm"] == pytest.approx(np.sqrt(20.0), rel=1e-6)
    assert stats["signal_resolved"] == 1.0
    assert stats["noise_std"] == 0.0


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("mode", [None, "clipnorm", "global_clipnorm"])
def test_the_statistics_match_the_reference_before_clipping(rng, k, mode):
    """Statistics of the unclipped micro-batches, whatever the clipping;
    each cycle's own (two cycles at different scales)."""
    clip = {} if mode is None else {mode: 0.5}
    variables = zero_variables()
    optimizer = kg.SGD(
        0.1,
        accumulation_steps=k,
        track_gradient_statistics=True,
        jit_compile=False,
        **clip,
    )
    for scale in (1.0, 0.2):
        cycle = micro_batches(rng, k, scale=scale)
        for g in cycle:
            optimizer.apply(g, variables)
        expected = ref.gradient_statistics(cycle)
        stats = _statistics(optimizer)
        for key in KEYS:
            assert stats[key] == pytest.approx(expected[key], rel=1e-4), key


def test_weighted_statistics_match_the_reference(rng):
    counts = [1.0, 4.0, 2.0]
    cycle = micro_batches(rng, 3)
    optimizer = kg.SGD(
        0.1,
        accumulation_steps=3,
        weighted_accumulation=True,
        track_gradient_statistics=True,
        jit_compile=False,
    )
    variables = zero_variables()
    for g, c in zip(cycle, counts):
        optimizer.apply(g, variables, count=c)
    expected = ref.weighted_gradient_statistics(cycle, counts)
    stats = _statistics(optimizer)
    for key in KEYS:
        assert stats[key] == pytest.approx(expected[key], rel=1e-4), key


def test_a_skipped_micro_batch_is_not_a_sample(rng):
    cycle = micro_batches(rng, 4)
    bad = [g.copy() for g in cycle[2]]
    bad[1][0] = np.nan
    optimizer = kg.SGD(
        0.1,
        accumulation_steps=4,
        track_gradient_statistics=True,
        jit_compile=False,
    )
    variables = zero_variables()
    for g in cycle[:2] + [bad] + cycle[3:]:
        optimizer.apply(g, variables)
    expected = ref.gradient_statistics(cycle[:2] + cycle[3:])
    stats = _statistics(optimizer)
    for key in KEYS:
        assert stats[key] == pytest.approx(expected[key], rel=1e-4), key


def test_one_micro_batch_measures_only_the_norm():
    variable = keras.Variable(np.zeros(2, "float32"))
    optimizer = kg.SGD(0.1, track_gradient_statistics=True, jit_compile=False)
    optimizer.apply([np.array([3.0, 4.0], "float32")], [variable])
    stats = _statistics(optimizer)
    assert stats["grad_norm"] == pytest.approx(5.0, rel=1e-6)
    for key in ("variance", "mean_norm_sq", "noise_scale", "snr"):
        assert math.isnan(stats[key]), key
