"""Small helpers every backend module shares."""

import contextlib

from keras import ops


def variable_path(variable) -> str:
    """A variable's path (`keras.Variable`) or name (`tf.Variable`)."""
    return getattr(variable, "path", None) or getattr(variable, "name", "?")


def outside_trace():
    """A context in which variable writes take effect now, even when called
    while a function is being traced: `tf.init_scope()` on TensorFlow (a
    write inside a `tf.function` trace would be a graph op of that trace,
    run only if the traced step is, and undone by nothing); on JAX, where
    building and restoring happen eagerly, no context is needed."""
    import keras

    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        return tf.init_scope()
    return contextlib.nullcontext()


def blocked_sum(flat, width: int = 1024):
    """Returns `sum(flat)` of a 1-D tensor as a matrix-vector product with
    ones over rows of `width` elements, plus the remainder.

    TensorFlow's XLA on CPU compiles a dot to an optimised library call
    but a reduction fused with an elementwise producer (`sum(t**2)`) to a
    slow scalar loop; this form reads the tensor at memory speed there.
    Exact in the products (`x * 1`); the order of additions differs from a
    plain sum by float32 rounding.
    """
    size = flat.shape[0]
    if size is None:
        # Unknown static length (e.g. the rows of a sparse gradient in a
        # traced step): a plain sum.
        return ops.sum(flat)
    rows = size // width
    if rows < 2:
        return ops.sum(flat)
    head = ops.reshape(flat[: rows * width], (rows, width))
    result = ops.sum(ops.matmul(head, ops.ones((width,), dtype=flat.dtype)))
    if rows * width < size:
        result = result + ops.sum(flat[rows * width :])
    return result
