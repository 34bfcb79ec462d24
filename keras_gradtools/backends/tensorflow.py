"""The TensorFlow backend: branching without copies, compiled eager calls,
graph assertions and row-sparse accumulation.

Why `run_if` is not `ops.cond`: under XLA a conditional returns every
variable that either branch writes, and the branch that leaves them alone
copies them. Measured on CPU with 4M float32 parameters (Adam, K=4), the
accumulating micro-step of a `cond` costs 5.8 ms against 1.2 ms for the
bare `G += g` it needs: the copies of weights and both moments dominate. A
`while_loop` that runs its body zero times or once threads the same
variables through its loop state in place, so the skipped path moves no
bytes.
"""

import contextlib

import tensorflow as tf
from keras import ops

from keras_gradtools import transforms
from keras_gradtools.backends import common
from keras_gradtools.backends import private_api
from keras_gradtools.transforms import sparse


def cond(predicate, true_fn, false_fn):
    """`ops.cond` (eager TensorFlow runs only the taken branch)."""
    return ops.cond(predicate, true_fn, false_fn)


def flat_sum(tensor):
    """`sum(tensor)` as a matrix-vector product with ones: TensorFlow's XLA
    on CPU compiles a dot to a library call that reads at memory speed,
    and reductions to slower loops (`benchmarks/xla_pieces.py`)."""
    return common.blocked_sum(ops.reshape(tensor, (-1,)))


def square_sum(tensor):
    """`sum(tensor**2)` as a matrix-vector product with ones: TensorFlow's
    XLA on CPU compiles `sum(t**2)` to a slow fused loop (measured 4.3x
    slower at 4M parameters) and a dot to a library call."""
    return common.blocked_sum(ops.square(ops.reshape(tensor, (-1,))))


def not_for_autograph(function):
    """`function`, marked so that AutoGraph does not convert it (nor what it
    calls) when a user's `tf.function` calls it: the pipeline has no Python
    control flow on tensors (it branches with `run_if`), and converting it
    made tracing a custom training step 5-10x slower."""
    return tf.autograph.experimental.do_not_convert(function)


def run_if(predicate, fn, state=None):
    """Calls `fn()` (which updates variables and returns nothing) only when
    the scalar boolean tensor `predicate` is true.

    Works eagerly, inside `tf.function`, and inside an XLA cluster, where it
    compiles to a loop of at most one trip instead of a conditional.

    Args:
        predicate: A scalar boolean tensor.
        fn: A function of no arguments whose effect is variable updates.
        state: Unused here (JAX threads the variables `fn` touches).
    """
    del state
    trips = tf.cast(predicate, tf.int32)

    def body(i):
        fn()
        return (i + 1,)

    tf.while_loop(
        lambda i: i < trips,
        body,
        (tf.constant(0, tf.int32),),
        maximum_iterations=1,
    )


def after(check, fn):
    """`fn()`, run after the graph assertion `check`."""
    with tf.control_dependencies([check]):
        return fn()


def executing_eagerly():
    return tf.executing_eagerly()


def nonfinite_guard(grads, variables, micro_step):
    """`on_nonfinite="raise"`: fails before anything is written.

    Returns a context manager to run the update in: in a graph, it makes
    every op of the update wait for the assertion.

    Eagerly, the check runs on the host and names the variables whose
    gradient holds a NaN or an infinity. In a graph, a `tf.debugging.Assert`
    fails the step. XLA drops assertions, so inside an XLA-compiled step
    (`jit_compile=True`, Keras's default for `fit`) the mode cannot work and
    this raises a `ValueError` when the step is traced.

    Raises:
        FloatingPointError: eagerly, for a non-finite gradient.
        ValueError: when traced inside an XLA-compiled function.
    """
    if tf.executing_eagerly():
        _raise_if_nonfinite_now(grads, variables, micro_step)
        return contextlib.nullcontext()
    if private_api.in_xla_context():
        raise ValueError(
            "on_nonfinite='raise' cannot raise inside an XLA-compiled step: "
            "XLA drops assertions. Compile the model with jit_compile=False "
            "(or call apply eagerly), or use on_nonfinite='skip'."
        )
    values = [sparse.values_of(g) for g in grads]
    check = tf.debugging.Assert(
        transforms.all_finite(values),
        [
            "on_nonfinite='raise': non-finite gradient at micro-batch",
            micro_step,
        ],
    )
    return tf.control_dependencies([check])


def _raise_if_nonfinite_now(grads, variables, micro_step):
    bad = [
        common.variable_path(v)
        for g, v in zip(grads, variables)
        if not bool(ops.all(ops.isfinite(sparse.values_of(g))))
    ]
    if bad:
        raise FloatingPointError(
            f"on_nonfinite='raise': the gradient of micro-batch "
            f"{int(micro_step)} holds NaN or inf for {bad}; nothing was "
            "applied."
        )


def assert_in_graph(condition, message, *values):
    """A graph assertion on `condition`; eagerly and under XLA (which drops
    assertions) returns `None` and the caller must fall back."""
    if tf.executing_eagerly() or private_api.in_xla_context():
        return None
    return tf.debugging.Assert(condition, [message, *values])


def densify(gradient):
    """`gradient` as a dense tensor (an `IndexedSlices` is scattered out)."""
    if sparse.is_sparse(gradient):
        return tf.convert_to_tensor(gradient)
    return gradient


def restart_or_scatter_add(accumulator, values, indices, first, finite=None):
    """`accumulator = (0 if first else accumulator)` plus `values` at the
    rows `indices`, leaving out non-finite values: only the touched rows
    move (and the whole sum once per cycle, when it restarts)."""
    variable = getattr(accumulator, "value", accumulator)
    run_if(first, lambda: variable.assign(tf.zeros_like(variable)))
    if finite is not None:
        values = tf.where(finite, values, tf.zeros_like(values))
    variable.scatter_add(tf.IndexedSlices(values, indices))


def zero_if(predicate, variables):
    """Zeroes `variables` when `predicate` holds (moving nothing else)."""

    def zero():
        for variable in variables:
            variable.assign(ops.zeros_like(variable))

    run_if(predicate, zero)
