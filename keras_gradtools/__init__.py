"""keras_gradtools: gradient accumulation, annealed noise, clipping and
gradient-variance monitoring for Keras 3 optimizers."""

from keras_gradtools.optimizers import SGD
from keras_gradtools.optimizers import Adam
from keras_gradtools.optimizers import AdamW
from keras_gradtools.optimizers import GradientPipelineOptimizer
from keras_gradtools.optimizers import GradientPipelineWrapper
from keras_gradtools.optimizers import wrap

__version__ = "0.1.0"

__all__ = [
    "Adam",
    "AdamW",
    "GradientPipelineOptimizer",
    "GradientPipelineWrapper",
    "SGD",
    "__version__",
    "wrap",
]
