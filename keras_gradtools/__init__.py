"""keras_gradtools: gradient accumulation, annealed noise, clipping and
gradient-variance monitoring for Keras 3 optimizers."""

from keras_gradtools.callbacks import GradientVarianceMonitor
from keras_gradtools.optimizers import SGD
from keras_gradtools.optimizers import Adam
from keras_gradtools.optimizers import AdamW
from keras_gradtools.optimizers import GradientPipelineOptimizer
from keras_gradtools.optimizers import GradientPipelineWrapper
from keras_gradtools.optimizers import wrap
from keras_gradtools.plotting import plot_gradient_statistics

__version__ = "0.1.0"

__all__ = [
    "Adam",
    "AdamW",
    "GradientPipelineOptimizer",
    "GradientPipelineWrapper",
    "GradientVarianceMonitor",
    "SGD",
    "__version__",
    "plot_gradient_statistics",
    "wrap",
]
