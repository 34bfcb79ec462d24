"""Pure tensor functions of the gradient pipeline, written with `keras.ops`.

Each function here maps tensors to tensors and owns no state, so it can be
checked line by line against the formulas in docs/design.md and against the
float64 NumPy twins in `tests/numpy_reference.py`, on every backend.
"""

from keras_gradtools.transforms.accumulation import micro_batch_variance
from keras_gradtools.transforms.accumulation import micro_second_moment_input
from keras_gradtools.transforms.accumulation import restart_or_add
from keras_gradtools.transforms.accumulation import restart_or_maximum
from keras_gradtools.transforms.clipping import clip_gradients
from keras_gradtools.transforms.clipping import needs_square_norms
from keras_gradtools.transforms.noise import gaussian_noise
from keras_gradtools.transforms.noise import noise_std
from keras_gradtools.transforms.reductions import all_finite
from keras_gradtools.transforms.reductions import blocked_sum
from keras_gradtools.transforms.reductions import flat_sum
from keras_gradtools.transforms.reductions import global_norm
from keras_gradtools.transforms.reductions import square_norms
from keras_gradtools.transforms.reductions import total
from keras_gradtools.transforms.statistics import gradient_statistics_from_sums
from keras_gradtools.transforms.statistics import micro_batch_variance_from_sums
from keras_gradtools.transforms.statistics import noise_scale_and_snr
from keras_gradtools.transforms.statistics import smoothed
from keras_gradtools.transforms.threefry import standard_normal
from keras_gradtools.transforms.threefry import threefry2x32

__all__ = [
    "all_finite",
    "blocked_sum",
    "clip_gradients",
    "flat_sum",
    "gaussian_noise",
    "global_norm",
    "gradient_statistics_from_sums",
    "micro_batch_variance",
    "micro_batch_variance_from_sums",
    "micro_second_moment_input",
    "needs_square_norms",
    "noise_scale_and_snr",
    "noise_std",
    "restart_or_add",
    "restart_or_maximum",
    "smoothed",
    "square_norms",
    "standard_normal",
    "threefry2x32",
    "total",
]
