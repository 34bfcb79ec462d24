"""The pure maths of `keras_gradtools.transforms`, function by function,
against float64 NumPy (tests/numpy_reference.py where it has the formula),
on whichever backend the suite runs."""

import math

import numpy as np
import numpy_reference as ref
import pytest
from keras import ops

from keras_gradtools import transforms
from keras_gradtools.transforms import sparse

RTOL = 1e-6


def _np(x):
    return np.asarray(ops.convert_to_numpy(x), np.float64)


@pytest.fixture
def tensors(rng):
    return [rng.normal(size=s).astype("float32") for s in ((3, 4), (5,))]


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


@pytest.mark.parametrize(
    "mode, threshold",
    [("clipvalue", 0.5), ("clipnorm", 1.0), ("global_clipnorm", 1.5)],
)
@pytest.mark.parametrize("given_norms", [False, True])
def test_clipping_and_its_factors(tensors, mode, threshold, given_norms):
    norms = transforms.square_norms(tensors) if given_norms else None
    clipped, factors = transforms.clip_gradients(
        tensors, square_norms=norms, **{mode: threshold}
    )
    expected, expected_factors = ref.clip(tensors, mode, threshold)
    for c, e, f, ef in zip(clipped, expected, factors, expected_factors):
        np.testing.assert_allclose(_np(c), e, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(_np(f), ef, rtol=1e-6)
    assert transforms.needs_square_norms(None, None) is False
    assert transforms.needs_square_norms(1.0, None) is True


@pytest.mark.parametrize("mode", ["clipnorm", "global_clipnorm"])
def test_norm_clipping_of_finite_gradients_whose_squares_overflow(mode):
    """Elements of 1e20 square to inf in float32: the norm is taken from
    the tensor scaled by its largest element instead (float64 reference)."""
    huge = [
        np.array([1e20, -3e20, 2e20], "float32"),
        np.array([[4e19, 0.0]], "float32"),
    ]
    clipped, factors = transforms.clip_gradients(
        huge, square_norms=transforms.square_norms(huge), **{mode: 1.0}
    )
    expected, expected_factors = ref.clip(huge, mode, 1.0)
    for c, e, f, ef in zip(clipped, expected, factors, expected_factors):
        assert np.all(np.isfinite(_np(c)))
        np.testing.assert_allclose(_np(c), e, rtol=1e-5, atol=1e-12)
        np.testing.assert_allclose(_np(f), ef, rtol=1e-5)


def test_norm_clipping_keeps_nonfinite_gradients_nonfinite():
    for bad in (np.inf, np.nan):
        tensors = [np.array([1.0, bad], "float32"), np.ones(2, "float32")]
        clipped, _ = transforms.clip_gradients(tensors, global_clipnorm=1.0)
        assert not np.all(np.isfinite(_np(clipped[0])))
        clipped, _ = transforms.clip_gradients(tensors, clipnorm=1.0)
        assert not np.all(np.isfinite(_np(clipped[0])))


def test_reductions(tensors):
    norms = transforms.square_norms(tensors)
    for n, t in zip(norms, tensors):
        assert float(n) == pytest.approx(
            float((t.astype(np.float64) ** 2).sum()), rel=1e-6
        )
    assert float(transforms.global_norm(tensors)) == pytest.approx(
        ref.global_norm(tensors), rel=1e-6
    )
    assert bool(transforms.all_finite(tensors))
    assert bool(transforms.all_finite(tensors, partial_sums=norms))
    bad = [t.copy() for t in tensors]
    bad[1][2] = np.inf
    assert not bool(transforms.all_finite(bad))
    # Finite elements whose squares overflow: the exact check decides.
    big = [np.full(3, 1e20, "float32")]
    assert bool(transforms.all_finite(big, transforms.square_norms(big)))


@pytest.mark.parametrize("size", [5, 2047, 2048, 3 * 1024 + 17, 40_000])
def test_blocked_sum_and_square_norms_of_large_tensors(rng, size):
    """The matrix-vector form of a sum (TensorFlow's square norms) and the
    backend's square sum, on sizes below, at and between whole blocks."""
    flat = rng.normal(size=size).astype("float32")
    exact = float(flat.astype(np.float64).sum())
    scale = float(np.abs(flat).astype(np.float64).sum())
    assert abs(float(transforms.blocked_sum(flat)) - exact) <= 1e-6 * scale
    matrix = flat.reshape(1, -1)
    (norm,) = transforms.square_norms([matrix])
    assert float(norm) == pytest.approx(
        float((flat.astype(np.float64) ** 2).sum()), rel=1e-6
    )


def test_noise_schedule_and_one_draw_per_model():
    for t in (0, 1, 7):
        assert float(transforms.noise_std(0.3, 0.55, t)) == pytest.approx(
            ref.noise_std(0.3, 0.55, t), rel=1e-6
        )
    shapes = [(3, 4), (5,), (2, 2)]
    every = transforms.gaussian_noise(shapes, 7, 2)
    some = transforms.gaussian_noise(shapes, 7, 2, wanted=[2, 0])
    assert [tuple(x.shape) for x in every] == shapes
    np.testing.assert_array_equal(_np(some[0]), _np(every[2]))
    np.testing.assert_array_equal(_np(some[1]), _np(every[0]))
    flat = np.concatenate([_np(x).ravel() for x in every])
    np.testing.assert_array_equal(
        flat, _np(transforms.standard_normal(flat.size, (7, 0), 2))
    )
    later = transforms.gaussian_noise(shapes, 7, 3)
    assert not np.array_equal(_np(later[0]), _np(every[0]))


@pytest.mark.tensorflow_only
def test_sparse_rows_are_summed_before_accumulating():
    values = np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], "float32")
    summed, unique = sparse.deduplicate_rows(values, np.array([4, 1, 4]))
    order = np.argsort(_np(unique))
    np.testing.assert_array_equal(_np(unique)[order], [1, 4])
    np.testing.assert_array_equal(_np(summed)[order], [[3.0, 4.0], [6.0, 8.0]])
