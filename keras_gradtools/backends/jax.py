"""The JAX backend: the pipeline run statelessly, branching with `lax.cond`.

On JAX every Keras variable update inside a traced function goes through a
`keras.StatelessScope`: `model.fit` calls `optimizer.stateless_apply`
inside its jitted step, and a user's own `jax.jit` loop does the same. The
pipeline is written with `self.assign`, so it runs unchanged inside such a
scope; only the branch "update on the last micro-batch of a cycle" needs
care, because a `lax.cond` branch is a function of its inputs and may not
write to an outer scope. `run_if` therefore threads the values of the
variables the update reads and writes through the branch: the taken branch
runs the update in a scope of its own and returns the new values, the
skipped branch returns its inputs. With the step's buffers donated, the
skipped branch copies nothing (docs/design.md §5: 7.4 ms per micro-batch against
a 4.4 ms floor at 16.8M parameters; selecting with `where`, as optax's
`MultiSteps` and Keras's own accumulation do, costs 44.6 ms).

How the pipeline is run on JAX (in place, or as one compiled function)
is `jax_apply.py`; this module holds the operations the pipeline's stages
use.
"""

import contextlib

import jax
import jax.experimental.sparse as jax_sparse
import keras
import numpy as np
from keras import ops

from keras_gradtools.backends import common


def run_if(predicate, fn, state):
    """Calls `fn()` (which updates variables) only when the scalar boolean
    `predicate` holds.

    Args:
        predicate: A scalar boolean tensor.
        fn: A function of no arguments whose effect is variable updates.
        state: Every `keras.Variable` that `fn` reads or writes.
    """
    if not isinstance(predicate, jax.core.Tracer):
        # Eager (jit_compile=False): the branch is known; a `lax.cond` here
        # would be compiled anew on every call.
        if bool(predicate):
            fn()
        return
    state = list(state)
    values = [v.value for v in state]

    def taken(values):
        with keras.StatelessScope(
            state_mapping=list(zip(state, values))
        ) as scope:
            fn()
        return [
            current_value(scope, variable, value)
            for variable, value in zip(state, values)
        ]

    def skipped(values):
        return list(values)

    new_values = jax.lax.cond(predicate, taken, skipped, values)
    for variable, value in zip(state, new_values):
        variable.assign(value)


def not_for_autograph(function):
    """`function` itself: JAX has no AutoGraph (see the TensorFlow
    backend's)."""
    return function


def cond(predicate, true_fn, false_fn):
    """`ops.cond`, branching in Python when `predicate` is concrete: a
    `lax.cond` called eagerly traces and compiles both branches anew on
    every call (its functions are new closures each time)."""
    if not isinstance(predicate, jax.core.Tracer):
        return true_fn() if bool(predicate) else false_fn()
    return ops.cond(predicate, true_fn, false_fn)


def flat_sum(tensor):
    """`sum(tensor)` over all axes, in the layout XLA gave the tensor.

    Not over a flat view: on ResNet50 (`benchmarks/real_models.py`),
    reshaping every convolution's gradient to 1-D for the finite check
    made the first step take 110 s instead of 15 s and peak at 3.1 GB
    instead of 2.0 GB (what XLA does with those reshapes was not
    analysed)."""
    return ops.sum(tensor)


def square_sum(tensor):
    """`sum(tensor**2)` over a flat view: JAX's XLA fuses the square into
    one vectorised reduction (measured as fast as a plain sum)."""
    return ops.sum(ops.square(ops.reshape(tensor, (-1,))))


def current_value(scope, variable, default):
    """The value `scope` holds for `variable`, or `default` if it wrote
    none."""
    value = scope.get_current_value(variable)
    return default if value is None else value


def nonfinite_guard(grads, variables, micro_step):
    """`on_nonfinite="raise"`: fails before anything is written.

    With concrete gradients (an eager `apply`, or `fit` with
    `run_eagerly=True` / `jit_compile=False`), the check runs on the host
    and names the variables. Inside `jax.jit` nothing can raise from the
    step (an error inside a jitted step would also lose its donated
    buffers), so the mode is refused when traced.

    Raises:
        FloatingPointError: for a non-finite concrete gradient.
        ValueError: when traced inside `jax.jit`.
    """
    if any(isinstance(g, jax.core.Tracer) for g in grads):
        raise ValueError(
            "on_nonfinite='raise' cannot raise inside a jax.jit-compiled "
            "step. Compile the model with jit_compile=False (or "
            "run_eagerly=True), call apply outside jax.jit, or use "
            "on_nonfinite='skip'."
        )
    bad = [
        common.variable_path(v)
        for g, v in zip(grads, variables)
        if not bool(np.all(np.isfinite(np.asarray(g))))
    ]
    if bad:
        raise FloatingPointError(
            f"on_nonfinite='raise': the gradient of micro-batch "
            f"{int(micro_step)} holds NaN or inf for {bad}; nothing was "
            "applied."
        )
    return contextlib.nullcontext()


def assert_in_graph(condition, message, *values):
    """JAX has no graph assertions: returns `None` (callers fall back)."""
    del condition, message, values
    return None


def densify(gradient):
    """Returns `gradient` as a dense array.

    A `jax.experimental.sparse` gradient (`BCOO`, `BCSR`, which Keras's
    optimizers accept on JAX) is densified: the pipeline reduces, clips and
    accumulates dense arrays, and the update then equals that of the same
    gradient given dense. This works inside `jax.jit` too (a sparse array
    is a pytree of its data and indices). Dense gradients are returned as
    they are.

    Args:
        gradient: A dense array or a `jax.experimental.sparse.JAXSparse`.

    Returns:
        A dense array of the gradient's shape and dtype.
    """
    if isinstance(gradient, jax_sparse.JAXSparse):
        return gradient.todense()
    return gradient


def zero_if(predicate, variables):
    """Zeroes `variables` when `predicate` holds."""
    for variable in variables:
        value = ops.convert_to_tensor(variable)
        variable.assign(ops.where(predicate, ops.zeros_like(value), value))
