"""The backend seam: what TensorFlow and JAX each add to the pipeline.

The pipeline (`keras_gradtools.optimizers.cycle`) is written once in
`keras.ops`. A backend module decides only how it is entered and how it
branches:

- `run_if(predicate, fn, state)`: run a block of variable updates only on
  the last micro-batch of a cycle, without copying what it does not touch
  (TensorFlow: a loop of zero or one trips; JAX: `lax.cond` over the
  state, threaded through a `keras.StatelessScope`).
- `cond(predicate, true_fn, false_fn)`: `ops.cond` that, on JAX called
  eagerly, branches in Python (a `lax.cond` outside `jax.jit` compiles
  both branches anew on every call).
- `flat_sum(tensor)`, `square_sum(tensor)`: `sum(tensor)` and
  `sum(tensor**2)` in the form the backend's XLA compiles to one fast
  pass.
- `apply(optimizer, grads, variables)`: run one micro-batch, compiled when
  called eagerly (`tf.function(jit_compile=True)` / `jax.jit`), or traced
  into the caller's step; under a `tf.distribute` strategy the replica and
  cross-replica halves live in `tf_distribute.py`.

Only the module of the active backend is imported: `import keras_gradtools`
on JAX imports no TensorFlow. Every private Keras or TensorFlow API the
package uses is in `private_api.py`.
"""

import importlib

import keras

SUPPORTED_BACKENDS = ("tensorflow", "jax")


def check_supported() -> None:
    """Raises an `ImportError` naming the supported backends when Keras
    runs on another one."""
    name = keras.backend.backend()
    if name not in SUPPORTED_BACKENDS:
        raise ImportError(
            f"keras_gradtools supports the Keras backends "
            f"{' and '.join(SUPPORTED_BACKENDS)}; Keras is running on "
            f"'{name}'. Set KERAS_BACKEND=tensorflow or KERAS_BACKEND=jax "
            "before importing Keras."
        )


def current():
    """Returns the module of the active backend (`tensorflow` or `jax`)."""
    check_supported()
    return importlib.import_module(
        f"keras_gradtools.backends.{keras.backend.backend()}"
    )


def runner():
    """Returns the module that runs the pipeline on the active backend
    (`tensorflow_apply` or `jax_apply`): its `apply(pipeline, grads,
    indices, weight, state_variables)`."""
    check_supported()
    return importlib.import_module(
        f"keras_gradtools.backends.{keras.backend.backend()}_apply"
    )


def cond(predicate, true_fn, false_fn):
    """`keras.ops.cond`, without recompiling on every eager call on JAX.

    Args:
        predicate: A scalar boolean tensor.
        true_fn: A function of no arguments, taken when `predicate` holds.
        false_fn: A function of no arguments, taken otherwise.

    Returns:
        What the taken function returns.
    """
    return current().cond(predicate, true_fn, false_fn)


def flat_sum(tensor):
    """Returns `sum(tensor)` as one scalar, in the form the active backend
    compiles fastest.

    Args:
        tensor: A tensor of any shape.

    Returns:
        A scalar tensor.
    """
    return current().flat_sum(tensor)


def square_sum(tensor):
    """Returns `sum(tensor**2)` as one float32 scalar, in the form the
    active backend compiles fastest.

    Args:
        tensor: A float32 tensor of any shape.

    Returns:
        A scalar tensor.
    """
    return current().square_sum(tensor)
