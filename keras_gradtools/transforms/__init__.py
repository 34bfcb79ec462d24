"""Pure tensor functions of the gradient pipeline, written with `keras.ops`.

Each function here maps tensors to tensors and owns no state, so it can be
checked line by line against the formulas in DESIGN.md and against the
float64 NumPy twins in `tests/numpy_reference.py`.
"""

from keras_gradtools.transforms.accumulation import micro_batch_variance
from keras_gradtools.transforms.accumulation import micro_second_moment_input
from keras_gradtools.transforms.clipping import clip_gradients
from keras_gradtools.transforms.clipping import flat_sum
from keras_gradtools.transforms.clipping import global_norm
from keras_gradtools.transforms.noise import gaussian_noise_like
from keras_gradtools.transforms.noise import noise_std
from keras_gradtools.transforms.statistics import gradient_statistics_from_sums
from keras_gradtools.transforms.statistics import noise_scale_and_snr
from keras_gradtools.transforms.statistics import variance_and_square_norm
from keras_gradtools.transforms.threefry import standard_normal
from keras_gradtools.transforms.threefry import threefry2x32

__all__ = [
    "clip_gradients",
    "flat_sum",
    "gaussian_noise_like",
    "global_norm",
    "gradient_statistics_from_sums",
    "micro_batch_variance",
    "micro_second_moment_input",
    "noise_scale_and_snr",
    "noise_std",
    "standard_normal",
    "threefry2x32",
    "variance_and_square_norm",
]
