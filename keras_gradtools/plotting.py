"""A picture of the gradient statistics over training.

Every panel has a fixed logarithmic y-axis, so that pictures of different
runs compare at a glance (all quantities are positive and span decades).
Points where the signal was not resolved above the noise are drawn, not
dropped: the noise scale there is a lower bound (hollow upward triangles),
the signal-to-noise ratio is below what can be measured (drawn at the
bottom of its panel as hollow downward triangles).
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


def plot_gradient_statistics(
    history_or_logdir: Any,
    path: str | os.PathLike,
    title: str | None = None,
) -> str | os.PathLike:
    """Writes a PNG of the gradient statistics over training.

    Panels: noise scale, signal-to-noise ratio, variance, mean-gradient norm
    and (when noise is on) the injected noise's σ_t, each on a log scale.

    Args:
        history_or_logdir: A `keras.callbacks.History` (or its `.history`
            dict) from a fit with `GradientVarianceMonitor`, or the
            monitor's `log_dir` (its TensorBoard event files are read).
        path: Where to write the PNG.
        title: Optional figure title.

    Returns:
        `path`.

    Example:

    >>> history = model.fit(..., callbacks=[GradientVarianceMonitor("logs")])
    >>> plot_gradient_statistics(history, "gradient_statistics.png")
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:  # pragma: no cover - optional dependency
        raise ImportError(
            "plot_gradient_statistics needs matplotlib: "
            "pip install 'keras-gradtools[plot]'"
        ) from error
    if isinstance(history_or_logdir, (str, os.PathLike)):
        series = _from_logdir(os.fspath(history_or_logdir))
        x_label = "optimizer updates"
    else:
        history = getattr(history_or_logdir, "history", history_or_logdir)
        series = {
            name: (list(range(1, len(history[name]) + 1)), list(history[name]))
            for name in [p[0] for p in PANELS] + [RESOLVED]
            if name in history
        }
        x_label = "epoch"
    if not any(name in series for name, _, _ in PANELS[:3]):
        raise ValueError(
            "No gradient statistics found: fit with a GradientVarianceMonitor "
            "(tags grad_noise_scale, grad_snr, grad_variance)."
        )
    panels = [p for p in PANELS if p[0] != "noise_std" or p[0] in series]
    figure, axes = plt.subplots(
        len(panels),
        1,
        figsize=(8, 2.2 * len(panels) + 0.6),
        sharex=True,
        constrained_layout=True,
    )
    resolved = dict(zip(*series.get(RESOLVED, ([], []))))
    for axis, (name, panel_title, y_label) in zip(axes, panels):
        steps, values = series.get(name, ([], []))
        _draw(axis, name, steps, values, resolved)
        axis.set_yscale("log")
        axis.set_title(panel_title, fontsize=10, loc="left")
        axis.set_ylabel(y_label, fontsize=9)
        axis.grid(True, which="both", alpha=0.3)
    axes[-1].set_xlabel(x_label)
    axes[-1].xaxis.get_major_locator().set_params(integer=True)
    figure.suptitle(title or "Gradient statistics (keras_gradtools)")
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def _draw(axis, name, steps, values, resolved):
    points = [
        (s, v, resolved.get(s, 1.0) == 1.0)
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
    xs = [s for s, _, _ in points]
    positive = [v for _, v, _ in points if v > 0]
    floor = min(positive) if positive else 1.0
    ys = [v if v > 0 else floor for _, v, _ in points]
    axis.plot(xs, ys, color="C0", linewidth=1, zorder=1)
    good = [(x, y) for (x, y), (_, _, ok) in zip(zip(xs, ys), points) if ok]
    bad = [(x, y) for (x, y), (_, _, ok) in zip(zip(xs, ys), points) if not ok]
    if good:
        axis.scatter(*zip(*good), s=12, color="C0", zorder=2)
    if bad and name in ("grad_noise_scale", "grad_snr"):
        label = (
            "lower bound: signal below the noise"
            if name == "grad_noise_scale"
            else "not resolved (signal below the noise)"
        )
        marker = "^" if name == "grad_noise_scale" else "v"
        axis.scatter(
            *zip(*bad),
            s=36,
            marker=marker,
            facecolors="none",
            edgecolors="C3",
            zorder=3,
            label=label,
        )
        axis.legend(fontsize=8, loc="best")
    elif bad:
        axis.scatter(*zip(*bad), s=12, color="C0", zorder=2)


def _from_logdir(log_dir):
    from keras_gradtools.callbacks.summary_writer import read_events

    names = [p[0] for p in PANELS] + [RESOLVED]
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
