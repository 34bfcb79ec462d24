"""Accumulation that equals one big batch when micro-batches differ
(docs/design.md §7).

Keras averages each micro-batch's loss over what that micro-batch holds:
its valid tokens under a padding mask, its own number of samples (a ragged
last batch), or the sum of its sample weights (`"mean_with_sample_weight"`).
Summing K such gradients and dividing by K is then a mean of means, not the
mean of the big batch. `exact_accumulation(model)` has every training step
hand the optimizer the count its loss was averaged over, and the optimizer
(`weighted_accumulation=True`) weighs each micro-batch by it: `G = sum n_i
g_i`, update from `G / sum n_i`, which is the big batch's gradient.
"""

from collections.abc import Callable
from typing import Any

import keras
from keras import ops

from keras_gradtools import micro_batch_counts
from keras_gradtools.backends import private_api

__all__ = ["exact_accumulation", "loss_count"]

_ENABLED = "_keras_gradtools_exact_accumulation"
_MEAN_REDUCTIONS = ("mean", "sum_over_batch_size", "mean_with_sample_weight")

CountFunction = Callable[[Any, Any, Any, Any], Any]


def loss_count(
    loss: Any,
    y_true: Any,
    y_pred: Any,
    sample_weight: Any = None,
) -> Any:
    """Returns what a Keras loss averages over for one batch (float32).

    The rules are Keras's own (`keras.losses.Loss`): with a mask on
    `y_pred` (e.g. from `Embedding(mask_zero=True)`) and the reductions
    `"sum_over_batch_size"` or `"mean"`, the number of valid entries; with
    `"mean_with_sample_weight"`, the sum of the sample weights (times the
    mask); otherwise the number of loss values (samples, or samples times
    time steps). Reductions that do not divide (`"sum"`, `"none"`) count 1
    per batch: their micro-batches weigh equally, as in Keras.

    Args:
        loss: A `keras.losses.Loss`, a loss function or its name.
        y_true: The targets of the batch.
        y_pred: The predictions (with their Keras mask, if any).
        sample_weight: Optional sample weights.

    Returns:
        A scalar float32 tensor.

    Example:

    >>> y_pred = keras.layers.Embedding(5, 3, mask_zero=True)(
    ...     np.array([[1, 2, 0]]))
    >>> float(loss_count("mse", np.zeros((1, 3, 3)), y_pred))
    2.0
    """
    loss = keras.losses.get(loss)
    reduction = getattr(loss, "reduction", "sum_over_batch_size")
    if reduction not in _MEAN_REDUCTIONS:
        return ops.ones((), "float32")
    mask = private_api.keras_mask(y_pred)
    if mask is not None:
        mask = ops.cast(mask, "float32")
    if reduction == "mean_with_sample_weight" and sample_weight is not None:
        weights = ops.cast(ops.convert_to_tensor(sample_weight), "float32")
        if mask is not None:
            weights = ops.multiply(_to_rank(weights, len(mask.shape)), mask)
        return ops.sum(weights)
    if mask is not None:
        return ops.sum(mask)
    return _values_size(loss, y_true, y_pred)


def _to_rank(tensor, rank):
    while len(tensor.shape) < rank:
        tensor = ops.expand_dims(tensor, -1)
    return tensor


def _values_size(loss, y_true, y_pred):
    """The number of loss values `loss` reduces for this batch: its static
    shape, with unknown dimensions read from `y_pred` (the values, never
    used, are pruned from the graph)."""
    call = loss.call if isinstance(loss, keras.losses.Loss) else loss
    values = call(y_true, y_pred)
    if len(values.shape) == 0:
        # Keras returns a scalar loss as it is: nothing to divide by.
        return ops.ones((), "float32")
    dynamic = ops.shape(y_pred)
    size = ops.ones((), "float32")
    for axis, dim in enumerate(values.shape):
        if dim is None:
            dim = dynamic[axis]
        size = ops.multiply(size, ops.cast(dim, "float32"))
    return size


def exact_accumulation(
    model: keras.Model, count_fn: CountFunction | None = None
) -> keras.Model:
    """Makes accumulated micro-batches give exactly one big batch's update.

    Call it after `model.compile(...)` with a `keras_gradtools` optimizer
    (not built yet: before the first `fit`, or before loading saved state).
    Each training step then passes the optimizer the count its loss was
    averaged over (`loss_count`, or `count_fn`), and the optimizer weighs
    each micro-batch by it (`weighted_accumulation=True`, which this sets).
    That makes K micro-batches equal one batch of all their samples when
    they differ: padded sequences with unequal valid tokens, a ragged last
    batch, sample weights under `"mean_with_sample_weight"`. A micro-batch
    of only padding adds nothing. It changes this model instance only;
    calling it twice is harmless.

    Works on TensorFlow (one device, `MirroredStrategy` and
    `MultiWorkerMirroredStrategy`: each replica's count goes with its
    gradient, summed in the same all-reduce) and on JAX (one device and
    `keras.distribution`, where the count is global).

    Args:
        model: A compiled `keras.Model`.
        count_fn: Optional `count_fn(x, y, y_pred, sample_weight)` returning
            the scalar count of a batch. Defaults to `loss_count` of the
            compiled loss; required for models compiled with several
            losses (their counts may differ: say which one weighs).

    Returns:
        The same model.

    Raises:
        ValueError: if the model is not compiled, its optimizer is not a
            `keras_gradtools` optimizer or is built already without
            `weighted_accumulation`, or it has several losses and no
            `count_fn`.

    Example:

    >>> model.compile(optimizer=keras_gradtools.Adam(accumulation_steps=4),
    ...               loss="sparse_categorical_crossentropy")
    >>> keras_gradtools.exact_accumulation(model)
    >>> model.fit(padded_token_ids, targets, batch_size=8)
    """
    from keras_gradtools.optimizers import GradientPipelineOptimizer

    if getattr(model, _ENABLED, False):
        return model
    if not model.compiled:
        raise ValueError(
            "Call `model.compile(...)` before `exact_accumulation(model)`."
        )
    optimizer = model.optimizer
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        # Mixed float16: Keras wraps ours; the wrapper hands the unscaled
        # gradients to ours within the same step.
        optimizer = optimizer.inner_optimizer
    if not isinstance(optimizer, GradientPipelineOptimizer):
        raise ValueError(
            "`exact_accumulation` needs a keras_gradtools optimizer "
            "(`keras_gradtools.SGD`, `Adam`, `AdamW` or `wrap(...)`); this "
            f"model's is {type(optimizer).__name__}."
        )
    if optimizer.built and not optimizer.weighted_accumulation:
        raise ValueError(
            "This optimizer is built already without "
            "`weighted_accumulation`: call `exact_accumulation(model)` right "
            "after `compile`, before training or loading weights, or create "
            "the optimizer with `weighted_accumulation=True`."
        )
    if count_fn is None:
        loss = _single_loss(model.loss)

        def count_fn(x, y, y_pred, sample_weight):
            return loss_count(loss, y, y_pred, sample_weight)

    optimizer.weighted_accumulation = True
    compute_loss = model.compute_loss
    train_step = model.train_step

    def counting_compute_loss(*args, **kwargs):
        arguments = _loss_arguments(args, kwargs)
        if arguments["training"]:
            micro_batch_counts.offer(
                count_fn(
                    arguments["x"],
                    arguments["y"],
                    arguments["y_pred"],
                    arguments["sample_weight"],
                )
            )
        return compute_loss(*args, **kwargs)

    def counted_train_step(*args, **kwargs):
        with micro_batch_counts.open_step():
            return train_step(*args, **kwargs)

    # Keras's public customisation points, replaced on this instance.
    model.compute_loss = counting_compute_loss
    model.train_step = counted_train_step
    # Made anew by the next `fit` (on JAX, building it now would record the
    # state's shardings before the optimizer is built).
    model.train_function = None
    object.__setattr__(model, _ENABLED, True)
    return model


_LOSS_ARGUMENTS = ("x", "y", "y_pred", "sample_weight", "training")


def _loss_arguments(args, kwargs):
    """`compute_loss`'s arguments by name (Keras passes them by position or
    by keyword)."""
    arguments = dict(zip(_LOSS_ARGUMENTS, args))
    arguments.update(kwargs)
    for name in _LOSS_ARGUMENTS:
        arguments.setdefault(name, True if name == "training" else None)
    return arguments


def _single_loss(loss):
    """The one loss of a model compiled with one (possibly in a list or a
    dict of one)."""
    if isinstance(loss, dict):
        loss = list(loss.values())
    if isinstance(loss, (list, tuple)):
        losses = [item for item in loss if item is not None]
        if len(losses) != 1:
            raise ValueError(
                "`exact_accumulation` without `count_fn` needs a model "
                f"compiled with one loss; this one has {len(losses)}. Pass "
                "`count_fn(x, y, y_pred, sample_weight)` returning the "
                "count that should weigh each micro-batch."
            )
        loss = losses[0]
    if loss is None:
        raise ValueError(
            "`exact_accumulation` without `count_fn` needs a model compiled "
            "with a `loss` (this one overrides `compute_loss`?): pass "
            "`count_fn(x, y, y_pred, sample_weight)`."
        )
    return loss
