"""Stage 4, annealed gradient noise (docs/design.md §1, global half step
4): g_tilde = c * g_bar + sigma_t * eps, sigma_t**2 = eta / (1 + t)**gamma,
one draw per update, added after clipping.

(a) `noise_std`, `gaussian_noise` against the reference schedule and
hand-computed values; (b) the stage through `optimizer.apply`: SGD at
learning rate 1 on zero gradients moves by exactly -sigma_t * eps.
(The Threefry stream itself is pinned by known answers in
tests/test_threefry.py; the million-draw checks are in
tests/test_update_rules.py.)
"""

import keras
import numpy as np
import numpy_reference as ref
import pytest
from reference import f64 as _np
from reference import weights

import keras_gradtools as kg
from keras_gradtools import transforms

N = 20_000
# Five standard errors of n = 20000 standard normal draws.
FIVE_SE_MEAN = 5 / np.sqrt(N)
FIVE_SE_STD = 5 / np.sqrt(2 * N)

# ----------------------------------------------------------------------
# (a) The pure functions.


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


@pytest.mark.parametrize(
    "eta, gamma, t, expected",
    [
        (0.3, 0.55, 0, np.sqrt(0.3)),  # the first update uses eta
        (1.0, 1.0, 3, 0.5),  # sqrt(1 / 4)
        (2.0, 0.0, 9, np.sqrt(2.0)),  # gamma = 0: constant
        (8.0, 2.0, 1, np.sqrt(2.0)),  # sqrt(8 / 4)
        (0.0, 0.55, 5, 0.0),
    ],
)
def test_noise_std_by_hand(eta, gamma, t, expected):
    assert float(transforms.noise_std(eta, gamma, t)) == pytest.approx(
        expected, rel=1e-6, abs=1e-12
    )
    assert ref.noise_std(eta, gamma, t) == pytest.approx(expected, abs=1e-12)


def test_gaussian_noise_is_standard_normal_and_keyed_by_seed_and_step():
    (x,) = transforms.gaussian_noise([(N,)], 3, 0)
    x = _np(x)
    assert abs(x.mean()) < FIVE_SE_MEAN
    assert abs(x.std() - 1) < FIVE_SE_STD
    (again,) = transforms.gaussian_noise([(N,)], 3, 0)
    np.testing.assert_array_equal(_np(again), x)
    for seed, step in ((4, 0), (3, 1)):
        (other,) = transforms.gaussian_noise([(N,)], seed, step)
        other = _np(other)
        assert np.mean(other == x) < 0.01
        assert abs(np.corrcoef(x, other)[0, 1]) < FIVE_SE_MEAN


# ----------------------------------------------------------------------
# (b) Through the optimizer.


@pytest.mark.parametrize("eta, gamma", [(0.5, 0.55), (2.0, 1.0)])
def test_one_draw_per_update_with_the_scheduled_std(eta, gamma):
    """K = 2 on zero gradients: the weights move only at the second
    micro-batch, by one draw of std sigma_t (not two draws: sqrt(2)
    sigma_t), and the statistics record sigma_t."""
    variable = keras.Variable(np.zeros(N, "float32"))
    optimizer = kg.SGD(
        1.0,
        accumulation_steps=2,
        noise_eta=eta,
        noise_gamma=gamma,
        noise_seed=5,
        track_gradient_statistics=True,
        jit_compile=False,
    )
    zeros = [np.zeros(N, "float32")]
    steps = []
    for t in range(3):
        before = _np(variable.value)
        optimizer.apply(zeros, [variable])
        np.testing.assert_array_equal(_np(variable.value), before)
        optimizer.apply(zeros, [variable])
        step = before - _np(variable.value)
        sigma = ref.noise_std(eta, gamma, t)
        assert abs(step.mean()) < FIVE_SE_MEAN * sigma
        assert abs(step.std() / sigma - 1) < FIVE_SE_STD, (t, step.std())
        assert float(
            optimizer.gradient_statistics()["noise_std"]
        ) == pytest.approx(sigma, rel=1e-6)
        steps.append(step)
    assert abs(np.corrcoef(steps[0], steps[1])[0, 1]) < FIVE_SE_MEAN


def test_noise_is_added_after_clipping(rng):
    """Same seed, same shapes: one optimizer on zero gradients (it moves
    by -eps_t), one on large gradients clipped to a global norm of 1e-3.
    The difference is the reference's clipped mean, whatever the noise:
    the noise is neither clipped nor scaled by the clip factor."""
    shapes = [(40, 5), (30,)]
    k = 2

    def run(grads):
        variables = [keras.Variable(np.zeros(s, "float32")) for s in shapes]
        optimizer = kg.SGD(
            1.0,
            accumulation_steps=k,
            global_clipnorm=1e-3,
            noise_eta=1.0,
            noise_seed=9,
            jit_compile=False,
        )
        for g in grads:
            optimizer.apply(g, variables)
        return weights(variables)

    grads = [
        [(10 * rng.normal(size=s)).astype("float32") for s in shapes]
        for _ in range(k)
    ]
    noise_only = run([[np.zeros(s, "float32") for s in shapes]] * k)
    noisy = run(grads)
    assert ref.global_norm(noise_only) > 10.0  # sigma = 1 on 230 elements
    reference = ref.ReferenceOptimizer(
        ref.SGDRule(1.0),
        [np.zeros(s) for s in shapes],
        k,
        "global_clipnorm",
        1e-3,
    )
    for g in grads:
        reference.apply(g)
    assert reference.clipped_any
    for a, b, e in zip(noisy, noise_only, reference.weights):
        np.testing.assert_allclose(a - b, e, rtol=0, atol=2e-6)


def test_zero_eta_adds_nothing(rng):
    variable = keras.Variable(np.zeros(7, "float32"))
    optimizer = kg.SGD(1.0, noise_eta=0.0, noise_seed=1, jit_compile=False)
    g = rng.normal(size=7).astype("float32")
    optimizer.apply([g], [variable])
    np.testing.assert_array_equal(variable.numpy(), -g)
