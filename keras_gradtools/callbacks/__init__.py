"""Callbacks: the gradient-variance monitor, its probe and advice, and the
batch-size policies (noise-scale control, schedules, Seesaw)."""

from keras_gradtools.callbacks.adaptive_accumulation import AdaptiveAccumulation
from keras_gradtools.callbacks.advice import BatchSizeAdvice
from keras_gradtools.callbacks.batch_size_schedule import BatchSizeSchedule
from keras_gradtools.callbacks.batch_size_schedule import Seesaw
from keras_gradtools.callbacks.gradient_variance_monitor import (
    GradientVarianceMonitor,
)
from keras_gradtools.callbacks.probe import GradientProbe

__all__ = [
    "AdaptiveAccumulation",
    "BatchSizeAdvice",
    "BatchSizeSchedule",
    "GradientProbe",
    "GradientVarianceMonitor",
    "Seesaw",
]
