"""The channel that carries a micro-batch's count from the loss that
averaged over it to the optimizer's `apply` (docs/design.md §7).

Keras's `train_step` calls `compute_loss` and then `optimizer.apply` (or,
on JAX, `stateless_apply`) with no room for another argument.
`exact_accumulation(model)` therefore has the loss offer its count here and
the optimizer take it, on the same thread (one per replica under
`tf.distribute.MirroredStrategy`) and within the same training step: the
wrapped `train_step` opens the channel and closes it, so nothing offered by
one step (or by `evaluate`) reaches another.
"""

import contextlib
import threading

_local = threading.local()


def _pending():
    return getattr(_local, "pending", None)


@contextlib.contextmanager
def offered(count):
    """Offers `count` to the next `take` on this thread, inside the block
    (nothing is offered when `count` is `None`)."""
    previous = _pending()
    if count is not None:
        _local.pending = [count]
    try:
        yield
    finally:
        _local.pending = previous


@contextlib.contextmanager
def open_step():
    """A training step: what `offer` leaves inside it is taken by the
    step's `apply`, or dropped when the step ends."""
    previous = _pending()
    _local.pending = []
    try:
        yield
    finally:
        _local.pending = previous


def offer(count):
    """Leaves `count` for this step's `apply` (ignored outside a step)."""
    pending = _pending()
    if pending is not None:
        pending[:] = [count]


def take():
    """Returns the count offered on this thread (once), or `None`."""
    pending = _pending()
    if not pending:
        return None
    return pending.pop()
