"""Stage 3, clipping (docs/design.md §1, global half step 3): g_bar (or,
with `clip_micro_batches=True`, each g_i) clipped by value, per-tensor norm
or global norm, with the factor c applied.

(a) `keras_gradtools.transforms.clip_gradients` against the float64
reference; (b) the stage through `optimizer.apply` (SGD at learning rate 1
moves by -c * g_bar), against the reference's processed gradient.
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

MODES = ["clipvalue", "clipnorm", "global_clipnorm"]
# Against micro-batch gradients of scale ~1 on SHAPES (12 and 5 elements):
# each threshold clips the mean of a cycle.
THRESHOLDS = {"clipvalue": 0.5, "clipnorm": 1.0, "global_clipnorm": 1.5}


@pytest.fixture
def tensors(rng):
    return [rng.normal(size=s).astype("float32") for s in ((3, 4), (5,))]


# ----------------------------------------------------------------------
# (a) The pure function.


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


def test_clipping_by_hand():
    """[3, 4] and [0, 12]: norms 5 and 12, global norm 13."""
    grads = [np.array([3.0, 4.0], "float32"), np.array([0.0, 12.0], "float32")]
    clipped, factors = transforms.clip_gradients(grads, clipnorm=1.0)
    np.testing.assert_allclose(_np(clipped[0]), [0.6, 0.8], rtol=1e-6)
    np.testing.assert_allclose(_np(clipped[1]), [0.0, 1.0], rtol=1e-6)
    np.testing.assert_allclose(
        [_np(f) for f in factors], [1 / 5, 1 / 12], rtol=1e-6
    )
    clipped, factors = transforms.clip_gradients(grads, global_clipnorm=6.5)
    np.testing.assert_allclose(_np(clipped[0]), [1.5, 2.0], rtol=1e-6)
    np.testing.assert_allclose(_np(clipped[1]), [0.0, 6.0], rtol=1e-6)
    np.testing.assert_allclose(_np(factors[1]), 0.5, rtol=1e-6)
    clipped, _ = transforms.clip_gradients(grads, clipvalue=3.5)
    np.testing.assert_array_equal(_np(clipped[0]), [3.0, 3.5])
    np.testing.assert_array_equal(_np(clipped[1]), [0.0, 3.5])
    # Below the thresholds nothing changes and c = 1.
    clipped, factors = transforms.clip_gradients(grads, global_clipnorm=13.5)
    np.testing.assert_allclose(_np(clipped[1]), [0.0, 12.0], rtol=1e-6)
    np.testing.assert_allclose(_np(factors[0]), 1.0, rtol=1e-6)


# ----------------------------------------------------------------------
# (b) Through the optimizer.


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("mode", MODES)
def test_the_cycle_mean_is_clipped(rng, mode, k):
    variables = zero_variables()
    optimizer = kg.SGD(
        1.0, accumulation_steps=k, jit_compile=False, **{mode: THRESHOLDS[mode]}
    )
    reference = ref.ReferenceOptimizer(
        ref.SGDRule(1.0), weights(variables), k, mode, THRESHOLDS[mode]
    )
    for scale in (2.0, 0.05):  # clipped, then (mostly) not
        for grads in micro_batches(rng, k, scale=scale):
            optimizer.apply(grads, variables)
            reference.apply(grads)
        assert_weights(variables, reference.weights, what=f"scale {scale}")
    assert reference.clipped_any


@pytest.mark.parametrize("mode", MODES)
def test_clip_micro_batches_clips_each_micro_batch(rng, mode):
    k = 3
    grads = micro_batches(rng, k, scale=2.0)
    variables = zero_variables()
    optimizer = kg.SGD(
        1.0,
        accumulation_steps=k,
        clip_micro_batches=True,
        jit_compile=False,
        **{mode: THRESHOLDS[mode]},
    )
    reference = ref.ReferenceOptimizer(
        ref.SGDRule(1.0),
        weights(variables),
        k,
        mode,
        THRESHOLDS[mode],
        clip_micro_batches=True,
    )
    for g in grads:
        optimizer.apply(g, variables)
        reference.apply(g)
    assert_weights(variables, reference.weights)
    # Guard: clipping the mean instead would have given other weights.
    mean_clipped = ref.ReferenceOptimizer(
        ref.SGDRule(1.0), weights(zero_variables()), k, mode, THRESHOLDS[mode]
    )
    for g in grads:
        mean_clipped.apply(g)
    assert (
        ref.global_norm(
            [a - b for a, b in zip(reference.weights, mean_clipped.weights)]
        )
        > 1e-2
    )


@pytest.mark.parametrize(
    "clip_micro_batches, expected",
    [(False, [-0.6, -0.8]), (True, [-0.5, -0.5])],
)
def test_clipping_the_mean_or_the_micro_batches_by_hand(
    clip_micro_batches, expected
):
    """K = 2, clipnorm = 1, micro-batches [6, 0] and [0, 8]: the mean
    [3, 4] clips to [0.6, 0.8]; clipped first, [1, 0] and [0, 1] average
    to [0.5, 0.5]."""
    variable = keras.Variable(np.zeros(2, "float32"))
    optimizer = kg.SGD(
        1.0,
        accumulation_steps=2,
        clipnorm=1.0,
        clip_micro_batches=clip_micro_batches,
        jit_compile=False,
    )
    for g in ([6.0, 0.0], [0.0, 8.0]):
        optimizer.apply([np.array(g, "float32")], [variable])
    np.testing.assert_allclose(variable.numpy(), expected, rtol=1e-6)
