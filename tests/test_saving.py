"""Optimizer state survives a `.keras` round trip in the middle of an
accumulation cycle, noise stream included."""

import keras
import numpy as np
import pytest
from helpers import compiled_classifier
from helpers import digits

import keras_gradtools as kg

FACTORIES = {
    "sgd": lambda: kg.SGD(
        0.05, momentum=0.9, accumulation_steps=4, noise_eta=1e-3, noise_seed=1
    ),
    "adam": lambda: kg.Adam(
        1e-2,
        accumulation_steps=4,
        noise_eta=1e-3,
        noise_seed=2,
        global_clipnorm=1.0,
        second_moment="micro",
    ),
    "adamw": lambda: kg.AdamW(1e-2, accumulation_steps=4, noise_eta=1e-3),
    "wrap": lambda: kg.wrap(
        keras.optimizers.RMSprop(1e-3), accumulation_steps=4, noise_eta=1e-3
    ),
}


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_resume_mid_cycle_is_bitwise_identical(name, tmp_path):
    x, y = digits(320)
    first, rest = slice(0, 6 * 32), slice(6 * 32, 320)
    model = compiled_classifier(FACTORIES[name]())
    model.fit(x[first], y[first], batch_size=32, shuffle=False, verbose=0)
    optimizer = model.optimizer
    assert int(optimizer.micro_steps.numpy()) % optimizer.accumulation_steps
    path = tmp_path / "mid_cycle.keras"
    model.save(path)

    restored = keras.saving.load_model(path)
    assert type(restored.optimizer) is type(optimizer)
    assert restored.optimizer.get_config() == optimizer.get_config()
    for a, b in zip(optimizer.variables, restored.optimizer.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())

    for m in (model, restored):
        m.fit(x[rest], y[rest], batch_size=32, shuffle=False, verbose=0)
    for a, b in zip(model.get_weights(), restored.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert int(restored.optimizer.iterations.numpy()) > 1


def _fit(model, x, y):
    model.fit(x, y, batch_size=32, shuffle=False, verbose=0)


@pytest.mark.tensorflow_only
def test_tf_train_checkpoint_manager_restores_mid_cycle(tmp_path):
    import tensorflow as tf

    x, y = digits(320)
    model = compiled_classifier(FACTORIES["adam"]())
    _fit(model, x[:192], y[:192])
    checkpoint = tf.train.Checkpoint(model=model, optimizer=model.optimizer)
    manager = tf.train.CheckpointManager(checkpoint, tmp_path, max_to_keep=2)
    manager.save()

    restored = compiled_classifier(FACTORIES["adam"]())
    restored.optimizer.build(restored.trainable_variables)
    target = tf.train.Checkpoint(model=restored, optimizer=restored.optimizer)
    target.restore(manager.latest_checkpoint).assert_existing_objects_matched()
    assert int(restored.optimizer.micro_steps.numpy()) == 6
    for m in (model, restored):
        _fit(m, x[192:], y[192:])
    for a, b in zip(model.get_weights(), restored.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_save_weights_carries_optimizer_state(tmp_path):
    x, y = digits(320)
    model = compiled_classifier(FACTORIES["sgd"]())
    _fit(model, x[:192], y[:192])
    path = tmp_path / "mid_cycle.weights.h5"
    model.save_weights(path)
    restored = compiled_classifier(FACTORIES["sgd"]())
    restored.optimizer.build(restored.trainable_variables)
    restored.load_weights(path)
    for a, b in zip(model.optimizer.variables, restored.optimizer.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    for m in (model, restored):
        _fit(m, x[192:], y[192:])
    for a, b in zip(model.get_weights(), restored.get_weights()):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
@pytest.mark.parametrize(
    "other,message",
    [
        (lambda: kg.Adam(1e-2, accumulation_steps=1), "accumulation_steps"),
        (lambda: kg.Adam(1e-2, accumulation_steps=8), "accumulation_steps"),
        (
            lambda: kg.Adam(1e-2, accumulation_steps=4, second_moment="macro"),
            "second_moment",
        ),
        (lambda: kg.SGD(0.1, accumulation_steps=4), "saved by Adam, not SGD"),
        (lambda: keras.optimizers.Adam(1e-2), "not written by keras_gradtools"),
    ],
    ids=["k1", "k8", "macro", "sgd", "keras_adam"],
)
def test_state_that_does_not_fit_is_refused(other, message, tmp_path):
    x, y = digits(128)
    model = compiled_classifier(FACTORIES["adam"]())
    _fit(model, x, y)
    path = tmp_path / "adam.weights.h5"
    model.save_weights(path)
    target = compiled_classifier(other())
    target.optimizer.build(target.trainable_variables)
    if isinstance(target.optimizer, kg.GradientPipelineOptimizer):
        with pytest.raises(ValueError, match=message):
            target.load_weights(path)
    else:
        # Keras's own optimizer only warns here; ours refuses the reverse.
        keras_path = tmp_path / "keras.weights.h5"
        target.save_weights(keras_path)
        with pytest.raises(ValueError, match=message):
            model.load_weights(keras_path)


def test_corrupted_file_raises_instead_of_loading(tmp_path):
    x, y = digits(128)
    model = compiled_classifier(FACTORIES["adam"]())
    _fit(model, x, y)
    path = tmp_path / "model.keras"
    model.save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(Exception, match="(?i)zip|file|corrupt|truncat"):
        keras.saving.load_model(path)


@pytest.mark.slow
def test_sigkill_and_restart_with_backup_and_restore_ends_identical(tmp_path):
    import os
    import subprocess
    import sys

    script = os.path.join(
        os.path.dirname(__file__), "scripts", "train_with_backup.py"
    )
    env = dict(os.environ, PYTHONHASHSEED="0", TF_CPP_MIN_LOG_LEVEL="3")

    def run(backup, output, *extra):
        return subprocess.run(
            [sys.executable, script, str(backup), str(output), *extra],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )

    uninterrupted = run(tmp_path / "backup_a", tmp_path / "a.npz")
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-2000:]
    marker = tmp_path / "killed"
    command = (
        tmp_path / "backup_b",
        tmp_path / "b.npz",
        "--kill-marker",
        str(marker),
    )
    killed = run(*command)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert marker.exists() and not (tmp_path / "b.npz").exists()
    resumed = run(*command)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = np.load(tmp_path / "a.npz"), np.load(tmp_path / "b.npz")
    assert len(a.files) == len(b.files) > 0
    for key in a.files:
        np.testing.assert_array_equal(a[key], b[key])
    # AdaptiveAccumulation moved K away from 3 and resumed where it was.
    steps, factor = a["adaptive"]
    assert steps != 3 and factor != 1.0


@pytest.mark.slow
@pytest.mark.parametrize("saved_with_statistics", [True, False])
def test_state_restores_whether_statistics_were_on_or_not(
    saved_with_statistics, tmp_path
):
    """Callbacks switch statistics on at the start of fit, which may come
    after BackupAndRestore has restored: state saved with them restores into
    an optimizer without them (switching them on), and the reverse keeps
    everything else (the statistics start with the next cycle)."""
    x, y = digits(320)

    def make(statistics):
        return compiled_classifier(
            kg.Adam(
                1e-2,
                accumulation_steps=4,
                noise_eta=1e-3,
                noise_seed=3,
                track_gradient_statistics=statistics,
                # Its sums of squares complete the statistics of the cycle
                # begun before saving.
                second_moment="micro",
            )
        )

    model = make(saved_with_statistics)
    _fit(model, x[:192], y[:192])  # 6 micro-batches: mid-cycle
    path = tmp_path / "state.weights.h5"
    model.save_weights(path)
    restored = make(not saved_with_statistics)
    restored.optimizer.build(restored.trainable_variables)
    restored.load_weights(path)
    assert restored.optimizer.track_gradient_statistics
    assert int(restored.optimizer.micro_steps.numpy()) == 6
    for m in (model, restored):
        _fit(m, x[192:], y[192:])
    for a, b in zip(model.get_weights(), restored.get_weights()):
        np.testing.assert_array_equal(a, b)
    statistics = restored.optimizer.gradient_statistics()
    # 4 more micro-batches: the cycle begun before saving completes, then
    # one whole cycle; the latter is measured either way.
    assert np.isfinite(float(statistics["variance"]))
