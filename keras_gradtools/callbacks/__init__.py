"""Callbacks: the gradient-variance monitor and its probe."""

from keras_gradtools.callbacks.gradient_variance_monitor import (
    GradientVarianceMonitor,
)
from keras_gradtools.callbacks.probe import GradientProbe

__all__ = ["GradientProbe", "GradientVarianceMonitor"]
