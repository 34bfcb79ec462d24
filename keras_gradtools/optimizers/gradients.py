"""What `apply` does to the gradients before the pipeline sees them: match
them to the variables (building the optimizer on the first call), drop the
empty ones as Keras does, check shapes and dtypes, unscale a scaled loss
and densify the sparse gradients that are not accumulated row by row."""

import keras
from keras import backend

from keras_gradtools.backends import common
from keras_gradtools.backends import private_api
from keras_gradtools.transforms import sparse


def prepare(optimizer, pipeline, grads, trainable_variables):
    """Returns `(grads, variables, indices)` ready for `pipeline`: the
    gradients, their variables, and the variables' indices in build order.

    Args:
        optimizer: A `GradientPipelineOptimizer` (built here if it is not).
        pipeline: The optimizer's `Pipeline`.
        grads: One gradient (or `None`) per variable.
        trainable_variables: The variables, or `None` for those the
            optimizer was built with.

    Raises:
        ValueError: if the gradients and variables do not match.
    """
    grads = list(grads)
    if trainable_variables is None:
        if not optimizer.built:
            raise ValueError(
                "`apply` without `trainable_variables` needs a built "
                "optimizer: pass the variables on the first call or call "
                "`optimizer.build(variables)`."
            )
        variables = list(private_api.trainable_variables(optimizer))
    else:
        variables = list(trainable_variables)
    if len(grads) != len(variables):
        raise ValueError(
            f"`apply` received {len(grads)} gradients for "
            f"{len(variables)} variables: pass exactly one gradient (or "
            "`None`) per variable."
        )
    if not optimizer.built:
        with keras.name_scope(optimizer.name, caller=optimizer):
            optimizer.build(variables)
    private_api.check_variables_are_known(optimizer, variables)
    grads, variables = private_api.filter_empty_gradients(
        optimizer, grads, variables
    )
    rows = _accumulates_sparse_rows(pipeline)
    scale = optimizer.loss_scale_factor
    prepared = []
    indices = []
    for grad, variable in zip(grads, variables):
        if not (rows and sparse.is_sparse(grad)):
            grad = pipeline.backend.densify(grad)
        _check_gradient_matches(grad, variable)
        index = private_api.variable_index(optimizer, variable)
        if scale is not None and not pipeline.overwritten[index]:
            # Variables overwritten with their gradient take it as it is,
            # before unscaling (as in Keras).
            grad = sparse.map_values(grad, lambda g: g / scale)
        prepared.append(grad)
        indices.append(index)
    return prepared, variables, indices


def _accumulates_sparse_rows(pipeline):
    """Sparse gradients stay sparse only where only their sum is
    accumulated, row by row: a scatter-add sums repeated rows as the dense
    gradient would. Clipping each micro-batch, Σg² (Adam "micro",
    per-coordinate statistics) and the squared norms of the statistics need
    the dense gradient's values, which summing repeated rows first gave,
    but inside a `fit` step compiled by XLA that summing took 2.3 s of a
    2.7 s step on a 201-tensor BERT (`tf.unique`, and a static-shape sort
    in its place alike; `benchmarks/real_models.py`, TensorFlow): there the
    gradient is made dense instead."""
    settings = pipeline.settings
    return (
        backend.backend() == "tensorflow"
        and settings.accumulates
        and not settings.clip_micro_batches
        and not settings.track_gradient_statistics
        and not pipeline.accumulator.square_sums
        and pipeline.strategy is None
    )


def _check_gradient_matches(grad, variable):
    values = sparse.values_of(grad)
    grad_shape = tuple(getattr(grad, "shape", ()) or ())
    if sparse.is_sparse(grad):
        grad_shape = tuple(variable.shape)
    var_shape = tuple(variable.shape)
    compatible = len(grad_shape) == len(var_shape) and all(
        g is None or v is None or g == v for g, v in zip(grad_shape, var_shape)
    )
    path = common.variable_path(variable)
    if not compatible:
        raise ValueError(
            f"The gradient for variable '{path}' has shape {grad_shape}, but "
            f"the variable has shape {var_shape}."
        )
    dtype = backend.standardize_dtype(values.dtype)
    if not dtype.startswith(("float", "bfloat")):
        raise ValueError(
            f"The gradient for variable '{path}' has dtype {dtype}; "
            "gradients must be floating point."
        )
