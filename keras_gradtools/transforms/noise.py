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
    if wanted is None:
        wanted = range(len(shapes))
    if len(shapes) == 1:
        normals = standard_normal(sizes[0], (seed, 0), step)
        return [ops.reshape(normals, tuple(shapes[0])) for _ in wanted]
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    normals, starts = _drawn_once(
        sum(sizes), seed, step, [offsets[i] for i in wanted]
    )
    return [
        ops.reshape(ops.slice(normals, (start,), (sizes[i],)), shapes[i])
        for i, start in zip(wanted, starts)
    ]


def _drawn_once(count, seed, step, offsets):
    """`standard_normal(count, (seed, 0), step)` in a buffer of its own,
    and `offsets` as values known only at run time.

    XLA compiles each distinct kernel separately. Left to itself, it fuses
    the whole generator into the reader of every variable's slice of the
    draw, and a slice at a constant offset makes each reader a distinct
    kernel (`benchmarks/compiled_kernels.py`: 146 distinct kernels for 60
    tensors, against 36 now). Here one loop, whose trip count XLA cannot
    see (the seed's top bit, always zero, plus one), draws once and passes
    the offsets through an exclusive-or with that zero: the draw stays one
    kernel, and the variables' readers, which slice at run-time offsets,
    are one kernel per shape.
    """

    # The seed and step travel through the loop too: a value the body
    # captured from outside may be a constant (eagerly, JAX still compiles
    # the loop), and XLA would then fold `standard_normal`'s run-time zero
    # and fuse its multiply-adds, changing the last bit.
    def opaque(value):
        zero = ops.right_shift(ops.cast(value[0], "uint32"), 31)
        return tuple(
            ops.bitwise_xor(part, ops.cast(zero, part.dtype)) for part in value
        )

    def body(i, carry):
        del i
        _, (seed, step), offsets = carry
        return (
            standard_normal(count, (seed, 0), step),
            opaque((seed, step)),
            tuple(opaque((seed,) + offsets)[1:]),
        )

    seed = ops.convert_to_tensor(seed, "int32")
    initial = (
        ops.zeros((count,), "float32"),
        (seed, ops.convert_to_tensor(step, "int32")),
        tuple(ops.convert_to_tensor(o, "int32") for o in offsets),
    )
    once = ops.add(
        ops.cast(ops.right_shift(ops.cast(seed, "uint32"), 31), "int32"), 1
    )
    normals, _, starts = ops.fori_loop(0, once, body, initial)
    return normals, starts
