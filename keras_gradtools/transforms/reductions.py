"""Reductions over gradients: sums, squared norms and the finite check.

Each is one pass over the tensors it reads. The step shares them: the
per-tensor squared norms of a gradient serve the finite check, per-tensor
and global-norm clipping and the gradient statistics alike, so that a
configuration using several of them still reduces each tensor once.
"""

from collections.abc import Sequence

from keras import ops

from keras_gradtools import backends
from keras_gradtools.backends.common import blocked_sum  # noqa: F401
from keras_gradtools.types import TensorLike


def flat_sum(tensor: TensorLike) -> TensorLike:
    """Returns `sum(tensor)`, in the form the backend sums fastest
    (`backends.flat_sum`: a matrix-vector product with ones on TensorFlow,
    a reduction over all axes on JAX)."""
    return backends.flat_sum(tensor)


def square_norms(tensors: Sequence[TensorLike]) -> list[TensorLike]:
    """Returns `[sum(t**2) for t in tensors]`, one float32 scalar each
    (summed as the backend sums squares fastest: `backends.square_sum`)."""
    return [backends.square_sum(t) for t in tensors]


def total(scalars: Sequence[TensorLike]) -> TensorLike:
    """Returns the sum of a list of scalars as one scalar."""
    return ops.sum(ops.stack(list(scalars)))


def global_norm(tensors: Sequence[TensorLike]) -> TensorLike:
    """Returns the L2 norm of all `tensors` taken together."""
    return ops.sqrt(total(square_norms(tensors)))


def norms_without_overflow(
    tensors: Sequence[TensorLike], square_norms: Sequence[TensorLike]
) -> list[TensorLike]:
    """Returns each tensor's L2 norm from its squared norm, without the
    overflow of `sum(t**2)` for finite elements beyond ~1.8e19.

    While every squared norm is finite (always, in practice) the norms are
    their square roots. Otherwise every tensor is divided by its largest
    magnitude before it is squared and summed, in one branch taken only
    then: a finite tensor keeps a finite norm (up to float32's maximum),
    and a tensor holding NaN or inf keeps a non-finite one.

    Args:
        tensors: The tensors.
        square_norms: Their squared L2 norms (`square_norms(tensors)`).

    Returns:
        A list of float32 scalars.
    """

    def plain():
        return [_sqrt_or_zero(s) for s in square_norms]

    def scaled():
        return scaled_norms(tensors, square_norms)

    return backends.cond(ops.isfinite(total(square_norms)), plain, scaled)


def scaled_norms(
    tensors: Sequence[TensorLike], square_norms: Sequence[TensorLike]
) -> list[TensorLike]:
    """The slow branch of `norms_without_overflow`: each tensor whose
    squared norm is not finite is divided by its largest magnitude before
    it is squared and summed."""
    return [
        ops.where(ops.isfinite(s), _sqrt_or_zero(s), _scaled_norm(t))
        for t, s in zip(tensors, square_norms)
    ]


def _sqrt_or_zero(square):
    # Two-sided where: the sqrt of a zero sum never reaches a gradient.
    nonzero = square > 0
    return ops.where(nonzero, ops.sqrt(ops.where(nonzero, square, 1.0)), square)


def flat_scaled_norm(tensors: Sequence[TensorLike]) -> TensorLike:
    """The L2 norm of all `tensors` together, divided by their largest
    magnitude before squaring (no overflow for finite elements; NaN or inf
    when an element is)."""
    flat = [ops.reshape(t, (-1,)) for t in tensors]
    return _scaled_norm(ops.concatenate(flat) if len(flat) > 1 else flat[0])


def _scaled_norm(tensor):
    flat = ops.reshape(tensor, (-1,))
    largest = ops.max(ops.abs(flat))
    safe = ops.where(
        ops.logical_and(largest > 0, ops.isfinite(largest)), largest, 1.0
    )
    return ops.multiply(safe, ops.sqrt(ops.sum(ops.square(flat / safe))))


def all_finite(
    tensors: Sequence[TensorLike],
    partial_sums: Sequence[TensorLike] | None = None,
) -> TensorLike:
    """Returns whether every element of every tensor is finite.

    A sum is non-finite whenever an element is, and XLA compiles a sum to
    one fast reduction where `all(isfinite(t))` materialises a boolean
    tensor first (measured 4x slower on CPU). Only a sum that overflows
    from finite elements takes the exact, slower check, over all tensors
    at once: one fused reduction of their concatenation, not one per
    tensor, whose hundreds of small kernels made XLA's compile of a real
    model's first step several times slower (`benchmarks/first_step.py`:
    80 s against 27 s for Adam K=4 on a 122-tensor MLP, TensorFlow).

    Args:
        tensors: The tensors to check.
        partial_sums: Optional per-tensor sums already computed by the step
            (e.g. its squared norms), which then make the check free: a
            squared norm is finite exactly when the tensor is, unless it
            overflows (elements beyond 1.8e19), when the exact check runs.

    Returns:
        A scalar boolean tensor.
    """
    if partial_sums is None:
        partial_sums = [flat_sum(t) for t in tensors]
    grand_total = total(partial_sums)

    def exact():
        flat = [ops.reshape(t, (-1,)) for t in tensors]
        if len(flat) > 1:
            flat = [ops.concatenate(flat)]
        return ops.all(ops.isfinite(flat[0]))

    return backends.cond(
        ops.isfinite(grand_total), lambda: ops.array(True), exact
    )
