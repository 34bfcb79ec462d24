"""The pure maths of `keras_gradtools.transforms` shared by several stages
(reductions, block sums, sparse rows), against float64 NumPy, on whichever
backend the suite runs. Each stage's own functions are tested in its module
under tests/stages/."""

import numpy as np
import numpy_reference as ref
import pytest
from keras import ops

from keras_gradtools import transforms


def _np(x):
    return np.asarray(ops.convert_to_numpy(x), np.float64)


@pytest.fixture
def tensors(rng):
    return [rng.normal(size=s).astype("float32") for s in ((3, 4), (5,))]


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
