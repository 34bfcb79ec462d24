"""The noise generator: Threefry-2x32-20 known answers, a float64 twin of
the inverse-transform sampling, and the same stream compiled or not."""

import math

import numpy as np
import pytest
from scipy.special import erfinv

from keras_gradtools.transforms import gaussian_noise
from keras_gradtools.transforms import standard_normal
from keras_gradtools.transforms import threefry2x32
from keras_gradtools.transforms.threefry import erfinv as erfinv_f32
from keras_gradtools.transforms.threefry import normal_from_bits

# Known-answer vectors of Threefry-2x32-20 from the Random123 distribution
# (also used by JAX's tests): (key, counter) -> output.
KNOWN_ANSWERS = [
    (
        (0x00000000, 0x00000000),
        (0x00000000, 0x00000000),
        (0x6B200159, 0x99BA4EFE),
    ),
    (
        (0xFFFFFFFF, 0xFFFFFFFF),
        (0xFFFFFFFF, 0xFFFFFFFF),
        (0x1CB996FC, 0xBB002BE7),
    ),
    (
        (0x13198A2E, 0x03707344),
        (0x243F6A88, 0x85A308D3),
        (0xC4923A9C, 0x483DF7A0),
    ),
]


@pytest.mark.parametrize("key,counter,expected", KNOWN_ANSWERS)
def test_threefry_known_answers(key, counter, expected):
    out = threefry2x32(
        [np.uint32(k) for k in key],
        [np.array([c], np.uint32) for c in counter],
    )
    assert [int(np.asarray(o)[0]) for o in out] == list(expected)


def _numpy_standard_normal(count, key, stream):
    pairs = (count + 1) // 2
    x0, x1 = threefry2x32(
        [np.uint32(k) for k in key],
        [np.arange(pairs, dtype=np.uint32), np.full(pairs, stream, np.uint32)],
    )
    bits = np.concatenate([np.asarray(x0), np.asarray(x1)])
    centered = (np.floor(bits.astype(np.float64) / 512) + 0.5) / 2**22 - 1
    return (np.sqrt(2.0) * erfinv(centered))[:count]


def test_inverse_transform_matches_float64_twin():
    z = np.asarray(standard_normal(1001, (5, 9), 3))
    expected = _numpy_standard_normal(1001, (5, 9), 3)
    np.testing.assert_allclose(z, expected, rtol=1e-5, atol=1e-5)


def test_erfinv_matches_scipy_on_every_input_scale():
    # Every 2**9-th 23-bit input: the whole range normal_from_bits feeds it,
    # the far tails included.
    top = np.arange(0, 2**23, 2**9, dtype=np.float64)
    top = np.concatenate([top, [1, 2, 2**23 - 2, 2**23 - 1]])
    x = (top + 0.5) / 2**22 - 1
    ours = np.asarray(erfinv_f32(x.astype(np.float32)), np.float64)
    np.testing.assert_allclose(ours, erfinv(x), rtol=2e-6, atol=1e-6)


def test_extreme_bit_patterns_give_finite_symmetric_samples():
    extremes = np.array([0, 1, 511, 512, 2**32 - 513, 2**32 - 1], np.uint32)
    z = np.asarray(normal_from_bits(extremes), np.float64)
    assert np.all(np.isfinite(z))
    np.testing.assert_allclose(z[0], -z[-1], rtol=1e-6)
    assert 5.0 < -z[0] < 5.4


def test_moments_and_independence():
    n = 1_000_000
    z = np.asarray(standard_normal(n, (11, 0), 0), np.float64)
    other = np.asarray(standard_normal(n, (11, 1), 0), np.float64)
    later = np.asarray(standard_normal(n, (11, 0), 1), np.float64)
    bound = 5 / math.sqrt(n)  # five standard errors
    assert abs(z.mean()) < bound
    assert abs(z.std() - 1) < 5 * math.sqrt(0.5 / n)
    kurtosis = np.mean((z - z.mean()) ** 4) / z.var() ** 2
    assert abs(kurtosis - 3) < 5 * math.sqrt(24 / n)
    for a, b in [
        (z[:-1], z[1:]),
        (z, other),
        (z, later),
        (z[: n // 2], z[n // 2 :]),
    ]:
        assert abs(np.corrcoef(a, b)[0, 1]) < bound
    # Tail mass beyond 3 sigma: 0.0027 for a true normal.
    tail = np.mean(np.abs(z) > 3)
    assert abs(tail - 0.0026998) < 5 * math.sqrt(0.0027 / n)


def _draw_noise(seed, step):
    return gaussian_noise([(3, 4), (37, 5)], seed, step, wanted=[1])[0]


@pytest.mark.tensorflow_only
def test_same_stream_bitwise_eager_graph_and_xla():
    """Every float operation of the transform is one IEEE operation, so the
    compiled noise is bitwise the eager noise (XLA included)."""
    import tensorflow as tf

    seed, step = tf.constant(1234), tf.constant(7, tf.int64)
    eager = np.asarray(_draw_noise(seed, step))
    graph = tf.function(_draw_noise)(seed, step).numpy()
    compiled = tf.function(_draw_noise, jit_compile=True)(seed, step).numpy()
    np.testing.assert_array_equal(eager, graph)
    np.testing.assert_array_equal(compiled, eager)
    assert eager.shape == (37, 5)


@pytest.mark.jax_only
def test_same_stream_bitwise_eager_and_jit():
    """JAX's XLA fuses multiply-adds into FMAs inside a jitted loop; the
    transform's products are rounded on their own, so jit changes nothing."""
    import jax

    seed, step = np.int32(1234), np.int32(7)
    eager = np.asarray(_draw_noise(seed, step))
    compiled = np.asarray(jax.jit(_draw_noise)(seed, step))
    np.testing.assert_array_equal(compiled, eager)
    assert eager.shape == (37, 5)
