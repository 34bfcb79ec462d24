"""Annealed Gaussian gradient noise (Neelakantan et al., 2015).

The variance schedule is `sigma_t**2 = eta / (1 + t) ** gamma`, with `t` the
number of updates already applied, so the first update uses `sigma**2 = eta`.
"""

import math

from keras import ops

from keras_gradtools.transforms.threefry import standard_normal
from keras_gradtools.types import TensorLike


def noise_std(eta: float, gamma: float, step: TensorLike) -> TensorLike:
    """Returns the standard deviation `sigma_t` of the injected noise.

    Args:
        eta: Float, the noise variance at the first update (`t = 0`).
        gamma: Float, the annealing exponent.
        step: Scalar tensor or number, the updates already applied.

    Returns:
        A float32 scalar tensor `sqrt(eta / (1 + step) ** gamma)`.

    Example:

    >>> float(noise_std(0.3, 0.55, 0))  # sqrt(0.3)
    0.547722...
    """
    t = ops.cast(step, "float32")
    return ops.sqrt(eta / ops.power(1.0 + t, gamma))


def gaussian_noise_like(
    reference: TensorLike,
    seed: TensorLike,
    tensor_index: int,
    step: TensorLike,
) -> TensorLike:
    """Draws standard normal noise shaped like `reference` (float32).

    The noise is a pure function of `(seed, tensor_index, step)`: one
    Threefry key per (seed, tensor) and one counter stream per update, so
    every tensor at every update gets an independent block, replicas that
    share the seed draw the same noise, and nothing but the update counter
    needs to be saved to resume the stream exactly.

    Args:
        reference: A tensor with a fully defined shape.
        seed: Integer scalar (tensor or int), the optimizer's noise seed.
        tensor_index: Python int, the variable's index in the optimizer.
        step: Integer scalar tensor, the updates already applied.

    Returns:
        A float32 tensor of i.i.d. N(0, 1) samples, shaped like `reference`.
    """
    shape = tuple(reference.shape)
    count = math.prod(shape)
    key = (seed, tensor_index)
    return ops.reshape(standard_normal(count, key, step), shape)
