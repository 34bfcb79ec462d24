"""The JAX backend: no TensorFlow, the two ways JAX users train, XLA
cleanliness of the compiled step, and the same numbers as TensorFlow.

Runs only under KERAS_BACKEND=jax (see conftest.py); the comparisons with
TensorFlow start a TensorFlow process of their own.
"""

import os
import subprocess
import sys

import jax
import keras
import numpy as np
import pytest
from helpers import digits
from keras import ops
from processes import finish
from processes import parse_results

import keras_gradtools as kg

pytestmark = pytest.mark.jax_only
SCRIPTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "scripts")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python(code, backend, timeout=300):
    """Runs `code` in a fresh interpreter on `backend`; returns stdout."""
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
    completed = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=ROOT,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return completed.stdout


@pytest.mark.slow
def test_import_loads_no_tensorflow():
    out = _python(
        "import sys, keras_gradtools as kg\n"
        "model = kg.Adam(accumulation_steps=2)\n"
        "print('tensorflow' in sys.modules)\n",
        "jax",
    )
    assert out.strip() == "False"


@pytest.mark.slow
def test_an_unsupported_backend_is_named_clearly():
    """The numpy backend stands in for any other (torch works the same
    way: the check reads `keras.backend.backend()`)."""
    env = dict(os.environ, KERAS_BACKEND="numpy")
    completed = subprocess.run(
        [sys.executable, "-c", "import keras_gradtools"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=ROOT,
    )
    assert completed.returncode != 0
    assert "supports the Keras backends tensorflow and jax" in (
        completed.stderr
    )
    assert "'numpy'" in completed.stderr


def _reference_run(optimizer, grads, variables):
    for g in grads:
        optimizer.apply(g, variables)
    return [ops.convert_to_numpy(v) for v in variables]


@pytest.mark.parametrize(
    "make",
    [
        lambda: kg.Adam(
            0.05,
            accumulation_steps=3,
            noise_eta=0.01,
            noise_seed=3,
            global_clipnorm=1.0,
            track_gradient_statistics=True,
        ),
        lambda: kg.SGD(0.1, momentum=0.9, accumulation_steps=2, clipvalue=0.5),
        lambda: kg.wrap(keras.optimizers.Lion(0.01), accumulation_steps=2),
    ],
    ids=["adam", "sgd", "wrap_lion"],
)
def test_own_jit_loop_with_stateless_apply_and_donated_buffers(make):
    """The custom training loop Keras documents for JAX: the optimizer's
    state as arrays, `stateless_apply` inside `jax.jit` with the buffers
    donated. It must equal calling `apply` eagerly."""
    rng = np.random.default_rng(0)
    shapes = [(4, 3), (3,)]
    initial = [rng.normal(size=s).astype("float32") for s in shapes]
    grads = [
        [rng.normal(size=s).astype("float32") for s in shapes] for _ in range(6)
    ]
    expected = _reference_run(
        make(), grads, [keras.Variable(w) for w in initial]
    )

    variables = [keras.Variable(w) for w in initial]
    optimizer = make()
    optimizer.build(variables)

    @jax.jit
    def step(optimizer_values, trainable_values, g):
        new_trainable, new_optimizer = optimizer.stateless_apply(
            optimizer_values, g, trainable_values
        )
        return new_optimizer, new_trainable

    donated = jax.jit(step.__wrapped__, donate_argnums=(0, 1))
    optimizer_values = [v.value for v in optimizer.variables]
    trainable_values = [v.value for v in variables]
    for i, g in enumerate(grads):
        function = donated if i % 2 else step
        optimizer_values, trainable_values = function(
            optimizer_values,
            trainable_values,
            [jax.numpy.asarray(x) for x in g],
        )
    for actual, wanted in zip(trainable_values, expected):
        np.testing.assert_allclose(
            np.asarray(actual), wanted, rtol=1e-6, atol=1e-7
        )
    for variable, value in zip(optimizer.variables, optimizer_values):
        variable.assign(value)
    assert int(ops.convert_to_numpy(optimizer.micro_steps)) == 6


def test_fit_compiles_one_step_without_float64_or_host_calls():
    """The whole `fit` step (forward, backward, accumulation, noise,
    clipping, statistics) is one XLA module with no float64 and no callback
    to the host (TPU-ready), and it trains."""
    x, y = digits(256)
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(32, activation="relu"),
            keras.layers.Dense(10),
        ]
    )
    model.compile(
        optimizer=kg.Adam(
            3e-3,
            accumulation_steps=4,
            noise_eta=1e-4,
            global_clipnorm=1.0,
            track_gradient_statistics=True,
        ),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=True,
    )
    history = model.fit(x, y, batch_size=32, epochs=3, verbose=0)
    assert history.history["loss"][-1] < history.history["loss"][0]
    state = tuple(
        [v.value for v in variables]
        for variables in (
            model.trainable_variables,
            model.non_trainable_variables,
            model.optimizer.variables,
            model.metrics_variables,
        )
    )
    batch = (x[:32], y[:32], None)
    text = jax.jit(model.train_step).lower(state, batch).compile().as_text()
    assert "f64" not in text
    assert 'custom_call_target="xla_python' not in text
    assert "CustomCall" not in text or "xla_python" not in text
    assert "conditional" in text  # the update, taken once per cycle


def test_on_nonfinite_raise_inside_jit_is_refused_when_traced():
    variables = [keras.Variable(np.zeros(3, "float32"))]
    optimizer = kg.SGD(0.1, on_nonfinite="raise")
    optimizer.build(variables)

    @jax.jit
    def step(optimizer_values, g):
        return optimizer.stateless_apply(
            optimizer_values, [g], [v.value for v in variables]
        )

    with pytest.raises(ValueError, match="jax.jit"):
        step(
            [v.value for v in optimizer.variables],
            jax.numpy.ones(3, "float32"),
        )
    with pytest.raises(FloatingPointError, match="micro-batch 0"):
        optimizer.apply([np.array([1.0, np.nan, 0.0], "float32")], variables)


@pytest.mark.parametrize("jit_compile", [True, False])
def test_eager_apply_compiles_once_not_per_call(jit_compile):
    """An eager `apply` is one cached `jax.jit` function, or (with
    `jit_compile=False`) ops run one by one whose branches are decided in
    Python: after the first cycle, further cycles compile nothing."""
    compiles = []

    def listen(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(duration)

    variables = [keras.Variable(np.ones((3, 2), "float32"))]
    optimizer = kg.Adam(
        0.01,
        accumulation_steps=2,
        global_clipnorm=1.0,
        noise_eta=0.01,
        track_gradient_statistics=True,
        jit_compile=jit_compile,
    )
    grads = [np.full((3, 2), 0.5, "float32")]
    for _ in range(4):
        optimizer.apply(grads, variables)
    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        for _ in range(4):
            optimizer.apply(grads, variables)
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    assert compiles == []
    assert int(optimizer.iterations) == 4
    assert np.isfinite(ops.convert_to_numpy(variables[0])).all()


CROSS_BACKEND_RUN = """
import json, numpy as np, keras, keras_gradtools as kg
from keras import ops
from keras_gradtools import transforms
rng = np.random.default_rng(5)
shapes = [(6, 5), (5,), (5, 3)]
initial = [rng.normal(size=s).astype("float32") for s in shapes]
grads = [[rng.normal(size=s).astype("float32") for s in shapes]
         for _ in range(12)]
draws = ops.convert_to_numpy(
    transforms.standard_normal(100001, (ops.convert_to_tensor(7), 3), 11)
)
result = {"draws": draws.tolist()}
for name, make in {
    "adam_micro": lambda: kg.Adam(0.02, accumulation_steps=4, noise_eta=0.05,
                                  noise_seed=9, global_clipnorm=2.0,
                                  second_moment="micro"),
    "sgd": lambda: kg.SGD(0.05, momentum=0.9, accumulation_steps=3,
                          noise_eta=0.05, noise_seed=9, clipnorm=1.0),
    "adamw_macro": lambda: kg.AdamW(0.02, second_moment="macro",
                                    accumulation_steps=2, clipvalue=0.5),
    "wrap_rmsprop": lambda: kg.wrap(keras.optimizers.RMSprop(0.01),
                                    accumulation_steps=2, noise_eta=0.05,
                                    noise_seed=9),
}.items():
    variables = [keras.Variable(w) for w in initial]
    optimizer = make()
    for g in grads:
        optimizer.apply(g, variables)
    result[name] = [ops.convert_to_numpy(v).tolist() for v in variables]
print("RESULT " + json.dumps(result))
"""


def _cross_backend_results(backends):
    """Runs CROSS_BACKEND_RUN on each of `backends` in fresh interpreters,
    side by side; returns their results in the same order."""
    runs = [
        subprocess.Popen(
            [sys.executable, "-c", CROSS_BACKEND_RUN],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=dict(
                os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3"
            ),
            cwd=ROOT,
        )
        for backend in backends
    ]
    outputs = finish(runs, timeout=300)
    for run, (_, stderr) in zip(runs, outputs):
        assert run.returncode == 0, stderr[-3000:]
    return [parse_results(stdout)[0] for stdout, _ in outputs]


@pytest.mark.slow
def test_same_numbers_as_tensorflow():
    """Bitwise the same noise draws; the same weights after training to
    float32 rounding (measured: see the assertion's bound)."""
    jax_run, tf_run = _cross_backend_results(["jax", "tensorflow"])
    np.testing.assert_array_equal(
        np.asarray(jax_run["draws"], "float32"),
        np.asarray(tf_run["draws"], "float32"),
    )
    worst = 0.0
    for name in ("adam_micro", "sgd", "adamw_macro", "wrap_rmsprop"):
        for a, b in zip(jax_run[name], tf_run[name]):
            worst = max(worst, float(np.max(np.abs(np.subtract(a, b)))))
    print(f"largest |w_jax - w_tf| after 12 micro-batches: {worst:.2e}")
    assert worst <= 2e-6
