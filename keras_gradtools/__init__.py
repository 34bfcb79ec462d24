"""keras_gradtools: gradient accumulation, annealed noise, clipping and
gradient-variance monitoring for Keras 3 optimizers, on TensorFlow and JAX.
"""

from keras_gradtools.backends import check_supported as _check_supported
from keras_gradtools.version import __version__

_check_supported()

from keras_gradtools import distribute  # noqa: E402
from keras_gradtools.callbacks import AdaptiveAccumulation  # noqa: E402
from keras_gradtools.callbacks import BatchSizeSchedule  # noqa: E402
from keras_gradtools.callbacks import GradientVarianceMonitor  # noqa: E402
from keras_gradtools.callbacks import Seesaw  # noqa: E402
from keras_gradtools.exact_accumulation import exact_accumulation  # noqa: E402
from keras_gradtools.exact_accumulation import loss_count  # noqa: E402
from keras_gradtools.optimizers import SGD  # noqa: E402
from keras_gradtools.optimizers import Adam  # noqa: E402
from keras_gradtools.optimizers import AdamW  # noqa: E402
from keras_gradtools.optimizers import GradientPipelineOptimizer  # noqa: E402
from keras_gradtools.optimizers import GradientPipelineWrapper  # noqa: E402
from keras_gradtools.optimizers import wrap  # noqa: E402
from keras_gradtools.plotting import plot_gradient_statistics  # noqa: E402

__all__ = [
    "AdaptiveAccumulation",
    "Adam",
    "AdamW",
    "BatchSizeSchedule",
    "GradientPipelineOptimizer",
    "GradientPipelineWrapper",
    "GradientVarianceMonitor",
    "SGD",
    "Seesaw",
    "__version__",
    "distribute",
    "exact_accumulation",
    "loss_count",
    "plot_gradient_statistics",
    "wrap",
]
