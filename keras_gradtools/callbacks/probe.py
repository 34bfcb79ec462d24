"""Gradient statistics by probing: gradients of a few fixed batches at the
current weights, for any optimizer (Keras's own included) and for K = 1."""

import keras
import numpy as np
from keras import ops

from keras_gradtools import transforms
from keras_gradtools.backends import probe_moments


class GradientProbe:
    """Measures gradient statistics on fixed probe batches.

    The probe computes the gradient of the training loss on each of
    `batches` fixed batches at the current weights, in training mode (as
    `fit` does), and derives the statistics of docs/design.md §3 with the
    batches as the samples. It changes no weight, no optimizer state, no
    non-trainable variable (e.g. BatchNormalization statistics) and no
    metric: on JAX it runs statelessly, on TensorFlow everything it could
    touch is saved and put back.

    Args:
        model: A compiled `keras.Model`.
        data: A tuple `(x, y)` or `(x, y, sample_weight)` of arrays, split
            into `batches` batches of `batch_size` samples, or an iterable
            of such batches (e.g. a batched `tf.data.Dataset`).
        batches: Int >= 2, the number of probe batches.
        batch_size: The probe batch size for array data.
    """

    def __init__(self, model, data, batches, batch_size=None):
        self.model = model
        # Tensors once, not NumPy arrays converted (and matched against
        # the traced signatures) on every call.
        self.batches = [
            tuple(
                None
                if part is None
                else keras.tree.map_structure(ops.convert_to_tensor, part)
                for part in batch
            )
            for batch in _take_batches(data, batches, batch_size)
        ]
        first = keras.tree.flatten(self.batches[0][0])[0]
        self.batch_size = int(np.shape(first)[0])
        self._add_batch = probe_moments.moments_function(model)

    def measure(self):
        """Returns `(statistics, per_variable, sums)` at the current weights.

        `statistics`: dict of Python floats `variance`, `mean_norm_sq`,
        `noise_scale` (in probe batches), `snr`, `signal_resolved`,
        `grad_norm`. `per_variable`: dict of NumPy vectors
        `variable_variance`, `variable_mean_sq`. `sums`: the per-variable
        means and sums of squares (for histograms), the count of batches
        and the samples per batch (1).
        """
        variables = self.model.trainable_variables
        sums = [ops.zeros(v.shape, "float32") for v in variables]
        squares = list(sums)
        for x, y, sample_weight in self.batches:
            sums, squares = self._add_batch(x, y, sample_weight, sums, squares)
        count = float(len(self.batches))
        means = [ops.divide(s, count) for s in sums]
        mean_norms = transforms.square_norms(means)
        variances = [
            transforms.micro_batch_variance_from_sums(
                transforms.flat_sum(q), m, count
            )
            for q, m in zip(squares, mean_norms)
        ]
        stats = transforms.gradient_statistics_from_sums(
            transforms.total(variances), transforms.total(mean_norms), count
        )
        statistics = {k: float(v) for k, v in stats.items()}
        statistics["grad_norm"] = float(ops.sqrt(transforms.total(mean_norms)))
        per_variable = {
            "variable_variance": np.array([float(v) for v in variances]),
            "variable_mean_sq": np.array([float(m) for m in mean_norms]),
        }
        return statistics, per_variable, (means, squares, count, 1.0)


def _take_batches(data, batches, batch_size):
    if isinstance(data, (tuple, list)):
        if len(data) not in (2, 3):
            raise ValueError(
                "`probe_data` must be a tuple (x, y) or (x, y, sample_weight)"
                f" of arrays, or an iterable of batches. Received a "
                f"{type(data).__name__} of length {len(data)}."
            )
        return _split_arrays(data, batches, batch_size)
    taken = []
    for item in data:
        if len(taken) == batches:
            break
        taken.append(_unpack(item))
    if len(taken) < batches:
        raise ValueError(
            f"`probe_data` yielded {len(taken)} batches; probe_batches="
            f"{batches} are needed."
        )
    return taken


def _split_arrays(data, batches, batch_size):
    if batch_size is None:
        raise ValueError(
            "`probe_data` given as arrays needs a batch size: pass "
            "`batch_size` to GradientVarianceMonitor."
        )
    arrays = list(data) + [None] * (3 - len(data))
    size = len(keras.tree.flatten(arrays[0])[0])
    if size < batches * batch_size:
        raise ValueError(
            f"`probe_data` holds {size} samples, fewer than probe_batches"
            f" x batch_size = {batches} x {batch_size}."
        )
    taken = []
    for i in range(batches):
        part = slice(i * batch_size, (i + 1) * batch_size)
        taken.append(
            tuple(
                None
                if a is None
                else keras.tree.map_structure(
                    lambda t, p=part: np.asarray(t)[p], a
                )
                for a in arrays
            )
        )
    return taken


def _unpack(item):
    item = keras.tree.map_structure(np.asarray, item)
    if isinstance(item, (tuple, list)):
        item = tuple(item) + (None,) * (3 - len(item))
        return item[:3]
    return (item, None, None)
