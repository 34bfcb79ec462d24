"""A picture of the gradient statistics over training."""

import math
import os
from typing import Any

# (tag, panel title, y-axis label)
PANELS = (
    (
        "grad_variance",
        "Gradient variance: tr Σ of one micro-batch gradient",
        "tr Σ  (squared gradient units)",
    ),
    (
        "grad_snr",
        "Signal-to-noise ratio of the update's mean gradient",
        "|E g|² / (tr Σ / K)",
    ),
    (
        "grad_noise_scale",
        "Gradient noise scale B_simple (batch sizes below it are noise-bound)",
        "samples",
    ),
)


def plot_gradient_statistics(
    history_or_logdir: Any,
    path: str | os.PathLike,
    title: str | None = None,
) -> str | os.PathLike:
    """Writes a PNG of gradient variance, SNR and noise scale over training.

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
            for name, _, _ in PANELS
            if name in history
        }
        x_label = "epoch"
    if not series:
        raise ValueError(
            "No gradient statistics found: fit with a GradientVarianceMonitor "
            "(tags grad_variance, grad_snr, grad_noise_scale)."
        )
    figure, axes = plt.subplots(
        len(PANELS), 1, figsize=(8, 8), sharex=True, constrained_layout=True
    )
    for axis, (name, panel_title, y_label) in zip(axes, PANELS):
        steps, values = series.get(name, ([], []))
        finite = [(s, v) for s, v in zip(steps, values) if math.isfinite(v)]
        if finite:
            xs, ys = zip(*finite)
            axis.plot(xs, ys, marker="o", markersize=3)
            if min(ys) > 0 and max(ys) / min(ys) > 20:
                axis.set_yscale("log")
        else:
            axis.text(
                0.5,
                0.5,
                "not measured",
                ha="center",
                va="center",
                transform=axis.transAxes,
            )
        axis.set_title(panel_title, fontsize=10, loc="left")
        axis.set_ylabel(y_label, fontsize=9)
        axis.grid(True, which="both", alpha=0.3)
    axes[-1].set_xlabel(x_label)
    axes[-1].xaxis.get_major_locator().set_params(integer=True)
    figure.suptitle(title or "Gradient statistics (keras_gradtools)")
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def _from_logdir(log_dir):
    from tensorboard.backend.event_processing import event_accumulator

    series = {}
    for root, _, files in os.walk(log_dir):
        if not any(".tfevents." in f for f in files):
            continue
        accumulator = event_accumulator.EventAccumulator(
            root, size_guidance={event_accumulator.TENSORS: 0}
        )
        accumulator.Reload()
        for name, _, _ in PANELS:
            if name in accumulator.Tags().get("tensors", []):
                events = accumulator.Tensors(name)
                series[name] = (
                    [e.step for e in events],
                    [float(_scalar(e.tensor_proto)) for e in events],
                )
    return series


def _scalar(tensor_proto):
    import tensorflow as tf

    return tf.make_ndarray(tensor_proto).item()
