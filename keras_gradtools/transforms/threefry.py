"""Counter-based Gaussian random numbers in plain `keras.ops`.

Threefry-2x32 with 20 rounds (Salmon et al., "Parallel random numbers: as
easy as 1, 2, 3", SC 2011; the generator JAX uses) turns a 64-bit key and a
64-bit counter into 64 random bits with integer adds, rotations and xors.
Each 32 bits become one standard normal by inverse transform sampling,
`sqrt(2) * erfinv(2u - 1)`: per sample this is about 3x cheaper under XLA
than Box-Muller, whose log, sqrt and sin/cos XLA recomputed for each half
of the pair.

Why not `tf.random.stateless_normal`: its Philox path costs about 20x the
threefry path under XLA on CPU, and TensorFlow's threefry has no kernel
outside XLA, so one stream could not serve both compiled and uncompiled
updates. Written in `keras.ops`, the same numbers (to float32 rounding of
log/sin/cos) come out eagerly, in a `tf.function`, under XLA, and on other
Keras backends.
"""

import math

from keras import ops

from keras_gradtools.types import TensorLike

_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_KEY_PARITY = 0x1BD11BDA


def _rotate_left(x, bits):
    return ops.bitwise_or(
        ops.left_shift(x, bits), ops.right_shift(x, 32 - bits)
    )


def threefry2x32(
    key: tuple[TensorLike, TensorLike], counter: tuple[TensorLike, TensorLike]
) -> tuple[TensorLike, TensorLike]:
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


def random_words(
    count: int, key: tuple[TensorLike, TensorLike], stream: TensorLike
) -> TensorLike:
    """Returns `count` pseudo-random uint32 words.

    Counter `(i, stream)` under `key` gives two words: the first becomes
    word `i`, the second word `pairs + i` (`pairs = ceil(count / 2)`), so
    distinct `(key, stream)` pairs give independent blocks. Halves rather
    than interleaved pairs: XLA then writes each word where it is produced
    instead of shuffling the two words together.

    Args:
        count: Python int, the number of words.
        key: A pair of uint32 scalars.
        stream: uint32 scalar, e.g. the update step.

    Returns:
        A uint32 tensor of shape `(count,)`.
    """
    pairs = (count + 1) // 2
    position = ops.cast(ops.arange(pairs, dtype="int32"), "uint32")
    stream = ops.add(ops.zeros((pairs,), "uint32"), ops.cast(stream, "uint32"))
    return ops.concatenate(threefry2x32(key, (position, stream)))[:count]


def standard_normal(
    count: int, key: tuple[TensorLike, TensorLike], stream: TensorLike
) -> TensorLike:
    """Returns `count` i.i.d. N(0, 1) float32 samples: sample `i` is
    `normal_from_bits` of word `i` of `random_words(count, key, stream)`.

    Args:
        count: Python int, the number of samples.
        key: A pair of uint32 scalars; `key[0]` below 2**31 (the optimizer's
            seeds are), see `normal_from_bits`.
        stream: uint32 scalar, e.g. the update step.

    Returns:
        A float32 tensor of shape `(count,)`.
    """
    # Zero, but a runtime value the compiler cannot prove zero (the seed is
    # below 2**31): see `_rounded`.
    zero = ops.right_shift(ops.cast(key[0], "uint32"), 31)
    return normal_from_bits(random_words(count, key, stream), zero)


def normal_from_bits(bits: TensorLike, zero: TensorLike = None) -> TensorLike:
    """Maps uint32 random words to N(0, 1) samples by inverse transform:
    `z = sqrt(2) * erfinv(x)` of `x = open_uniform(bits)`, so |z| <= 5.3
    (tails beyond: p = 1e-7).

    Every operation is one IEEE float32 operation (or exact), so the
    samples are bitwise the same on every backend, eagerly and compiled:
    the logarithm is computed here rather than by the backend (whose
    implementations differ in the last bit), and `zero` keeps XLA from
    fusing a multiply and an add into one FMA (which rounds once instead of
    twice).

    Args:
        bits: uint32 random words.
        zero: A uint32 zero that the compiler cannot constant-fold (a value
            known only at run time); `None` for a literal zero (then a
            compiler that contracts multiply-adds, such as JAX's XLA, may
            round the last bit differently).
    """
    if zero is None:
        zero = ops.zeros((), "uint32")
    # Rounded first: TensorFlow's graph optimizer would otherwise fold the
    # constant into erfinv's last product.
    return _rounded(erfinv(open_uniform(bits), zero), zero) * math.sqrt(2.0)


def open_uniform(bits: TensorLike) -> TensorLike:
    """Maps uint32 random words to float32 uniform on (-1, 1).

    The top 23 bits `b` give `x = (b + 0.5) / 2**22 - 1`, exact in float32
    and never +-1 (24 bits would round the largest value to 1, whose
    erfinv is infinite).
    """
    top = ops.cast(ops.right_shift(bits, 9), "float32")
    return (top + 0.5) * 2.0**-22 - 1.0


def _rounded(x: TensorLike, zero: TensorLike) -> TensorLike:
    """`x`, a product, rounded to float32 where it stands.

    An add that follows a multiply may be fused by the compiler into one
    fused multiply-add, which rounds once where the separate operations
    round twice (JAX's XLA does so inside fused loops), and a product by a
    constant may be re-associated with the next one (TensorFlow's graph
    optimizer does). Or-ing the product's bits with a run-time zero is a
    no-op the compilers cannot see through, so each product is rounded on
    its own everywhere.
    """
    return ops.view(ops.bitwise_or(ops.view(x, "uint32"), zero), "float32")


def _horner(coefficients, x, zero):
    result = coefficients[0]
    for coefficient in coefficients[1:]:
        result = _rounded(result * x, zero) + coefficient
    return result


# log(m) = 2 atanh(s), s = (m - 1) / (m + 1), for m in [sqrt(1/2), sqrt(2)):
# 2s (1 + s**2/3 + s**4/5 + ...), |s| <= 0.1716; the terms kept reach
# float32 precision (the next, s**12 / 13, is below 2e-9 relative).
_LOG_SERIES = (1 / 11, 1 / 9, 1 / 7, 1 / 5, 1 / 3)
# ln 2 as a sum: the first part has 12 significant bits, so its product
# with an exponent of a float32 is exact.
_LN2_HIGH = 0.693145751953125
_LN2_LOW = 1.428606765330187e-06


def log(x: TensorLike, zero: TensorLike) -> TensorLike:
    """The natural logarithm of positive normal float32 `x`, from IEEE
    operations only (bitwise the same on every backend; within 2 ulp).

    Args:
        x: float32 tensor, every element positive and normal.
        zero: A run-time uint32 zero (see `_rounded`).
    """
    bits = ops.view(x, "uint32")
    exponent = ops.cast(ops.right_shift(bits, 23), "int32") - 127
    fraction = ops.bitwise_and(bits, ops.cast(0x007FFFFF, "uint32"))
    mantissa = ops.view(
        ops.bitwise_or(fraction, ops.cast(0x3F800000, "uint32")), "float32"
    )
    large = mantissa > math.sqrt(2.0)
    mantissa = ops.where(large, mantissa * 0.5, mantissa)
    exponent = ops.cast(exponent + ops.cast(large, "int32"), "float32")
    s = (mantissa - 1.0) / (mantissa + 1.0)
    z = _rounded(s * s, zero)
    twice_s = s + s
    series = _rounded(
        _rounded(twice_s * z, zero) * _horner(_LOG_SERIES, z, zero), zero
    )
    low = _rounded(exponent * _LN2_LOW, zero) + (twice_s + series)
    return exponent * _LN2_HIGH + low


# M. Giles, "Approximating the erfinv function", GPU Computing Gems (2011):
# single-precision polynomials in w = -log(1 - x**2), one for w < 5 and one
# in sqrt(w) for the tails.
_CENTRAL = (
    2.81022636e-08,
    3.43273939e-07,
    -3.5233877e-06,
    -4.39150654e-06,
    0.00021858087,
    -0.00125372503,
    -0.00417768164,
    0.246640727,
    1.50140941,
)
_TAIL = (
    -0.000200214257,
    0.000100950558,
    0.00134934322,
    -0.00367342844,
    0.00573950773,
    -0.0076224613,
    0.00943887047,
    1.00167406,
    2.83297682,
)


def erfinv(x: TensorLike, zero: TensorLike = None) -> TensorLike:
    """The inverse error function on the open interval (-1, 1), float32.

    Giles's approximation, within 4e-7 of the exact value for the inputs
    `normal_from_bits` makes (tested against `scipy.special.erfinv`). It is
    the polynomial XLA's own `erfinv` evaluates, written out in `keras.ops`
    so that it fuses into the noise (measured 1.5x cheaper than
    `ops.erfinv` under XLA on CPU, which also handles x = +-1, an input
    that never occurs here) and rounds the same on every backend.

    Args:
        x: float32 tensor with every element strictly inside (-1, 1).
        zero: A run-time uint32 zero (see `_rounded`), or `None`.

    Returns:
        `erfinv(x)`, same shape.
    """
    if zero is None:
        zero = ops.zeros((), "uint32")
    # Both branches from t = sqrt(w), w = t * t: with one intermediate
    # that two expressions read, XLA keeps one array where it kept w and
    # sqrt(w) apart (measured 13% cheaper noise). (1 - x) and (1 + x) are
    # exact for the inputs `open_uniform` makes.
    t = ops.sqrt(ops.negative(log(ops.multiply(1.0 - x, 1.0 + x), zero)))
    central = _horner(_CENTRAL, _rounded(t * t, zero) - 2.5, zero)
    tail = _horner(_TAIL, t - 3.0, zero)
    return ops.multiply(ops.where(t < math.sqrt(5.0), central, tail), x)
