"""Every use of a private Keras or TensorFlow API in keras_gradtools.

Keras 3 gives optimizer subclasses `build`, `update_step`, `get_config`,
`add_variable*` and `assign*` as public hooks, and nothing else. What the
pipeline needs beyond them is gathered here, each behind a function that
says what it is for, so that a Keras or TensorFlow release that changes one
breaks in one place, loudly: `tests/test_private_api.py` exercises every
function on both backends (and `check()` is run by that test with the
installed Keras).

The attributes used are those of `keras.src.optimizers.base_optimizer
.BaseOptimizer` (Keras 3.8 to 3.15), of `keras.src.backend.common
.stateless_scope`, and of TensorFlow's `control_flow_util`.
"""

import contextlib

import keras

# The private attributes of `keras.optimizers.Optimizer` used below; an
# optimizer built by Keras must have them all (see `check`).
OPTIMIZER_ATTRIBUTES = (
    "_iterations",
    "_learning_rate",
    "_variables",
    "_trainable_variables",
    "_trainable_variables_indices",
    "_var_key",
    "_get_variable_index",
    "_check_variables_are_known",
    "_track_variable",
    "_filter_empty_gradients",
    "_overwrite_variable_with_gradient",
    "_use_weight_decay",
)


def check(optimizer) -> None:
    """Raises a `RuntimeError` naming what is missing if `optimizer` (a
    Keras optimizer) lacks a private attribute this module relies on."""
    missing = [a for a in OPTIMIZER_ATTRIBUTES if not hasattr(optimizer, a)]
    if missing:
        raise RuntimeError(
            f"keras_gradtools {_version()} relies on private attributes of "
            f"keras.optimizers.Optimizer that Keras {keras.__version__} no "
            f"longer has: {missing}. Install a Keras version between 3.8 and "
            "3.15, or a keras_gradtools release that supports this one."
        )


def _version():
    from keras_gradtools.version import __version__

    return __version__


# ----------------------------------------------------------------------
# Optimizer internals.


def iterations_variable(optimizer):
    """The update counter variable behind `optimizer.iterations`."""
    return optimizer._iterations


def learning_rate_setting(optimizer):
    """The learning rate as given: a variable, a schedule or a callable."""
    return optimizer._learning_rate


def callable_learning_rate_value(optimizer):
    """The value of `optimizer`'s learning rate now, if it was given as a
    plain callable (not a schedule, not a number), else `None`. Keras
    calls such a callable whenever it reads the learning rate; a compiled
    step would read it once, when traced."""
    from keras import optimizers

    setting = optimizer._learning_rate
    if (
        not callable(setting)
        or isinstance(setting, optimizers.schedules.LearningRateSchedule)
        or isinstance(setting, keras.Variable)
    ):
        return None
    return keras.ops.convert_to_tensor(setting(), "float32")


@contextlib.contextmanager
def feeding_learning_rate(optimizer, value):
    """While traced: `optimizer`'s callable learning rate returns `value`
    (an argument of the compiled step) instead of being called."""
    if value is None:
        yield
        return
    setting = optimizer._learning_rate
    # Not a tracked attribute: bypass Keras's (and TensorFlow's) tracking.
    object.__setattr__(optimizer, "_learning_rate", lambda: value)
    try:
        yield
    finally:
        object.__setattr__(optimizer, "_learning_rate", setting)


def keras_variables(optimizer) -> list:
    """The variables Keras's `Optimizer.__init__` creates (the update
    counter and, for a float learning rate, its variable): the whole state
    of an optimizer that is not built yet."""
    rate = optimizer._learning_rate
    return [optimizer._iterations] + (
        [rate] if isinstance(rate, keras.Variable) else []
    )


def tracked_variables(optimizer) -> list:
    """The optimizer's own list of its variables (not a copy): the order of
    `variables`, `set_weights` and saving."""
    return optimizer._variables


def track_variable(optimizer, variable) -> None:
    """Adds a variable created outside `add_variable` (a per-replica
    accumulator) to the optimizer's variables."""
    optimizer._track_variable(variable)


def register_trainable_variables(optimizer, variables) -> None:
    """What `BaseOptimizer.build` records about the model's variables: their
    order and the index of each (read by `variable_index`)."""
    for i, variable in enumerate(variables):
        optimizer._trainable_variables_indices[optimizer._var_key(variable)] = i
    # Bypasses Keras's attribute tracking, as Keras's own `build` does: the
    # model's variables are not the optimizer's.
    object.__setattr__(optimizer, "_trainable_variables", list(variables))


def trainable_variables(optimizer) -> list:
    """The model variables the optimizer was built with, in order."""
    return optimizer._trainable_variables


def variable_index(optimizer, variable) -> int:
    """The position of a model variable in the optimizer's build order."""
    return optimizer._get_variable_index(variable)


def check_variables_are_known(optimizer, variables) -> None:
    """Raises Keras's `ValueError` for a variable the optimizer was not
    built with."""
    optimizer._check_variables_are_known(variables)


def filter_empty_gradients(optimizer, grads, variables):
    """Drops `None` gradients with Keras's warning (and its error when all
    are `None`)."""
    return optimizer._filter_empty_gradients(grads, variables)


def overwrites_with_gradient(optimizer, variable) -> bool:
    """Whether a variable is overwritten with its gradient instead of being
    trained (float8 scale factors: `variable.overwrite_with_gradient`)."""
    return bool(optimizer._overwrite_variable_with_gradient(variable))


def uses_weight_decay(optimizer, variable) -> bool:
    """Whether weight decay applies to `variable` (honours
    `exclude_from_weight_decay`)."""
    return bool(optimizer._use_weight_decay(variable))


# ----------------------------------------------------------------------
# Keras backend internals.


def holds_values(variables) -> bool:
    """Whether every variable holds its value. Keras's JAX trainer detaches
    the values of the model's and the optimizer's variables while `fit`
    runs an epoch (`_purge_model_variables` sets `_value = None`) and
    reattaches them when the epoch ends, but not when its first step
    fails. Other backends never detach them."""
    if keras.backend.backend() != "jax":
        return True
    return all(getattr(v, "_value", None) is not None for v in variables)


def in_stateless_scope() -> bool:
    """Whether a `keras.StatelessScope` is active (Keras exports the scope,
    not the query)."""
    from keras.src.backend.common import stateless_scope

    return stateless_scope.in_stateless_scope()


# ----------------------------------------------------------------------
# TensorFlow internals.


def in_xla_context() -> bool:
    """Whether the TensorFlow graph being traced will be compiled by XLA.

    TensorFlow has no public way to ask this.
    """
    import tensorflow as tf
    from tensorflow.python.ops import control_flow_util

    return control_flow_util.GraphOrParentsInXlaContext(
        tf.compat.v1.get_default_graph()
    )


def variable_layout(variable):
    """The `keras.distribution` layout a model variable was created with
    (what `add_variable_from_reference` gives its slots), or `None`."""
    return getattr(variable, "_layout", None)


# ----------------------------------------------------------------------
# `model.fit` under MultiWorkerMirroredStrategy (keras_gradtools.distribute).
#
# `TensorFlowTrainer._maybe_symbolic_build(iterator=None, data_batch=None)`
# is what `fit` and `evaluate` call first; given an iterator it reduces the
# first batch across workers (which MultiWorkerMirroredStrategy rejects)
# before checking whether anything needs building. Given `data_batch`, it
# builds from that batch's shapes without reducing.

_SYMBOLIC_BUILD_PARAMETERS = (("iterator", None), ("data_batch", None))
_SYMBOLIC_BUILD_RELIES_ON = "_symbolic_build(data_batch=data_batch)"


def check_multi_worker_fit_internals(model) -> None:
    """Raises a `RuntimeError` saying what differs if Keras's trainer is not
    the one `skip_first_batch_reduction` was written against (Keras 3.15,
    TensorFlow backend)."""
    import inspect

    problems = []
    method = getattr(type(model), "_maybe_symbolic_build", None)
    if method is None:
        problems.append("Model._maybe_symbolic_build is gone")
    else:
        parameters = tuple(
            (p.name, p.default)
            for p in inspect.signature(method).parameters.values()
            if p.name != "self"
        )
        if parameters != _SYMBOLIC_BUILD_PARAMETERS:
            problems.append(
                f"Model._maybe_symbolic_build takes {parameters}, not "
                f"{_SYMBOLIC_BUILD_PARAMETERS}"
            )
        try:
            source = inspect.getsource(method)
        except (OSError, TypeError):
            source = ""
        if _SYMBOLIC_BUILD_RELIES_ON not in source:
            problems.append(
                "Model._maybe_symbolic_build no longer calls "
                f"{_SYMBOLIC_BUILD_RELIES_ON}"
            )
    for name in ("train_step", "test_step"):
        step = getattr(model, name, None)
        if step is None or list(inspect.signature(step).parameters) != ["data"]:
            problems.append(f"model.{name} is not `{name}(data)`")
    if problems:
        raise RuntimeError(
            "keras_gradtools.distribute.enable_multi_worker_fit was written "
            f"against Keras 3.15's TensorFlow trainer; Keras "
            f"{keras.__version__} differs: {'; '.join(problems)}. Check "
            "whether plain `model.fit` now works under "
            "MultiWorkerMirroredStrategy "
            "(keras_fit_fails_under_multi_worker)."
        )


def skip_first_batch_reduction(model, strategy) -> None:
    """Makes this model's `_maybe_symbolic_build` build from this worker's
    part of the first batch (`data_batch=`) instead of reducing the batch
    across workers (`iterator=`). Shapes and dtypes are all it reads."""
    import tensorflow as tf

    original = model._maybe_symbolic_build

    def maybe_symbolic_build(iterator=None, data_batch=None):
        if iterator is not None and data_batch is None:
            # The first batch of the epoch, as Keras takes it (`fit` resets
            # the iterator right after).
            for _, _, batches in iterator:
                data_batch = next(batches)
                break
        if data_batch is not None:
            data_batch = keras.tree.map_structure(
                lambda v: (
                    strategy.experimental_local_results(v)[0]
                    if isinstance(v, tf.distribute.DistributedValues)
                    else v
                ),
                data_batch,
            )
        return original(iterator=None, data_batch=data_batch)

    object.__setattr__(model, "_maybe_symbolic_build", maybe_symbolic_build)


def keras_mask(tensor):
    """The Keras mask carried by `tensor` (what `keras.losses.Loss` reads
    from `y_pred`), or `None`. Keras 3 exposes no public getter."""
    from keras.src.backend import get_keras_mask

    return get_keras_mask(tensor)


def weights_moving_average(optimizer) -> list:
    """The moving averages of the model's weights (`use_ema`), one per
    trainable variable, as Keras's `finalize_variable_values` reads them."""
    return optimizer._model_variables_moving_average


def set_weights_moving_average(optimizer, averages) -> None:
    """Sets the moving averages Keras's `finalize_variable_values` reads
    (created by our `build`, which does not call Keras's)."""
    optimizer._model_variables_moving_average = averages
