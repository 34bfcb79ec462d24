"""Every private Keras or TensorFlow API keras_gradtools uses, exercised
on the installed versions: when Keras or TensorFlow change one, this module
fails, naming it (keras_gradtools/backends/private_api.py)."""

import keras
import numpy as np
import pytest

import keras_gradtools as kg
from keras_gradtools.backends import private_api


@pytest.mark.parametrize(
    "optimizer",
    [
        keras.optimizers.Adam(),
        keras.optimizers.SGD(),
        kg.Adam(accumulation_steps=2),
        kg.wrap("rmsprop"),
    ],
    ids=["keras_adam", "keras_sgd", "ours", "wrap"],
)
def test_every_optimizer_attribute_relied_on_exists(optimizer):
    private_api.check(optimizer)


def test_check_names_what_is_missing():
    class Stripped:
        pass

    with pytest.raises(RuntimeError, match=r"_iterations.*_use_weight_decay"):
        private_api.check(Stripped())


def test_optimizer_internals_do_what_the_pipeline_needs():
    a = keras.Variable(np.ones((2, 3), "float32"), name="a")
    b = keras.Variable(np.ones(3, "float32"), name="b")
    optimizer = keras.optimizers.SGD(0.1, weight_decay=0.1)
    optimizer.exclude_from_weight_decay(var_names=["b"])
    tracked_before = len(private_api.tracked_variables(optimizer))
    private_api.register_trainable_variables(optimizer, [a, b])
    assert private_api.trainable_variables(optimizer) == [a, b]
    assert private_api.variable_index(optimizer, b) == 1
    # Registering does not make the model's variables the optimizer's.
    assert len(private_api.tracked_variables(optimizer)) == tracked_before
    private_api.check_variables_are_known(optimizer, [a])
    with pytest.raises(ValueError, match="Unknown variable"):
        private_api.check_variables_are_known(
            optimizer, [keras.Variable(np.ones(1, "float32"))]
        )
    extra = keras.Variable(0.0)
    private_api.track_variable(optimizer, extra)
    assert extra in private_api.tracked_variables(optimizer)
    assert private_api.iterations_variable(optimizer) is optimizer.iterations
    assert private_api.keras_variables(optimizer)[0] is optimizer.iterations
    assert isinstance(
        private_api.learning_rate_setting(optimizer), keras.Variable
    )
    grads, variables = private_api.filter_empty_gradients(
        optimizer, [None, np.ones(3, "float32")], [a, b]
    )
    assert variables == [b]
    assert private_api.uses_weight_decay(optimizer, a)
    assert not private_api.uses_weight_decay(optimizer, b)
    a.overwrite_with_gradient = True
    assert private_api.overwrites_with_gradient(optimizer, a)
    assert not private_api.overwrites_with_gradient(optimizer, b)
    assert private_api.variable_layout(b) is None


def test_stateless_scope_query():
    assert not private_api.in_stateless_scope()
    with keras.StatelessScope():
        assert private_api.in_stateless_scope()


def test_callable_learning_rate_is_evaluated_and_fed():
    optimizer = keras.optimizers.SGD(lambda: 0.25)
    value = private_api.callable_learning_rate_value(optimizer)
    assert float(value) == 0.25
    with private_api.feeding_learning_rate(optimizer, 0.5):
        assert float(optimizer.learning_rate) == 0.5
    assert float(optimizer.learning_rate) == 0.25
    schedule = keras.optimizers.schedules.ExponentialDecay(0.1, 10, 0.5)
    for setting in (0.1, schedule):
        optimizer = keras.optimizers.SGD(setting)
        assert private_api.callable_learning_rate_value(optimizer) is None


def test_holds_values_sees_variables_detached_by_fit():
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    assert private_api.holds_values(model.weights)
    if keras.backend.backend() == "jax":
        # What Keras's JAX trainer does to the variables during an epoch.
        model._purge_model_variables(trainable_variables=True)
        assert not private_api.holds_values(model.weights)


@pytest.mark.tensorflow_only
def test_xla_context_query():
    import tensorflow as tf

    seen = {}

    def probe():
        seen[tf.executing_eagerly()] = private_api.in_xla_context()
        return tf.constant(0)

    tf.function(probe)()
    graph = seen[False]
    tf.function(probe, jit_compile=True)()
    assert graph is False and seen[False] is True


@pytest.mark.tensorflow_only
def test_multi_worker_fit_internals_are_as_expected():
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    private_api.check_multi_worker_fit_internals(model)

    class Changed(keras.Sequential):
        def _maybe_symbolic_build(self, iterator=None, data=None):
            return None

    changed = Changed([keras.Input((2,)), keras.layers.Dense(1)])
    changed.compile(optimizer="sgd", loss="mse")
    with pytest.raises(RuntimeError, match="_maybe_symbolic_build takes"):
        private_api.check_multi_worker_fit_internals(changed)


@pytest.mark.parametrize(
    "update_freq, asynchronous", [("epoch", True), (5, False)]
)
def test_the_monitor_keeps_kerass_asynchronous_batch_dispatch_per_epoch(
    update_freq, asynchronous
):
    """Keras runs `fit`'s batch hooks asynchronously (not waiting for each
    step's logs) only while no callback overrides them (Keras's
    `utils.is_default` marker, read by `CallbackList`): the monitor measuring
    per epoch must not turn that off; measuring every N batches must."""
    from keras.src.utils.python_utils import is_default

    monitor = kg.GradientVarianceMonitor(update_freq=update_freq)
    assert bool(is_default(monitor.on_train_batch_end)) is asynchronous
    from keras.src.backend import IS_THREAD_SAFE

    callbacks = keras.callbacks.CallbackList([monitor])
    assert callbacks._async_train is (asynchronous and IS_THREAD_SAFE)
