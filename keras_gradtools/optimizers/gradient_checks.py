"""What `apply` does to the gradients it is given before the pipeline:
input checks, densifying and the finite check."""

import contextlib

from keras import backend
from keras import ops

from keras_gradtools import transforms


def executing_eagerly():
    if backend.backend() != "tensorflow":
        return False
    import tensorflow as tf

    return tf.executing_eagerly()


def dense(grad):
    """`grad` as a dense tensor (an `IndexedSlices` is scattered out)."""
    if is_sparse(grad):
        import tensorflow as tf

        return tf.convert_to_tensor(grad)
    return grad


def check_gradient_matches(grad, variable):
    grad_shape = tuple(getattr(grad, "shape", ()))
    var_shape = tuple(variable.shape)
    compatible = len(grad_shape) == len(var_shape) and all(
        g is None or v is None or g == v for g, v in zip(grad_shape, var_shape)
    )
    path = getattr(variable, "path", getattr(variable, "name", "?"))
    if not compatible:
        raise ValueError(
            f"The gradient for variable '{path}' has shape {grad_shape}, but "
            f"the variable has shape {var_shape}."
        )
    dtype = backend.standardize_dtype(grad.dtype)
    if not dtype.startswith(("float", "bfloat")):
        raise ValueError(
            f"The gradient for variable '{path}' has dtype {dtype}; "
            "gradients must be floating point."
        )


def all_finite(grads):
    """Whether every gradient element is finite.

    A sum is non-finite whenever an element is, and XLA compiles a sum to
    one fast reduction where `all(isfinite(g))` materialises a boolean
    tensor first (measured 4x slower on CPU). Only a sum that overflows
    from finite elements (beyond 3e38) takes the exact, slower check.
    """
    grads = [_values(g) for g in grads]
    total = ops.sum(ops.stack([transforms.flat_sum(g) for g in grads]))

    def exact():
        flags = [ops.all(ops.isfinite(g)) for g in grads]
        return ops.all(ops.stack(flags))

    return ops.cond(ops.isfinite(total), lambda: ops.array(True), exact)


def raise_if_nonfinite(grads, variables, micro_step):
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
    if executing_eagerly():
        bad = [
            getattr(v, "path", v.name)
            for g, v in zip(grads, variables)
            if not bool(ops.all(ops.isfinite(_values(g))))
        ]
        if bad:
            raise FloatingPointError(
                f"on_nonfinite='raise': the gradient of micro-batch "
                f"{int(micro_step)} holds NaN or inf for {bad}; nothing was "
                "applied."
            )
        return contextlib.nullcontext()
    if in_xla_context():
        raise ValueError(
            "on_nonfinite='raise' cannot raise inside an XLA-compiled step: "
            "XLA drops assertions. Compile the model with jit_compile=False "
            "(or call apply eagerly), or use on_nonfinite='skip'."
        )
    import tensorflow as tf

    check = tf.debugging.Assert(
        all_finite(grads),
        [
            "on_nonfinite='raise': non-finite gradient at micro-batch",
            micro_step,
        ],
    )
    return tf.control_dependencies([check])


def in_xla_context():
    """Whether the graph being traced will be compiled by XLA.

    The one private TensorFlow call of the package: TensorFlow has no
    public way to ask this.
    """
    import tensorflow as tf
    from tensorflow.python.ops import control_flow_util

    return control_flow_util.GraphOrParentsInXlaContext(
        tf.compat.v1.get_default_graph()
    )


def is_sparse(grad):
    """Whether `grad` is a `tf.IndexedSlices` (checked by name, so that
    other backends need not import TensorFlow)."""
    return type(grad).__name__ == "IndexedSlices"


def _values(grad):
    """The dense values of a gradient (the rows of an `IndexedSlices`)."""
    return grad.values if is_sparse(grad) else grad
