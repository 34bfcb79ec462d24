"""TensorFlow's row-sparse gradients (`tf.IndexedSlices`): the two
operations `keras_gradtools.transforms.sparse` needs TensorFlow for.
Imported only when such a gradient is met, i.e. on the TensorFlow backend."""

import tensorflow as tf
from keras import ops


def deduplicate_rows(values, indices):
    """Sums the rows of `values` that share an index; returns
    `(summed_values, unique_indices)`."""
    unique, position = tf.unique(indices)
    summed = ops.segment_sum(values, position, num_segments=tf.size(unique))
    return summed, unique


def with_values(gradient, values):
    """An `IndexedSlices` with `gradient`'s indices and shape and the rows
    `values`."""
    return tf.IndexedSlices(values, gradient.indices, gradient.dense_shape)
