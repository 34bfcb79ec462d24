"""What the stage modules share: float64 views of tensors and the runs that
feed an optimizer and the float64 reference (tests/numpy_reference.py) the
same micro-batches.

The optimizers here are plain SGD at learning rate 1 without momentum
unless a test says otherwise: an update then moves the weights by exactly
-g_tilde, the gradient the stage under test produced, so that a stage's
output is read off the weights through the public API alone.
"""

import keras
import numpy as np
from keras import ops

SHAPES = [(3, 4), (5,)]


def f64(x):
    """A tensor (of either backend) or array as float64 NumPy."""
    return np.asarray(ops.convert_to_numpy(x), np.float64)


def weights(variables):
    return [f64(v.value) for v in variables]


def zero_variables(shapes=SHAPES):
    return [keras.Variable(np.zeros(s, "float32")) for s in shapes]


def micro_batches(rng, k, shapes=SHAPES, scale=1.0):
    """K float32 micro-batch gradients around a shared mean, so that the
    within-cycle variance is neither zero nor dominant."""
    means = [scale * rng.normal(size=s) for s in shapes]
    return [
        [
            (m + 0.6 * scale * rng.normal(size=m.shape)).astype("float32")
            for m in means
        ]
        for _ in range(k)
    ]


def assert_weights(variables, expected, rtol=1e-6, atol=1e-6, what=""):
    for j, (a, e) in enumerate(zip(weights(variables), expected)):
        np.testing.assert_allclose(
            a, e, rtol=rtol, atol=atol, err_msg=f"{what} variable {j}"
        )
