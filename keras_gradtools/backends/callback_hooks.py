"""What the callbacks need from the backend's `fit`: the batch size it
feeds, who writes summaries, and fresh optimizer state mid-epoch."""

import keras


def record_batch_size(model):
    """Notes the largest batch `fit` feeds `model` (the batch size; a last,
    smaller batch does not count), and returns a function reading it.

    The model's `train_step` is wrapped once per model and the step retraced
    (so later fits reuse it). On JAX the batch is a static shape, noted when
    the step is traced; on TensorFlow a variable written in the step (the
    last batch of an epoch may have an unknown size). Under a
    `tf.distribute` strategy each replica sees 1/R of the batch.
    """
    seen = getattr(model, "_keras_gradtools_batch_size", None)
    if seen is None:
        original = model.train_step
        if keras.backend.backend() == "jax":
            seen = _StaticBatchSize(original)
        else:
            seen = _InGraphBatchSize(original)
        # object.__setattr__: neither is model state to track or save.
        object.__setattr__(model, "_keras_gradtools_batch_size", seen)
        object.__setattr__(model, "train_step", seen.train_step)
        model.make_train_function(force=True)
    return seen.read


class _StaticBatchSize:
    def __init__(self, original):
        self.largest = 0

        def train_step(state, data):
            x = data[0] if isinstance(data, (tuple, list)) else data
            size = keras.tree.flatten(x)[0].shape[0]
            if size is not None:
                self.largest = max(self.largest, int(size))
            return original(state, data)

        self.train_step = train_step

    def read(self):
        return self.largest


class _InGraphBatchSize:
    def __init__(self, original):
        import tensorflow as tf

        self.variable = tf.Variable(0, dtype=tf.int32, trainable=False)

        def train_step(data):
            replicas = tf.distribute.get_strategy().num_replicas_in_sync
            x = data[0] if isinstance(data, (tuple, list)) else data
            size = tf.shape(tf.nest.flatten(x)[0])[0] * replicas
            self.variable.assign(tf.maximum(self.variable, size))
            return original(data)

        self.train_step = train_step

    def read(self):
        return int(self.variable.numpy())


def writes_summaries(model):
    """Whether this process writes summaries: the chief of a multi-worker
    `tf.distribute` strategy, process 0 of a multi-process JAX run."""
    if keras.backend.backend() == "jax":
        import jax

        return jax.process_index() == 0
    return model.distribute_strategy.extended.should_save_summary


def sync_state(model):
    """Makes the model's and optimizer's variables current in the middle of
    an epoch (JAX's `fit` keeps the state apart until the epoch ends)."""
    sync = getattr(model, "jax_state_sync", None)
    if sync is not None:
        sync()
