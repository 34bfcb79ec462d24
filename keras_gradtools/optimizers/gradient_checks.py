"""What `apply` does to the gradients it is given before the pipeline:
input checks, densifying, the finite check, and the single-replica guard."""

from keras import backend
from keras import ops

from keras_gradtools import transforms


def check_single_replica():
    """Refuses data-parallel training until it is supported.

    Without a cross-replica reduction each replica would apply its own
    gradient and the replicas' weights would silently drift apart.
    """
    if backend.backend() != "tensorflow":
        return
    import tensorflow as tf

    replicas = tf.distribute.get_strategy().num_replicas_in_sync
    if replicas > 1:
        raise NotImplementedError(
            f"keras_gradtools optimizers do not support tf.distribute with "
            f"more than one replica yet (this strategy has {replicas}): the "
            "gradients would not be reduced across replicas. Train on one "
            "device, or use a Keras optimizer, until distribution support "
            "lands (see docs/distribute_findings.md)."
        )


def executing_eagerly():
    if backend.backend() != "tensorflow":
        return False
    import tensorflow as tf

    return tf.executing_eagerly()


def dense(grad):
    if backend.backend() == "tensorflow":
        import tensorflow as tf

        if isinstance(grad, tf.IndexedSlices):
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
    total = ops.sum(ops.stack([transforms.flat_sum(g) for g in grads]))

    def exact():
        flags = [ops.all(ops.isfinite(g)) for g in grads]
        return ops.all(ops.stack(flags))

    return ops.cond(ops.isfinite(total), lambda: ops.array(True), exact)
