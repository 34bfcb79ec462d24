"""TensorFlow's row-sparse gradients (`tf.IndexedSlices`): the operation
`keras_gradtools.transforms.sparse` needs TensorFlow for.
Imported only when such a gradient is met, i.e. on the TensorFlow backend."""

import tensorflow as tf


def with_values(gradient, values):
    """An `IndexedSlices` with `gradient`'s indices and shape and the rows
    `values`."""
    return tf.IndexedSlices(values, gradient.indices, gradient.dense_shape)
