"""Distributed training helpers: `model.fit` under MultiWorkerMirroredStrategy.

Keras 3's TensorFlow trainer cannot run `fit` or `evaluate` under
`tf.distribute.MultiWorkerMirroredStrategy` with more than one worker
(keras-team/keras#20585, tensorflow/tensorflow#72388). It fails in two
places:

1. Before building, `fit` reduces the first `(x, y)` batch across workers
   (`strategy.reduce("MEAN", batch)`), which this strategy rejects for a
   nested batch ("Attempt to convert a value (PerReplica:{...}) with an
   unsupported type").
2. Scalar logs returned by `train_step` are reduced along axis 0 ("Invalid
   reduction dimension 0 for input with 0 dimensions").

`enable_multi_worker_fit(model)` fixes both for one model, opt-in: the
model's `train_step` and `test_step` (Keras's public customisation points)
return their logs with shape [1], which Keras then reduces to the mean over
replicas; and the first-batch reduction, which no public hook reaches, is
skipped by handing Keras's build this worker's part of the batch (the build
needs only shapes and dtypes). That one private touch, and a check that
Keras still works the way it relies on, live in
`keras_gradtools/backends/private_api.py`; the rest of its TensorFlow, in
`keras_gradtools/backends/tf_multi_worker.py`.

This works for any optimizer, Keras's own included. On JAX, Keras's
maintainers recommend `keras.distribution` for many devices and hosts, which
`model.fit` supports directly (see the README).
"""

import os

import keras
import numpy as np

from keras_gradtools.backends import private_api

__all__ = [
    "enable_multi_worker_fit",
    "is_chief",
    "keras_fit_fails_under_multi_worker",
    "worker_path",
]

_ENABLED = "_keras_gradtools_multi_worker_fit"
# Substrings of the two failures of plain `fit` (module docstring).
KNOWN_FAILURES = (
    ("PerReplica", "unsupported type"),
    ("Invalid reduction dimension 0",),
)


def enable_multi_worker_fit(model: keras.Model) -> keras.Model:
    """Makes `model.fit`, `evaluate` and `predict` work under
    `tf.distribute.MultiWorkerMirroredStrategy` (TensorFlow backend).

    Call it on every worker, after `model.compile(...)`, for a model created
    and compiled inside `strategy.scope()`. It changes this model instance
    only; calling it twice is harmless. Feed every worker the same global
    data: Keras shards it, so `fit(x, y, batch_size=B)` trains on global
    batches of B samples, each worker computing B / workers of them (the
    same weights as one process on the same global batches). Use
    `shuffle=False`, or the same `keras.utils.set_random_seed` on every
    worker. Callbacks that write files need a path of their own per worker
    (`worker_path`) or to run on the chief only (`is_chief`);
    `GradientVarianceMonitor` writes from the chief by itself.

    Args:
        model: A compiled `keras.Model` created under
            `MultiWorkerMirroredStrategy().scope()`, with `jit_compile=False`
            (XLA compiles no collectives for CPUs) and
            `steps_per_execution=1` (Keras fails with more under any
            `tf.distribute` strategy).

    Returns:
        The same model.

    Raises:
        ValueError: if the model is not compiled, not under the strategy,
            or compiled with `jit_compile=True` on a host without GPUs or
            with `steps_per_execution > 1`.
        RuntimeError: if Keras's internals are not those this function was
            written against (then check `keras_fit_fails_under_multi_worker`:
            Keras may have fixed `fit`).

    Example:

    >>> strategy = tf.distribute.MultiWorkerMirroredStrategy()
    >>> with strategy.scope():
    ...     model = make_model()
    ...     model.compile(optimizer=keras_gradtools.Adam(accumulation_steps=4),
    ...                   loss="mse", jit_compile=False)
    >>> keras_gradtools.distribute.enable_multi_worker_fit(model)
    >>> model.fit(x, y, batch_size=64, validation_data=(xv, yv))
    """
    from keras_gradtools.backends import tf_multi_worker

    if getattr(model, _ENABLED, False):
        return model
    if not model.compiled:
        raise ValueError(
            "Call `model.compile(...)` before `enable_multi_worker_fit`."
        )
    strategy = model.distribute_strategy
    if not tf_multi_worker.is_multi_worker_mirrored(strategy):
        raise ValueError(
            "`enable_multi_worker_fit` is for a model created under "
            "`tf.distribute.MultiWorkerMirroredStrategy().scope()`; this "
            f"model's strategy is {type(strategy).__name__}."
        )
    if model.jit_compile and not tf_multi_worker.has_gpus():
        raise ValueError(
            "jit_compile=True cannot work under MultiWorkerMirroredStrategy "
            "on CPUs: XLA compiles no collectives for CPU devices "
            "('Collectives are not yet implemented for CPU devices when "
            "compiling with XLA'). Compile the model with "
            "`jit_compile=False`."
        )
    if model.steps_per_execution != 1:
        raise ValueError(
            "steps_per_execution > 1 fails under tf.distribute strategies in "
            f"Keras {keras.__version__} ('You must feed a value for "
            "placeholder tensor'), MirroredStrategy included. Compile with "
            "`steps_per_execution=1`."
        )
    private_api.check_multi_worker_fit_internals(model)
    private_api.skip_first_batch_reduction(model, strategy)
    model.train_step = tf_multi_worker.logs_with_shape_1(model.train_step)
    model.test_step = tf_multi_worker.logs_with_shape_1(model.test_step)
    model.make_train_function(force=True)
    model.make_test_function(force=True)
    object.__setattr__(model, _ENABLED, True)
    return model


def is_chief(strategy=None) -> bool:
    """Whether this process writes the job's shared outputs (TensorBoard,
    final checkpoints): the chief task, else worker 0, else the only
    process.

    Args:
        strategy: A `tf.distribute.Strategy`; defaults to the current one.
    """
    from keras_gradtools.backends import tf_multi_worker

    task = tf_multi_worker.task(strategy)
    if task is None:
        return True
    task_type, task_id, cluster = task
    if task_type == "chief":
        return True
    return task_type == "worker" and task_id == 0 and "chief" not in cluster


def worker_path(path, strategy=None) -> str:
    """`path/<task type>_<task id>`: a directory for this worker alone.

    Keras 3's `BackupAndRestore` and `ModelCheckpoint` save on every worker
    (saving reads distributed variables, so every worker must take part) and
    know nothing of multi-worker jobs: several processes writing one file
    corrupt it, and `BackupAndRestore` deletes its directory at the end.

    Args:
        path: A directory of the job.
        strategy: A `tf.distribute.Strategy`; defaults to the current one.
    """
    from keras_gradtools.backends import tf_multi_worker

    task = tf_multi_worker.task(strategy)
    if task is None:
        return os.path.join(path, "single")
    task_type, task_id, _ = task
    return os.path.join(path, f"{task_type}_{task_id}")


def keras_fit_fails_under_multi_worker(strategy) -> bool:
    """Whether plain `model.fit` under this MultiWorkerMirroredStrategy
    still fails in one of the two known ways (to notice when Keras fixes
    it). Call it on every worker at the same point: once fixed, the probe's
    `fit` communicates.

    Args:
        strategy: The job's `tf.distribute.MultiWorkerMirroredStrategy`.

    Returns:
        True if a one-step `fit` of a tiny model raised a known error,
        False if it trained.
    """
    from keras_gradtools.backends import tf_multi_worker

    with strategy.scope():
        probe = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
        probe.compile(
            optimizer=keras.optimizers.SGD(0.0), loss="mse", jit_compile=False
        )
    n = 2 * strategy.num_replicas_in_sync
    x = np.ones((n, 1), "float32")
    try:
        probe.fit(x, x, batch_size=n, epochs=1, verbose=0, shuffle=False)
    except tf_multi_worker.fit_errors() as error:
        message = str(error)
        if any(all(s in message for s in known) for known in KNOWN_FAILURES):
            return True
        raise
    return False
