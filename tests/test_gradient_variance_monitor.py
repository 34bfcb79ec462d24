"""GradientVarianceMonitor: known answers in both modes, the running
averages against float64, TensorBoard files read back, probes that touch
nothing, the plot and the advice."""

import keras
import numpy as np
import pytest
from helpers import compiled_classifier
from helpers import digits
from helpers import frozen_linear_model
from helpers import linear_regression

import keras_gradtools as kg

BATCH = 16
# The decay of the running statistics that `running_gradient_statistics`
# documents.
SMOOTHING = 0.95


@pytest.mark.slow
def test_known_noise_scale_from_optimizer_statistics():
    x, y, expected = linear_regression(BATCH * 4 * 200)
    model = frozen_linear_model(kg.SGD(0.0, accumulation_steps=4))
    monitor = kg.GradientVarianceMonitor(verbose=0)
    history = model.fit(
        x, y, batch_size=BATCH, epochs=1, verbose=0, callbacks=[monitor]
    )
    assert monitor.mode == "optimizer"
    measured = history.history["grad_noise_scale"][-1]
    print(f"noise scale: measured {measured:.2f}, expected {expected:.2f}")
    assert measured == pytest.approx(expected, rel=0.25)
    assert np.all(model.get_weights()[0] == 0)  # weights held fixed


@pytest.mark.slow
def test_known_noise_scale_from_probes_with_a_keras_optimizer():
    x, y, expected = linear_regression(BATCH * 64 * 3, seed=1)
    model = frozen_linear_model(keras.optimizers.SGD(0.0))
    monitor = kg.GradientVarianceMonitor(
        probe_data=(x, y), probe_batches=64, batch_size=BATCH, verbose=0
    )
    history = model.fit(
        x, y, batch_size=BATCH, epochs=1, verbose=0, callbacks=[monitor]
    )
    assert monitor.mode == "probe"
    measured = history.history["grad_noise_scale"][-1]
    print(f"noise scale: measured {measured:.2f}, expected {expected:.2f}")
    assert measured == pytest.approx(expected, rel=0.25)


def test_running_statistics_equal_float64_ema(rng):
    k = 3
    shapes = [(4, 3), (5,)]
    variables = [keras.Variable(np.zeros(s, "float32")) for s in shapes]
    optimizer = kg.SGD(
        0.1, accumulation_steps=k, track_gradient_statistics=True
    )
    ema = {"variance": 0.0, "mean_norm_sq": 0.0, "weight": 0.0}
    for _ in range(6):
        micro = [
            [rng.normal(1.0, 2.0, size=s).astype("float32") for s in shapes]
            for _ in range(k)
        ]
        for grads in micro:
            optimizer.apply(grads, variables)
        g = [
            np.array([m[i] for m in micro], np.float64)
            for i in range(len(shapes))
        ]
        mean = [a.mean(axis=0) for a in g]
        variance = sum(float(np.sum(a.var(axis=0, ddof=1))) for a in g)
        mean_norm_sq = sum(float(np.sum(m**2)) for m in mean) - variance / k
        for name, value in [
            ("variance", variance),
            ("mean_norm_sq", mean_norm_sq),
            ("weight", 1.0),
        ]:
            ema[name] = SMOOTHING * ema[name] + (1 - SMOOTHING) * value
    running = {
        n: np.asarray(v)
        for n, v in optimizer.running_gradient_statistics().items()
    }
    expected_variance = ema["variance"] / ema["weight"]
    expected_mean = ema["mean_norm_sq"] / ema["weight"]
    np.testing.assert_allclose(
        running["variance"], expected_variance, rtol=1e-4
    )
    np.testing.assert_allclose(
        running["mean_norm_sq"], expected_mean, rtol=1e-4
    )
    np.testing.assert_allclose(
        running["noise_scale"], expected_variance / expected_mean, rtol=1e-4
    )
    np.testing.assert_allclose(
        running["snr"], expected_mean * k / expected_variance, rtol=1e-4
    )
    assert running["variable_variance"].shape == (2,)
    np.testing.assert_allclose(
        running["variable_variance"].sum(), expected_variance, rtol=1e-4
    )


def _tensorboard_scalars(directory):
    """The scalar series and the other tensors (histograms) logged under
    `directory`."""
    from tensorboard.backend.event_processing import event_accumulator
    from tensorboard.util import tensor_util

    accumulator = event_accumulator.EventAccumulator(
        str(directory), size_guidance={"tensors": 0}
    )
    accumulator.Reload()
    scalars, others = {}, {}
    for tag in accumulator.Tags()["tensors"]:
        values = [
            tensor_util.make_ndarray(e.tensor_proto)
            for e in accumulator.Tensors(tag)
        ]
        if all(v.ndim == 0 for v in values):
            scalars[tag] = [float(v) for v in values]
        else:
            others[tag] = values
    return scalars, others


@pytest.mark.slow
def test_tensorboard_events_alongside_keras_tensorboard(tmp_path):
    x, y = digits(512)
    model = compiled_classifier(
        kg.Adam(3e-3, accumulation_steps=4, noise_eta=1e-4)
    )
    monitor = kg.GradientVarianceMonitor(
        log_dir=str(tmp_path), per_layer=True, histogram_freq=1, verbose=0
    )
    history = model.fit(
        x, y, batch_size=32, epochs=3, verbose=0,
        callbacks=[keras.callbacks.TensorBoard(log_dir=str(tmp_path)), monitor],
    )  # fmt: skip
    scalars, histograms = _tensorboard_scalars(tmp_path / "gradients")
    for tag in [
        "grad_variance",
        "grad_noise_scale",
        "grad_snr",
        "grad_norm",
        "noise_std",
    ]:
        assert len(scalars[tag]) == 3, tag
        np.testing.assert_allclose(
            scalars[tag], history.history[tag], rtol=1e-6
        )
    assert all(v > 0 for v in scalars["grad_variance"])
    assert all(0 < v < 1e6 for v in scalars["grad_noise_scale"])
    kernel_tags = [
        t for t in scalars if t.startswith("grad_variance/") and "kernel" in t
    ]
    assert len(kernel_tags) == 2
    assert (tmp_path / "train").is_dir()  # Keras's own TensorBoard files
    per_coordinate = [t for t in histograms if "per_coordinate" in t]
    assert len(per_coordinate) == len(model.trainable_variables)
    png = kg.plot_gradient_statistics(
        str(tmp_path), str(tmp_path / "from_logs.png")
    )
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    png = kg.plot_gradient_statistics(
        history, str(tmp_path / "from_history.png")
    )
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert (
        "noise scale" in monitor.advice
        and "effective batch 128 (4 x 32)" in monitor.advice
    )


def test_probe_changes_no_weight_state_or_metric():
    x, y = digits(256)
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(32),
            keras.layers.BatchNormalization(),
            keras.layers.Dropout(0.3),
            keras.layers.Dense(10),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.Adam(),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    model.fit(x[:64], y[:64], batch_size=32, verbose=0)
    state = (
        model.variables + model.optimizer.variables + model.metrics_variables
    )
    before = [np.array(v.numpy()) for v in state]
    probe = kg.callbacks.GradientProbe(model, (x, y), batches=4, batch_size=32)
    stats, per_variable, _ = probe.measure()
    assert stats["variance"] > 0 and np.isfinite(stats["noise_scale"])
    assert per_variable["variable_variance"].shape == (
        len(model.trainable_variables),
    )
    for variable, value in zip(state, before):
        np.testing.assert_array_equal(
            variable.numpy(), value, err_msg=variable.path
        )


def test_monitor_switches_statistics_on_and_retraces():
    x, y = digits(256)
    optimizer = kg.SGD(0.05, accumulation_steps=4)
    model = compiled_classifier(optimizer)
    model.fit(x, y, batch_size=32, verbose=0)  # traced without statistics
    assert not optimizer.track_gradient_statistics
    history = model.fit(
        x, y, batch_size=32, epochs=2, verbose=0,
        callbacks=[kg.GradientVarianceMonitor(verbose=0)],
    )  # fmt: skip
    assert optimizer.track_gradient_statistics
    assert all(np.isfinite(history.history["grad_variance"]))


def test_monitor_without_a_way_to_measure_is_a_clear_error():
    x, y = digits(64)
    model = compiled_classifier("adam")
    with pytest.raises(ValueError, match="probe_data"):
        model.fit(x, y, verbose=0, callbacks=[kg.GradientVarianceMonitor()])
    with pytest.raises(ValueError, match="probe_batches"):
        kg.GradientVarianceMonitor(probe_batches=1)
    with pytest.raises(ValueError, match="update_freq"):
        kg.GradientVarianceMonitor(update_freq=0)
