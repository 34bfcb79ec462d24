"""The optimizers: one module per update rule, the pipeline base and the
wrapper for any other Keras optimizer."""

from keras_gradtools.optimizers.adam import Adam
from keras_gradtools.optimizers.adamw import AdamW
from keras_gradtools.optimizers.base import GradientPipelineOptimizer
from keras_gradtools.optimizers.sgd import SGD
from keras_gradtools.optimizers.wrapper import GradientPipelineWrapper
from keras_gradtools.optimizers.wrapper import wrap

__all__ = [
    "Adam",
    "AdamW",
    "GradientPipelineOptimizer",
    "GradientPipelineWrapper",
    "SGD",
    "wrap",
]
