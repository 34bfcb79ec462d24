"""Stage 2, the finite check (docs/design.md §1, local half step 4): a
micro-batch whose gradient (or count) holds a NaN or an infinity adds
nothing to the sums and does not count in n.

(a) `keras_gradtools.transforms.all_finite`; (b) the stage through
`optimizer.apply` (SGD at learning rate 1 moves by -g_bar), against the
float64 reference fed only the finite micro-batches.
"""

import keras
import numpy as np
import numpy_reference as ref
import pytest
from reference import SHAPES
from reference import assert_weights
from reference import micro_batches
from reference import weights
from reference import zero_variables

import keras_gradtools as kg
from keras_gradtools import transforms

BAD = [np.nan, np.inf, -np.inf]

# ----------------------------------------------------------------------
# (a) The pure function.


@pytest.mark.parametrize("bad", BAD)
@pytest.mark.parametrize("where", [(0, (0, 0)), (0, (2, 3)), (1, (4,))])
@pytest.mark.parametrize("given_norms", [False, True])
def test_all_finite_finds_one_bad_element_anywhere(
    rng, bad, where, given_norms
):
    tensors = [rng.normal(size=s).astype("float32") for s in SHAPES]
    norms = transforms.square_norms(tensors) if given_norms else None
    assert bool(transforms.all_finite(tensors, partial_sums=norms))
    tensor, index = where
    tensors[tensor][index] = bad
    norms = transforms.square_norms(tensors) if given_norms else None
    assert not bool(transforms.all_finite(tensors, partial_sums=norms))


def test_all_finite_accepts_finite_elements_whose_squares_overflow():
    """3e38 is finite in float32; its square (in the norms) is not."""
    big = [np.array([3e38, -3e38], "float32"), np.ones(2, "float32")]
    norms = transforms.square_norms(big)
    assert not np.isfinite(float(norms[0]))
    assert bool(transforms.all_finite(big))
    assert bool(transforms.all_finite(big, partial_sums=norms))


# ----------------------------------------------------------------------
# (b) Through the optimizer.


@pytest.mark.parametrize("bad", BAD)
@pytest.mark.parametrize("position", [0, 1, 2])
@pytest.mark.parametrize("tensor", [0, 1])
def test_a_nonfinite_micro_batch_is_left_out_of_the_mean(
    rng, bad, position, tensor
):
    """K = 3, one micro-batch (first, middle or last; a bad element in
    either variable) non-finite: the update is the mean of the other two,
    and the bad one is counted as skipped, not as a missing step."""
    k = 3
    grads = micro_batches(rng, k)
    grads[position][tensor].flat[1] = bad
    variables = zero_variables()
    optimizer = kg.SGD(1.0, accumulation_steps=k, jit_compile=False)
    reference = ref.ReferenceOptimizer(ref.SGDRule(1.0), weights(variables), 2)
    for i, g in enumerate(grads):
        optimizer.apply(g, variables)
        if i != position:
            reference.apply(g)
    assert reference.iterations == 1
    assert_weights(variables, reference.weights)
    assert int(optimizer.iterations) == 1
    assert int(optimizer.micro_steps) == 3
    assert int(optimizer.skipped_micro_batches) == 1


@pytest.mark.parametrize("count", [np.nan, np.inf])
def test_a_nonfinite_count_is_left_out_like_a_nonfinite_gradient(rng, count):
    counts = [2.0, count, 1.0]
    grads = micro_batches(rng, 3)
    variables = zero_variables()
    optimizer = kg.SGD(
        1.0, accumulation_steps=3, weighted_accumulation=True, jit_compile=False
    )
    reference = ref.ReferenceOptimizer(ref.SGDRule(1.0), weights(variables), 2)
    for g, c in zip(grads, counts):
        optimizer.apply(g, variables, count=c)
        if np.isfinite(c):
            reference.apply(g, count=c)
    assert reference.iterations == 1
    assert_weights(variables, reference.weights)
    assert int(optimizer.skipped_micro_batches) == 1


def test_skipped_micro_batches_count_across_cycles(rng):
    """K = 2 over three cycles with bad micro-batches at 1, 4 and 5 (the
    third cycle has none finite): 3 skipped, 2 updates."""
    variable = keras.Variable(np.zeros(2, "float32"))
    optimizer = kg.SGD(1.0, accumulation_steps=2, jit_compile=False)
    for i in range(6):
        g = np.array([1.0, -1.0], "float32")
        if i in (1, 4, 5):
            g[0] = np.nan
        optimizer.apply([g], [variable])
    assert int(optimizer.skipped_micro_batches) == 3
    assert int(optimizer.micro_steps) == 6
    assert int(optimizer.iterations) == 2
    np.testing.assert_array_equal(variable.numpy(), [-2.0, 2.0])


def test_on_nonfinite_apply_does_not_check():
    """Keras's behaviour: the NaN reaches the mean and the weights."""
    variable = keras.Variable(np.zeros(2, "float32"))
    optimizer = kg.SGD(
        1.0, accumulation_steps=2, on_nonfinite="apply", jit_compile=False
    )
    optimizer.apply([np.array([np.nan, 1.0], "float32")], [variable])
    optimizer.apply([np.array([1.0, 3.0], "float32")], [variable])
    assert np.isnan(variable.numpy()[0])
    assert variable.numpy()[1] == -2.0
    assert int(optimizer.skipped_micro_batches) == 0
