"""Row-sparse gradients (`tf.IndexedSlices`, e.g. from `Embedding` on the
TensorFlow backend), accumulated row by row.

An embedding's gradient touches only the rows of the ids looked up in the
micro-batch. Scattering it into the sums moves those rows only, where
densifying it first would write the whole table on every micro-batch. Rows
repeated within a micro-batch are summed first, so that the sum of squares
receives the square of each row's gradient. Only the TensorFlow backend
produces such gradients; TensorFlow is imported when one is met (its part
lives in `keras_gradtools/backends/tf_sparse.py`).

On JAX, sparse gradients (`jax.experimental.sparse.BCOO`, `BCSR`) are not
handled here: the JAX backend's `densify` turns them dense before anything
else reads them, so the update equals that of the dense gradient.
"""

from keras_gradtools.types import TensorLike


def is_sparse(gradient: TensorLike) -> bool:
    """Whether `gradient` is a `tf.IndexedSlices` (checked by name, so that
    other backends need not import TensorFlow). JAX's sparse arrays are not:
    they are densified on arrival."""
    return type(gradient).__name__ == "IndexedSlices"


def values_of(gradient: TensorLike) -> TensorLike:
    """The dense values of a gradient: the rows of an `IndexedSlices`, or
    the gradient itself."""
    return gradient.values if is_sparse(gradient) else gradient


def map_values(gradient: TensorLike, fn) -> TensorLike:
    """`fn(gradient)`, or `fn` applied to the rows of an `IndexedSlices`."""
    if not is_sparse(gradient):
        return fn(gradient)
    from keras_gradtools.backends import tf_sparse

    return tf_sparse.with_values(gradient, fn(gradient.values))
