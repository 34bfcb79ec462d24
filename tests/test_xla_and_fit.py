"""The update compiles with XLA, eagerly and inside the caller's cluster,
and `model.fit` trains with accumulation, noise and clipping."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import compiled_classifier
from helpers import digits
from helpers import make_variables
from helpers import random_gradients
from helpers import tiny_classifier

import keras_gradtools as kg

pytestmark = pytest.mark.tensorflow_only

_LEARNING_RATE_TEXT = tf.Variable("0.01")


class _ScheduleXlaCannotCompile(
    keras.optimizers.schedules.LearningRateSchedule
):
    """String ops have no XLA kernel: inside a compiled update they fail.
    (A schedule is evaluated inside the update; a plain callable is called
    before it, as Keras calls it at every apply.)"""

    def __call__(self, step):
        return tf.strings.to_number(_LEARNING_RATE_TEXT)


_learning_rate_xla_cannot_compile = _ScheduleXlaCannotCompile()


def test_eager_apply_really_compiles_with_xla(rng):
    variables = make_variables(rng)
    grads = random_gradients(rng, variables)
    compiled = kg.SGD(_learning_rate_xla_cannot_compile, jit_compile=True)
    with pytest.raises(Exception, match="(?i)xla|compil|StringToNumber"):
        compiled.apply(grads, variables)
    interpreted = kg.SGD(_learning_rate_xla_cannot_compile, jit_compile=False)
    before = variables[0].numpy().copy()
    interpreted.apply(grads, variables)
    assert not np.array_equal(before, variables[0].numpy())


@pytest.mark.slow
@pytest.mark.parametrize(
    "factory",
    [
        lambda: kg.Adam(1e-3, accumulation_steps=4, noise_eta=0.01),
        lambda: kg.SGD(0.1, momentum=0.9, accumulation_steps=4),
        lambda: kg.AdamW(1e-3, global_clipnorm=1.0, noise_eta=0.01),
        lambda: kg.wrap(keras.optimizers.Lion(1e-4), accumulation_steps=2),
    ],
    ids=["adam", "sgd", "adamw", "wrap"],
)
def test_update_traces_into_the_callers_xla_cluster(factory, rng):
    """The whole step lowers to one HLO module: no op left outside XLA, no
    float64 (TPU-ready), and the accumulate/update choice is a loop, not a
    host round trip."""
    variables = make_variables(rng)
    optimizer = factory()
    optimizer.build(variables)

    @tf.function(jit_compile=True)
    def step(grads):
        optimizer.apply(list(grads), variables)

    grads = tuple(tf.constant(g) for g in random_gradients(rng, variables))
    hlo = step.experimental_get_compiler_ir(grads)(stage="hlo")
    assert "f64" not in hlo
    if optimizer.accumulation_steps > 1:
        assert "while" in hlo
    for _ in range(4):
        step(grads)
    assert int(optimizer.micro_steps.numpy()) == 4
    assert (
        int(optimizer.iterations.numpy()) == 4 // optimizer.accumulation_steps
    )


@pytest.mark.parametrize(
    "factory",
    [
        lambda: kg.Adam(
            1e-3, accumulation_steps=4, noise_eta=0.01, global_clipnorm=1.0
        ),
        lambda: kg.SGD(
            0.1,
            momentum=0.9,
            accumulation_steps=2,
            clip_micro_batches=True,
            global_clipnorm=1.0,
        ),
        lambda: kg.wrap(
            keras.optimizers.RMSprop(1e-3),
            accumulation_steps=2,
            noise_eta=0.01,
            global_clipnorm=1.0,
        ),
    ],
    ids=["adam", "sgd", "wrap"],
)
def test_whole_train_step_is_one_xla_module_without_float64(factory):
    """TPU readiness: forward, backward and the update (accumulation,
    noise, clipping, statistics) compile into one HLO module with no
    float64 and no transfer to or from the host."""
    model = tiny_classifier()
    optimizer = factory()
    optimizer.enable_gradient_statistics()
    optimizer.build(model.trainable_variables)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    @tf.function(jit_compile=True)
    def train_step(x, y):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply(grads, model.trainable_variables)
        return loss

    x, y = digits(32)
    x, y = tf.constant(x), tf.constant(y)
    hlo = train_step.experimental_get_compiler_ir(x, y)(stage="hlo")
    assert "f64" not in hlo
    for host_transfer in ("outfeed", "infeed", "send(", "recv(", "host"):
        assert host_transfer not in hlo.lower(), host_transfer
    for _ in range(4):
        train_step(x, y)
    assert int(optimizer.micro_steps.numpy()) == 4
    statistics = optimizer.gradient_statistics()
    assert np.isfinite(float(statistics["grad_norm"]))


@pytest.mark.slow
def test_fit_with_xla_trains_with_accumulation_noise_and_clipping():
    x, y = digits()
    optimizer = kg.Adam(
        1e-2,
        accumulation_steps=4,
        noise_eta=1e-4,
        noise_seed=3,
        global_clipnorm=1.0,
        track_gradient_statistics=True,
    )
    model = compiled_classifier(
        optimizer, metrics=["accuracy"], jit_compile=True
    )
    initial_loss = model.evaluate(x, y, verbose=0)[0]
    history = model.fit(x, y, batch_size=32, epochs=6, verbose=0)
    steps = int(np.ceil(len(x) / 32)) * 6
    assert int(optimizer.micro_steps.numpy()) == steps
    assert int(optimizer.iterations.numpy()) == steps // 4
    final_loss = history.history["loss"][-1]
    assert final_loss < 0.5 * initial_loss
    assert history.history["accuracy"][-1] > 0.8
    stats = {k: float(v) for k, v in optimizer.gradient_statistics().items()}
    assert np.isfinite(stats["variance"]) and stats["variance"] > 0
    assert stats["noise_std"] > 0
