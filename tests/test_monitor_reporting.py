"""What the monitor tells the user: no negative or infinite statistics,
advice on one basis that agrees across K, warnings where something was
left out or went wrong, History and plots that compare across runs."""

import warnings

import keras
import numpy as np
import pytest
from helpers import D
from helpers import compiled_classifier
from helpers import digits
from helpers import frozen_linear_model
from helpers import linear_regression

import keras_gradtools as kg
from keras_gradtools import plotting


def _no_signal(n, seed=0):
    """y = noise alone: at w = 0 the true gradient is exactly zero, so
    every unbiased |E g|**2 estimate scatters around 0."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, D)).astype("float32")
    return x, rng.normal(size=(n, 1)).astype("float32")


@pytest.mark.slow
def test_a_zero_signal_gives_lower_bounds_never_negative_or_infinite():
    x, y = _no_signal(16 * 4 * 64)
    model = frozen_linear_model(kg.SGD(0.0, accumulation_steps=4))
    monitor = kg.GradientVarianceMonitor(update_freq=4, verbose=0)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[monitor])
    records = monitor.records
    assert len(records) == 64
    resolved = [r["grad_signal_resolved"] for r in records]
    assert 0.0 in resolved  # the signal is not resolved, at least at times
    for r in records:
        assert r["grad_snr"] >= 0.0
        assert np.isfinite(r["grad_noise_scale"]) and r["grad_noise_scale"] > 0
        if r["grad_signal_resolved"] == 0.0:
            # The lower bound of B_simple is about the effective batch (an
            # estimate of it: any finite bound is true of an infinite B).
            assert r["grad_noise_scale"] <= 4 * 16 * 2
    advice = monitor.advice_details
    if advice.lower_bound_only:
        assert "lower bound" in advice.text
        assert advice.recommended_effective_batch is None


def test_the_plot_draws_every_point_and_marks_lower_bounds():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots()
    steps = [1, 2, 3, 4]
    plotting._draw(
        axis, "grad_noise_scale", steps, [50.0, 60.0, 64.0, 70.0],
        {1: 1.0, 2: 1.0, 3: 0.0, 4: 1.0},
    )  # fmt: skip
    drawn = sum(len(c.get_offsets()) for c in axis.collections)
    assert drawn == 4  # none dropped
    labels = axis.get_legend_handles_labels()[1]
    assert labels == ["lower bound: signal below the noise"]
    plt.close(figure)


@pytest.mark.slow
def test_plots_use_one_log_scale_per_panel_and_show_norm_and_noise(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    history = {
        "grad_noise_scale": [10.0, 20.0, 30.0],
        "grad_snr": [2.0, 1.0, 0.0],
        "grad_signal_resolved": [1.0, 1.0, 0.0],
        "grad_variance": [1.0, 1.1, 1.2],
        "grad_norm": [0.5, 0.4, 0.3],
        "noise_std": [0.1, 0.09, 0.08],
    }
    path = plotting.plot_gradient_statistics(history, tmp_path / "p.png")
    figure = plt.gcf()
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    del figure
    # The panels, their scales: read back from the module's description.
    assert [p[0] for p in plotting.PANELS] == [
        "grad_noise_scale",
        "grad_snr",
        "grad_variance",
        "grad_norm",
        "noise_std",
    ]
    figure, axes = plt.subplots(2, 1)
    for axis, name in zip(axes, ("grad_snr", "grad_variance")):
        plotting._draw(
            axis, name, [1, 2, 3], history[name], {1: 1.0, 2: 1.0, 3: 0.0}
        )
    plt.close(figure)


def _advice_for(optimizer, micro_batch, probe=False):
    x, y, expected = linear_regression(micro_batch * 8 * 120, seed=5)
    model = frozen_linear_model(optimizer)
    monitor = kg.GradientVarianceMonitor(
        update_freq=8,
        probe_data=(x, y) if probe else None,
        probe_batches=32,
        batch_size=micro_batch,
        verbose=0,
    )
    model.fit(
        x, y, batch_size=micro_batch, epochs=1, verbose=0, callbacks=[monitor]
    )
    return monitor.advice_details, expected


@pytest.mark.slow
def test_runs_with_different_k_recommend_the_same_effective_batch():
    """B_simple = 11 samples (frozen linear regression): probing a Keras
    optimizer at K = 1, and measuring from our sums at K = 4 and K = 16,
    recommend effective batches within each other's stated ranges."""
    runs = [
        _advice_for(keras.optimizers.SGD(0.0), 16, probe=True),
        _advice_for(kg.SGD(0.0, accumulation_steps=4), 16),
        _advice_for(kg.SGD(0.0, accumulation_steps=16), 4),
    ]
    expected = runs[0][1]
    for advice, _ in runs:
        assert not advice.lower_bound_only
        assert advice.low <= expected * 1.25 and advice.high >= expected / 1.25
        assert "effective batch" in advice.text and "Confidence" in advice.text
    lows = [a.low for a, _ in runs]
    highs = [a.high for a, _ in runs]
    assert max(lows) <= min(highs) * 1.25  # the ranges agree
    recommended = [a.recommended_effective_batch for a, _ in runs]
    assert max(recommended) <= 2 * min(recommended)


def test_skipped_micro_batches_are_reported_in_an_ordinary_fit():
    x, y = digits(256)
    x = x.copy()
    x[40] = np.nan  # one sample poisons its micro-batch's gradient
    model = compiled_classifier(kg.Adam(1e-3, accumulation_steps=2))
    with pytest.warns(RuntimeWarning, match="1 micro-batch.*NaN or inf"):
        model.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0)
    assert int(model.optimizer.skipped_micro_batches.numpy()) == 1
    # Reported once: a second fit without new ones stays silent.
    x[40] = 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        model.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0)


@pytest.mark.slow
def test_the_monitor_reports_skips_per_epoch_and_in_the_logs():
    x, y = digits(256)
    x = x.copy()
    x[40] = np.nan
    model = compiled_classifier(kg.Adam(1e-3, accumulation_steps=2))
    monitor = kg.GradientVarianceMonitor(verbose=0)
    with pytest.warns(RuntimeWarning, match="In epoch 1, 1 micro-batch"):
        history = model.fit(
            x, y, batch_size=32, epochs=2, shuffle=False, verbose=0,
            callbacks=[monitor],
        )  # fmt: skip
    assert history.history["skipped_micro_batches"] == [1.0, 2.0]


def test_update_freq_in_batches_still_fills_history():
    x, y = digits(320)
    model = compiled_classifier(kg.Adam(1e-3, accumulation_steps=2))
    monitor = kg.GradientVarianceMonitor(update_freq=4, verbose=0)
    history = model.fit(
        x, y, batch_size=32, epochs=2, verbose=0, callbacks=[monitor]
    )
    assert len(history.history["grad_noise_scale"]) == 2
    # The epoch's value is its last measurement.
    assert history.history["grad_noise_scale"][-1] == pytest.approx(
        monitor.records[-1]["grad_noise_scale"]
    )


def test_statistics_accessors_agree_on_what_is_measured():
    variables = [keras.Variable(np.zeros(3, "float32"))]
    off = kg.SGD(0.1, accumulation_steps=2, noise_eta=0.01)
    off.build(variables)
    for method in (off.gradient_statistics, off.running_gradient_statistics):
        with pytest.raises(ValueError, match="track_gradient_statistics"):
            method()
    assert off.noise_std == pytest.approx(0.1)  # sqrt(0.01), t = 0
    on = kg.SGD(0.1, accumulation_steps=2, track_gradient_statistics=True)
    on.build(variables)
    assert all(np.isnan(float(v)) for v in on.gradient_statistics().values())
    assert np.isnan(float(on.running_gradient_statistics()["noise_scale"]))
    rng = np.random.default_rng(0)
    for _ in range(2):
        on.apply([rng.normal(size=3).astype("float32")], variables)
    assert np.isfinite(float(on.gradient_statistics()["variance"]))


@pytest.mark.slow
def test_switching_statistics_on_mid_cycle_starts_at_the_next_cycle():
    """The README's quickstart (K = 8) then its TensorBoard snippet. (With
    Adam's "micro" second moment the sums of squares it keeps complete the
    cycle's statistics exactly; SGD keeps none.)"""
    x, y = digits(320)
    model = compiled_classifier(kg.SGD(0.05, accumulation_steps=8))
    model.fit(x[:160], y[:160], batch_size=32, verbose=0)  # 5 micro-batches
    monitor = kg.GradientVarianceMonitor(update_freq=1, verbose=0)
    model.fit(
        x[:256], y[:256], batch_size=32, verbose=0, callbacks=[monitor]
    )  # 8 more: the cycle completes at the 3rd, then 5 into the next
    statistics = model.optimizer.gradient_statistics()
    # The first cycle's sums missed micro-batches: not measured.
    assert np.isnan(float(statistics["variance"]))
    model.fit(x[:96], y[:96], batch_size=32, verbose=0, callbacks=[monitor])
    assert np.isfinite(float(model.optimizer.gradient_statistics()["variance"]))


def test_a_diverging_update_rule_is_named_by_the_monitor():
    """Finite gradients, non-finite weights: the gradient check cannot see
    it; the monitor's look at the weights does."""
    x, y = digits(256)
    model = compiled_classifier(
        kg.wrap(keras.optimizers.Adafactor(), accumulation_steps=2)
    )
    monitor = kg.GradientVarianceMonitor(verbose=0)
    with pytest.warns(RuntimeWarning, match="hold NaN or inf.*update rule"):
        model.fit(x, y, batch_size=32, epochs=1, verbose=0, callbacks=[monitor])
    assert not np.isfinite(model.get_weights()[0]).all()


# What the README promises for the signal-to-noise ratio when no noise is
# measured: a finite cap, flagged, never an infinity.
README_SNR_CAP = 1e6


def test_zero_variance_is_reported_finite_and_flagged(tmp_path):
    """Every micro-batch the same sample: the gradients are identical, the
    variance 0. No infinity reaches History or TensorBoard."""
    from keras_gradtools.callbacks.summary_writer import read_events

    rng = np.random.default_rng(0)
    x = np.repeat(rng.normal(size=(1, D)).astype("float32"), 256, axis=0)
    y = np.ones((256, 1), "float32")
    model = frozen_linear_model(kg.SGD(0.0, accumulation_steps=4))
    monitor = kg.GradientVarianceMonitor(log_dir=str(tmp_path), verbose=0)
    history = model.fit(
        x, y, batch_size=16, epochs=2, verbose=0, callbacks=[monitor]
    )
    logged = history.history
    events = read_events(str(tmp_path))["gradients"]
    for series in (
        logged["grad_snr"],
        [float(v) for _, v in events["grad_snr"]],
        [float(v) for _, v in events["epoch_grad_snr"]],
    ):
        assert len(series) == 2
        assert all(np.isfinite(series)), series
        assert all(v == pytest.approx(README_SNR_CAP) for v in series)
    assert logged["grad_noise_resolved"] == [0.0, 0.0]
    assert [float(v) for _, v in events["grad_noise_resolved"]] == [0.0, 0.0]
    assert logged["grad_signal_resolved"] == [1.0, 1.0]
    for scale in logged["grad_noise_scale"]:
        assert 0.0 <= scale < 1.0  # no noise: not even one sample's worth
    for tag, values in events.items():
        assert all(np.all(np.isfinite(v)) for _, v in values), tag


def test_noise_is_flagged_resolved_in_an_ordinary_fit():
    x, y = digits(256)
    model = compiled_classifier(kg.Adam(1e-3, accumulation_steps=2))
    monitor = kg.GradientVarianceMonitor(verbose=0)
    history = model.fit(
        x, y, batch_size=32, epochs=1, verbose=0, callbacks=[monitor]
    )
    assert history.history["grad_noise_resolved"] == [1.0]
    assert 0 < history.history["grad_snr"][0] < README_SNR_CAP
    assert history.history["effective_batch"] == [64.0]


@pytest.mark.parametrize("bad", ["batchy", 0, -2, 1.5, True, None])
def test_update_freq_errors_name_every_accepted_value(bad):
    with pytest.raises(ValueError) as error:
        kg.GradientVarianceMonitor(update_freq=bad)
    message = str(error.value)
    for accepted in ("update_freq", '"epoch"', '"batch"', "integer N >= 1"):
        assert accepted in message
    assert repr(bad) in message


def test_update_freq_batch_measures_every_batch():
    x, y = digits(128)
    model = compiled_classifier(kg.Adam(1e-3, accumulation_steps=2))
    monitor = kg.GradientVarianceMonitor(update_freq="batch", verbose=0)
    model.fit(x, y, batch_size=32, epochs=1, verbose=0, callbacks=[monitor])
    assert monitor.update_freq == 1
    assert len(monitor.records) == 4  # 128 / 32 batches


def test_tensorboard_epoch_values_line_up_with_keras_epochs(tmp_path):
    """Keras's TensorBoard writes epoch curves at step = epoch (0-based);
    the monitor writes the epoch's values there too, as epoch_<tag>, and
    every measurement at step = updates."""
    from keras_gradtools.callbacks.summary_writer import read_events

    x, y = digits(256)
    model = compiled_classifier(kg.Adam(1e-3, accumulation_steps=2))
    monitor = kg.GradientVarianceMonitor(log_dir=str(tmp_path), verbose=0)
    history = model.fit(
        x, y, batch_size=32, epochs=3, verbose=0, callbacks=[monitor]
    )
    events = read_events(str(tmp_path))["gradients"]
    per_epoch = events["epoch_grad_noise_scale"]
    assert [step for step, _ in per_epoch] == [0, 1, 2]
    np.testing.assert_allclose(
        [float(v) for _, v in per_epoch],
        history.history["grad_noise_scale"],
        rtol=1e-6,
    )
    # 256 / 32 = 8 micro-batches per epoch, 4 updates.
    per_update = events["grad_noise_scale"]
    assert [step for step, _ in per_update] == [4, 8, 12]


def _plotted_figure(monkeypatch, history, tmp_path, **options):
    """Plots `history` and returns the figure (kept open)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    plotting.plot_gradient_statistics(history, tmp_path / "p.png", **options)
    monkeypatch.undo()
    plt.close(figures[0])
    return figures[0]


def _history(scale, variance, batch=256.0):
    return {
        "grad_noise_scale": [scale, 2 * scale, 3 * scale],
        "grad_snr": [2.0, 1.0, 0.5],
        "grad_signal_resolved": [1.0, 1.0, 1.0],
        "grad_variance": [variance, 0.5 * variance, 0.4 * variance],
        "grad_norm": [0.5, 0.4, 0.3],
        "effective_batch": [batch] * 3,
    }


def test_panels_in_fixed_units_have_fixed_ranges(monkeypatch, tmp_path):
    """The README: every panel has a fixed log scale, so pictures of
    different runs compare at a glance. The noise scale spans 1 to 1e5
    samples and the SNR 1e-3 to 1e3 whatever the run; the variance and the
    norm span a fixed number of decades."""
    one = _plotted_figure(monkeypatch, _history(40.0, 3.0), tmp_path)
    other = _plotted_figure(monkeypatch, _history(900.0, 0.002), tmp_path)
    for figure in (one, other):
        axes = figure.axes
        assert axes[0].get_ylim() == pytest.approx((1.0, 1e5))
        assert axes[1].get_ylim() == pytest.approx((1e-3, 1e3))
        low, high = axes[2].get_ylim()
        assert np.log10(high / low) == pytest.approx(4)
        low, high = axes[3].get_ylim()
        assert np.log10(high / low) == pytest.approx(3)
        for axis in axes:
            # No minor-tick labels cluttering the log axes.
            minor = [t.get_text() for t in axis.get_yticklabels(minor=True)]
            assert not any(minor), minor


def test_shared_limits_put_runs_on_the_same_ranges(monkeypatch, tmp_path):
    runs = [_history(40.0, 3.0), _history(900.0, 0.002)]
    limits = plotting.statistics_limits(*runs)
    ranges = [
        [
            axis.get_ylim()
            for axis in _plotted_figure(
                monkeypatch, run, tmp_path, limits=limits
            ).axes
        ]
        for run in runs
    ]
    assert ranges[0] == ranges[1]
    low, high = ranges[0][2]  # the variance panel holds both runs
    assert low <= 0.002 * 0.4 and high >= 3.0


def test_the_noise_scale_panel_draws_the_effective_batch(monkeypatch, tmp_path):
    figure = _plotted_figure(monkeypatch, _history(40.0, 3.0), tmp_path)
    axis = figure.axes[0]
    labels = axis.get_legend_handles_labels()[1]
    assert any(
        "effective batch" in label and "256" in label for label in labels
    )
    lines = [
        line for line in axis.get_lines() if "effective" in line.get_label()
    ]
    assert set(lines[0].get_ydata()) == {256.0}


def test_capped_snr_is_drawn_at_the_top_not_widening_the_range(
    monkeypatch, tmp_path
):
    history = _history(40.0, 3.0)
    history["grad_snr"] = [2.0, README_SNR_CAP, README_SNR_CAP]
    history["grad_noise_resolved"] = [1.0, 0.0, 0.0]
    figure = _plotted_figure(monkeypatch, history, tmp_path)
    axis = figure.axes[1]
    assert axis.get_ylim() == pytest.approx((1e-3, 1e3))
    labels = axis.get_legend_handles_labels()[1]
    assert labels == ["above float32 resolution (no noise)"]


def test_plotting_without_matplotlib_names_the_extra(monkeypatch, tmp_path):
    import sys

    for name in [m for m in sys.modules if m.startswith("matplotlib")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ModuleNotFoundError, match=r"keras-gradtools\[plot\]"):
        plotting.plot_gradient_statistics(
            _history(40.0, 3.0), tmp_path / "p.png"
        )
