"""A picture of the gradient statistics over training.

Every panel has a logarithmic y-axis over whole decades, so that pictures
of different runs compare at a glance:

- the quantities in fixed units have a fixed range: the noise scale
  1 to 1e5 samples, the signal-to-noise ratio 1e-3 to 1e3;
- the quantities whose units depend on the model and the loss (the
  variance, the mean gradient's norm, the injected noise) span a fixed
  number of decades (`DECADES`), placed where the run's values are, so
  that slopes compare; pass `limits` (e.g. from `statistics_limits` over
  several runs) to put several pictures on the same ranges.

A range widens by whole decades only where values fall outside it.

Points where something was not resolved are drawn, not dropped: where the
signal was below the noise, the noise scale is a lower bound (hollow upward
triangles) and the signal-to-noise ratio is below what can be measured
(hollow downward triangles at the bottom of its panel); where no noise was
measured, the ratio is above what float32 sums resolve (hollow upward
triangles at the top of its panel) and the noise scale is 0 (drawn at the
bottom). The noise-scale panel also draws the run's effective batch K x M
(dashed), what the advice compares B_simple with.
"""

import math
import os
from typing import Any

# (tag, panel title, y-axis label)
PANELS = (
    (
        "grad_noise_scale",
        "Gradient noise scale B_simple (batch sizes below it are noise-bound)",
        "samples",
    ),
    (
        "grad_snr",
        "Signal-to-noise ratio of the update's mean gradient",
        "|E g|² / (tr Σ / K)",
    ),
    (
        "grad_variance",
        "Gradient variance: tr Σ of one micro-batch gradient",
        "tr Σ",
    ),
    ("grad_norm", "Norm of the mean gradient |ḡ|", "|ḡ|"),
    ("noise_std", "Injected noise σ_t", "σ_t"),
)
RESOLVED = "grad_signal_resolved"
NOISE_RESOLVED = "grad_noise_resolved"
EFFECTIVE_BATCH = "effective_batch"
# Fixed ranges (powers of ten) of the panels in fixed units.
FIXED_RANGES = {"grad_noise_scale": (0, 5), "grad_snr": (-3, 3)}
# Decades spanned by the panels whose units depend on the model.
DECADES = {"grad_variance": 4, "grad_norm": 3, "noise_std": 3}


def plot_gradient_statistics(
    history_or_logdir: Any,
    path: str | os.PathLike,
    title: str | None = None,
    limits: dict[str, tuple[float, float]] | None = None,
) -> str | os.PathLike:
    """Writes a PNG of the gradient statistics over training.

    Panels: noise scale (with the effective batch K x M as a dashed line),
    signal-to-noise ratio, variance, mean-gradient norm and (when noise is
    on) the injected noise's σ_t, each on a log scale over whole decades:
    fixed ranges for the noise scale (1 to 1e5 samples) and the
    signal-to-noise ratio (1e-3 to 1e3), a fixed number of decades placed
    at the run's values for the others; widened only where values fall
    outside.

    Args:
        history_or_logdir: A `keras.callbacks.History` (or its `.history`
            dict) from a fit with `GradientVarianceMonitor`, or the
            monitor's `log_dir` (its TensorBoard event files are read).
        path: Where to write the PNG.
        title: Optional figure title.
        limits: Optional dict mapping panel tags (`"grad_noise_scale"`,
            `"grad_snr"`, `"grad_variance"`, `"grad_norm"`, `"noise_std"`)
            to `(low, high)` y-ranges, e.g. `statistics_limits(...)` of
            several runs, so that their pictures share ranges. Values
            outside still widen the range.

    Returns:
        `path`.

    Example:

    >>> history = model.fit(..., callbacks=[GradientVarianceMonitor("logs")])
    >>> plot_gradient_statistics(history, "gradient_statistics.png")
    """
    plt, ticker = _matplotlib()
    series, x_label = _series(history_or_logdir)
    if not any(name in series for name, _, _ in PANELS[:3]):
        raise ValueError(
            "No gradient statistics found: fit with a GradientVarianceMonitor "
            "(tags grad_noise_scale, grad_snr, grad_variance)."
        )
    ranges = statistics_limits(series)
    for name, (low, high) in (limits or {}).items():
        if name in ranges:
            # The given range, widened only to hold this run's values.
            ranges[name] = statistics_limits(
                {name: ([0, 1], [low, high])}, series
            )[name]
    panels = [p for p in PANELS if p[0] != "noise_std" or p[0] in series]
    figure, axes = plt.subplots(
        len(panels),
        1,
        figsize=(8, 2.2 * len(panels) + 0.6),
        sharex=True,
        constrained_layout=True,
    )
    resolved = dict(zip(*series.get(RESOLVED, ([], []))))
    noise_resolved = dict(zip(*series.get(NOISE_RESOLVED, ([], []))))
    for axis, (name, panel_title, y_label) in zip(axes, panels):
        steps, values = series.get(name, ([], []))
        axis.set_yscale("log")
        axis.set_ylim(*ranges[name])
        _draw(axis, name, steps, values, resolved, noise_resolved)
        if name == "grad_noise_scale" and EFFECTIVE_BATCH in series:
            _draw_effective_batch(axis, *series[EFFECTIVE_BATCH])
        axis.set_ylim(*ranges[name])
        axis.yaxis.set_major_locator(ticker.LogLocator(base=10, numticks=8))
        axis.yaxis.set_minor_formatter(ticker.NullFormatter())
        axis.set_title(panel_title, fontsize=10, loc="left")
        axis.set_ylabel(y_label, fontsize=9)
        axis.grid(True, which="both", alpha=0.3)
    axes[-1].set_xlabel(x_label)
    axes[-1].xaxis.get_major_locator().set_params(integer=True)
    figure.suptitle(title or "Gradient statistics (keras_gradtools)")
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def statistics_limits(*runs: Any) -> dict[str, tuple[float, float]]:
    """The y-ranges that hold the statistics of all `runs`, per panel.

    Args:
        *runs: `keras.callbacks.History` objects, their `.history` dicts or
            monitors' `log_dir`s (or the series this module reads from
            them).

    Returns:
        A dict mapping each panel's tag to `(low, high)`, whole powers of
        ten: the fixed range where the panel has one, else `DECADES` decades
        ending at the decade above the largest value, widened to hold every
        value. Pass it to `plot_gradient_statistics(..., limits=...)`.

    Example:

    >>> limits = statistics_limits(history_a, history_b)
    >>> plot_gradient_statistics(history_a, "a.png", limits=limits)
    >>> plot_gradient_statistics(history_b, "b.png", limits=limits)
    """
    values = {name: [] for name, _, _ in PANELS}
    for run in runs:
        series = run if _is_series(run) else _series(run)[0]
        for name in values:
            sources = [name] + (
                [EFFECTIVE_BATCH] if name == "grad_noise_scale" else []
            )
            for source in sources:
                values[name] += [
                    v
                    for v in series.get(source, ([], []))[1]
                    if math.isfinite(v) and v > 0
                ]
    # The SNR's cap (no noise measured) is drawn at the top edge: it does
    # not widen the range.
    from keras_gradtools.callbacks.gradient_variance_monitor import SNR_LIMIT

    values["grad_snr"] = [v for v in values["grad_snr"] if v < SNR_LIMIT]
    ranges = {}
    for name, found in values.items():
        if name in FIXED_RANGES:
            low, high = FIXED_RANGES[name]
        elif found:
            high = math.ceil(math.log10(max(found)))
            low = high - DECADES[name]
        else:
            low, high = -DECADES[name], 0
        if found:
            low = min(low, math.floor(math.log10(min(found))))
            high = max(high, math.ceil(math.log10(max(found))))
        ranges[name] = (10.0**low, 10.0**high)
    return ranges


def _is_series(run):
    return isinstance(run, dict) and all(
        isinstance(v, tuple) and len(v) == 2 for v in run.values()
    )


def _matplotlib():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib import ticker
    except ImportError as error:
        raise ModuleNotFoundError(
            "plot_gradient_statistics needs matplotlib, which is not "
            'installed: pip install "keras-gradtools[plot]" (from a '
            'checkout: pip install -e ".[plot]")',
            name="matplotlib",
        ) from error
    return plt, ticker


def _series(history_or_logdir):
    """`({tag: (steps, values)}, x-axis label)`."""
    names = [p[0] for p in PANELS] + [RESOLVED, NOISE_RESOLVED, EFFECTIVE_BATCH]
    if isinstance(history_or_logdir, (str, os.PathLike)):
        return _from_logdir(os.fspath(history_or_logdir), names), (
            "optimizer updates"
        )
    history = getattr(history_or_logdir, "history", history_or_logdir)
    series = {
        name: (list(range(1, len(history[name]) + 1)), list(history[name]))
        for name in names
        if name in history
    }
    return series, "epoch"


def _draw(axis, name, steps, values, resolved, noise_resolved=None):
    noise_resolved = noise_resolved or {}
    points = [
        (s, v, resolved.get(s, 1.0) == 1.0, noise_resolved.get(s, 1.0) == 1.0)
        for s, v in zip(steps, values)
        if math.isfinite(v)
    ]
    if not points:
        axis.text(
            0.5,
            0.5,
            "not measured",
            ha="center",
            va="center",
            transform=axis.transAxes,
        )
        return
    bottom, top = axis.get_ylim()
    xs = [s for s, _, _, _ in points]
    ys = [min(max(v, bottom), top) for _, v, _, _ in points]
    axis.plot(xs, ys, color="C0", linewidth=1, zorder=1)
    kinds = {"good": [], "signal": [], "noise": []}
    for x, y, (_, _, signal_ok, noise_ok) in zip(xs, ys, points):
        if name in ("grad_noise_scale", "grad_snr") and not noise_ok:
            kinds["noise"].append((x, y))
        elif name in ("grad_noise_scale", "grad_snr") and not signal_ok:
            kinds["signal"].append((x, y))
        else:
            kinds["good"].append((x, y))
    if kinds["good"]:
        axis.scatter(*zip(*kinds["good"]), s=12, color="C0", zorder=2)
    markers = {
        ("grad_noise_scale", "signal"): (
            "^",
            "lower bound: signal below the noise",
        ),
        ("grad_snr", "signal"): ("v", "not resolved (signal below the noise)"),
        ("grad_noise_scale", "noise"): ("v", "no noise measured (0)"),
        ("grad_snr", "noise"): ("^", "above float32 resolution (no noise)"),
    }
    for kind in ("signal", "noise"):
        if kinds[kind]:
            marker, label = markers[(name, kind)]
            axis.scatter(
                *zip(*kinds[kind]),
                s=36,
                marker=marker,
                facecolors="none",
                edgecolors="C3" if kind == "signal" else "C1",
                zorder=3,
                label=label,
            )
    if kinds["signal"] or kinds["noise"]:
        axis.legend(fontsize=8, loc="best")


def _draw_effective_batch(axis, steps, values):
    points = [(s, v) for s, v in zip(steps, values) if math.isfinite(v)]
    if not points:
        return
    axis.step(
        *zip(*points),
        where="post",
        color="C2",
        linestyle="--",
        linewidth=1.2,
        zorder=1,
        label=f"your effective batch K·M ({points[-1][1]:.0f})",
    )
    axis.legend(fontsize=8, loc="best")


def _from_logdir(log_dir, names):
    from keras_gradtools.callbacks.summary_writer import read_events

    series = {}
    for tags in read_events(log_dir).values():
        for name in names:
            if name in tags:
                events = tags[name]
                series[name] = (
                    [step for step, _ in events],
                    [float(value) for _, value in events],
                )
    return series
