"""What `keras_gradtools.distribute` needs from `tf.distribute`: the
strategy and devices `enable_multi_worker_fit` checks, the logs it reshapes
for Keras's reduction across replicas, this process's task in the cluster,
and the errors of a failing `fit`. Imported by those functions only, so
that JAX never imports TensorFlow."""

import keras
import numpy as np
import tensorflow as tf


def is_multi_worker_mirrored(strategy) -> bool:
    """Whether `strategy` is a `tf.distribute.MultiWorkerMirroredStrategy`."""
    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)


def has_gpus() -> bool:
    """Whether TensorFlow sees a GPU."""
    return bool(tf.config.list_logical_devices("GPU"))


def logs_with_shape_1(step):
    """Wraps a `train_step`/`test_step` so that scalar logs have shape [1]:
    Keras reduces them across replicas along axis 0, to their mean."""

    def with_shape_1(value):
        if isinstance(value, (int, float, np.number)) or (
            tf.is_tensor(value) and value.shape.rank == 0
        ):
            return tf.reshape(value, [1])
        return value

    def wrapped(data):
        return keras.tree.map_structure(with_shape_1, step(data))

    return wrapped


def task(strategy=None):
    """`(task type, task id, cluster spec as a dict)` of this process under
    `strategy` (default: the current one), or `None` outside a cluster."""
    strategy = strategy or tf.distribute.get_strategy()
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None:
        return None
    cluster = resolver.cluster_spec().as_dict()
    if not cluster:
        return None
    return resolver.task_type, resolver.task_id, cluster


def fit_errors() -> tuple:
    """The exception types a failing `fit` raises under a strategy."""
    return (ValueError, TypeError, tf.errors.InvalidArgumentError)
