"""Annealed Gaussian gradient noise (Neelakantan et al., 2015).

The variance schedule is `sigma_t**2 = eta / (1 + t) ** gamma`, with `t` the
number of updates already applied, so the first update uses `sigma**2 = eta`.
"""

import math
from collections.abc import Sequence

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


def gaussian_noise(
    shapes: Sequence[tuple[int, ...]],
    seed: TensorLike,
    step: TensorLike,
    wanted: Sequence[int] | None = None,
) -> list[TensorLike]:
    """Draws standard normal noise for a whole model at one update.

    The noise is a pure function of `(seed, step)` and each tensor's place
    among `shapes`: one Threefry stream per update over the concatenation of
    all the tensors (in build order), so replicas that share the seed draw
    the same noise, nothing but the update counter needs saving to resume
    the stream exactly, and a model of many small tensors costs one draw,
    not one per tensor (one block of integer operations to trace and
    compile, whatever the number of variables).

    Args:
        shapes: The shapes of all the model's tensors, in build order.
        seed: Integer scalar below 2**31 (tensor or int), the noise seed.
        step: Integer scalar tensor, the updates already applied.
        wanted: The indices into `shapes` to return noise for (default:
            all); the others' draws are made and left unused, so that every
            tensor's noise stays the same whichever are wanted.

    Returns:
        float32 tensors of i.i.d. N(0, 1) samples, shaped like
        `shapes[i]` for each `i` in `wanted`.
    """
    sizes = [math.prod(shape) for shape in shapes]
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    normals = standard_normal(sum(sizes), (seed, 0), step)
    if wanted is None:
        wanted = range(len(shapes))
    return [
        ops.reshape(
            normals[offsets[i] : offsets[i] + sizes[i]], tuple(shapes[i])
        )
        for i in wanted
    ]
