"""Counter-based Gaussian random numbers in plain `keras.ops`.

Threefry-2x32 with 20 rounds (Salmon et al., "Parallel random numbers: as
easy as 1, 2, 3", SC 2011; the generator JAX uses) turns a 64-bit key and a
64-bit counter into 64 random bits with integer adds, rotations and xors.
The Box-Muller transform turns each 64 bits into two standard normals.

Why not `tf.random.stateless_normal`: its Philox path costs about 20x the
threefry path under XLA on CPU, and TensorFlow's threefry has no kernel
outside XLA, so one stream could not serve both compiled and uncompiled
updates. Written in `keras.ops`, the same numbers (to float32 rounding of
log/sin/cos) come out eagerly, in a `tf.function`, under XLA, and on other
Keras backends.
"""

import math

from keras import ops

_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_KEY_PARITY = 0x1BD11BDA


def _rotate_left(x, bits):
    return ops.bitwise_or(
        ops.left_shift(x, bits), ops.right_shift(x, 32 - bits)
    )


def threefry2x32(key, counter):
    """The Threefry-2x32-20 block function on uint32 tensors.

    Args:
        key: A pair `(k0, k1)` of uint32 scalars or tensors.
        counter: A pair `(c0, c1)` of uint32 tensors (broadcastable).

    Returns:
        A pair of uint32 tensors: 64 pseudo-random bits per counter.
    """
    k0, k1 = (ops.cast(k, "uint32") for k in key)
    parity = ops.cast(_KEY_PARITY, "uint32")
    schedule = (k0, k1, ops.bitwise_xor(ops.bitwise_xor(k0, k1), parity))
    x0 = ops.add(ops.cast(counter[0], "uint32"), schedule[0])
    x1 = ops.add(ops.cast(counter[1], "uint32"), schedule[1])
    for block in range(5):
        for bits in _ROTATIONS[block % 2]:
            x0 = ops.add(x0, x1)
            x1 = ops.bitwise_xor(x0, _rotate_left(x1, bits))
        x0 = ops.add(x0, schedule[(block + 1) % 3])
        injection = ops.cast(block + 1, "uint32")
        x1 = ops.add(ops.add(x1, schedule[(block + 2) % 3]), injection)
    return x0, x1


def standard_normal(count, key, stream):
    """Returns `count` i.i.d. N(0, 1) float32 samples.

    Element `i` comes from counter `(i // 2, stream)` under `key`, so
    distinct `(key, stream)` pairs give independent blocks.

    Args:
        count: Python int, the number of samples.
        key: A pair of uint32 scalars.
        stream: uint32 scalar, e.g. the update step.

    Returns:
        A float32 tensor of shape `(count,)`. Uniforms carry 24 bits, so
        |z| <= 5.77: the tails beyond that (probability 8e-9) are cut.
    """
    pairs = (count + 1) // 2
    position = ops.cast(ops.arange(pairs, dtype="int32"), "uint32")
    stream = ops.add(ops.zeros((pairs,), "uint32"), ops.cast(stream, "uint32"))
    bits0, bits1 = threefry2x32(key, (position, stream))
    scale = 2.0**-24
    u1 = (ops.cast(ops.right_shift(bits0, 8), "float32") + 1.0) * scale
    u2 = ops.cast(ops.right_shift(bits1, 8), "float32") * scale
    radius = ops.sqrt(-2.0 * ops.log(u1))
    angle = (2.0 * math.pi) * u2
    samples = ops.concatenate(
        [radius * ops.cos(angle), radius * ops.sin(angle)]
    )
    return samples[:count]
