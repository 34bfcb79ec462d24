"""Sparse gradients (`tf.IndexedSlices`, e.g. from `Embedding`), accumulated
row by row.

An embedding's gradient touches only the rows of the ids looked up in the
micro-batch. Scattering it into the sums moves those rows only, where
densifying it first would write the whole table on every micro-batch. Rows
repeated within a micro-batch are summed first, so that the sum of squares
receives the square of each row's gradient. The update itself (once per
cycle) reads the dense sums, so its result equals the dense computation;
noise, when on, reaches every row of the table, touched or not.
"""

import tensorflow as tf

from keras_gradtools.optimizers.control_flow import run_if


def map_values(grad, fn):
    """`fn` applied to the values of an `IndexedSlices`."""
    return tf.IndexedSlices(fn(grad.values), grad.indices, grad.dense_shape)


def deduplicate(grad):
    """Sums the rows of `grad` that share an index."""
    unique, position = tf.unique(grad.indices)
    values = tf.math.unsorted_segment_sum(
        grad.values, position, tf.shape(unique)[0]
    )
    return tf.IndexedSlices(values, unique, grad.dense_shape)


def restart_or_scatter_add(accumulator, values, indices, finite, first):
    """`accumulator = (0 if first else accumulator)` plus `values` at
    `indices`, leaving out non-finite values."""
    run_if(first, lambda: accumulator.assign(tf.zeros_like(accumulator)))
    if finite is not None:
        values = tf.where(finite, values, tf.zeros_like(values))
    accumulator.value.scatter_add(tf.IndexedSlices(values, indices))
