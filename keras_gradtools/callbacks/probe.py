"""Gradient statistics by probing: gradients of a few fixed batches at the
current weights, for any optimizer (Keras's own included) and for K = 1."""

import numpy as np
import tensorflow as tf
from keras import ops

from keras_gradtools import transforms


class GradientProbe:
    """Measures gradient statistics on fixed probe batches.

    The probe computes the gradient of the training loss on each of
    `batches` fixed batches at the current weights, in training mode (as
    `fit` does), and derives the statistics of DESIGN.md §3 with the
    batches as the samples. It changes no weight, no optimizer state, no
    non-trainable variable (e.g. BatchNormalization statistics) and no
    metric: everything it could touch is saved and put back.

    Args:
        model: A compiled `keras.Model`.
        data: A batched `tf.data.Dataset`, or a tuple `(x, y)` (or
            `(x, y, sample_weight)`) of arrays split into `batches` batches
            of `batch_size` samples.
        batches: Int >= 2, the number of probe batches.
        batch_size: The probe batch size for array data.
    """

    def __init__(self, model, data, batches, batch_size=None):
        self.model = model
        self.batches = _take_batches(data, batches, batch_size)
        self.batch_size = int(
            tf.shape(tf.nest.flatten(self.batches[0][0])[0])[0]
        )
        self._gradients = tf.function(self._gradient_of_batch)

    def _gradient_of_batch(self, x, y, sample_weight):
        model = self.model
        with tf.GradientTape() as tape:
            y_pred = model(x, training=True)
            loss = model._compute_loss(
                x=x,
                y=y,
                y_pred=y_pred,
                sample_weight=sample_weight,
                training=True,
            )
        return tape.gradient(loss, model.trainable_variables)

    def measure(self):
        """Returns `(statistics, per_variable, sums)` at the current weights.

        `statistics`: dict of Python floats `variance`, `mean_norm_sq`,
        `noise_scale` (in probe batches), `snr`, `grad_norm`.
        `per_variable`: dict of NumPy vectors `variable_variance`,
        `variable_mean_sq`. `sums`: the per-variable mean and mean square
        (for histograms).
        """
        state = (
            self.model.non_trainable_variables + self.model.metrics_variables
        )
        saved = [ops.copy(v) for v in state]
        sums, squares = None, None
        try:
            for x, y, sample_weight in self.batches:
                grads = [
                    tf.zeros(v.shape, "float32")
                    if g is None
                    else tf.cast(tf.convert_to_tensor(g), "float32")
                    for g, v in zip(
                        self._gradients(x, y, sample_weight),
                        self.model.trainable_variables,
                    )
                ]
                if sums is None:
                    sums, squares = grads, [g * g for g in grads]
                else:
                    sums = [a + g for a, g in zip(sums, grads)]
                    squares = [a + g * g for a, g in zip(squares, grads)]
        finally:
            for variable, value in zip(state, saved):
                variable.assign(value)
        count = float(len(self.batches))
        means = [s / count for s in sums]
        mean_squares = [q / count for q in squares]
        parts = [
            transforms.variance_and_square_norm(g, q, count)
            for g, q in zip(means, mean_squares)
        ]
        variance = float(sum(float(p[0]) for p in parts))
        norm_sq = float(sum(float(p[1]) for p in parts))
        stats = transforms.gradient_statistics_from_sums(
            variance, norm_sq, count
        )
        statistics = {k: float(v) for k, v in stats.items()}
        statistics["grad_norm"] = float(np.sqrt(norm_sq))
        per_variable = {
            "variable_variance": np.array([float(p[0]) for p in parts]),
            "variable_mean_sq": np.array([float(p[1]) for p in parts]),
        }
        return statistics, per_variable, (means, mean_squares, count, 1)


def _take_batches(data, batches, batch_size):
    if isinstance(data, tf.data.Dataset):
        taken = [_unpack(item) for item in data.take(batches)]
    else:
        if not isinstance(data, (tuple, list)) or len(data) not in (2, 3):
            raise ValueError(
                "`probe_data` must be a batched tf.data.Dataset or a tuple "
                f"(x, y) or (x, y, sample_weight). Received: {type(data)}"
            )
        if batch_size is None:
            raise ValueError(
                "`probe_data` given as arrays needs a batch size: pass "
                "`batch_size` to GradientVarianceMonitor."
            )
        arrays = list(data) + [None] * (3 - len(data))
        size = len(tf.nest.flatten(arrays[0])[0])
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
                    else tf.nest.map_structure(lambda t, p=part: t[p], a)
                    for a in arrays
                )
            )
    if len(taken) < batches:
        raise ValueError(
            f"`probe_data` yielded {len(taken)} batches; probe_batches="
            f"{batches} are needed."
        )
    return taken


def _unpack(item):
    if isinstance(item, (tuple, list)):
        item = tuple(item) + (None,) * (3 - len(item))
        return item[:3]
    return (item, None, None)
