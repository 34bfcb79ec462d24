"""Type aliases of the public API."""

from collections.abc import Callable
from typing import Any
from typing import Literal

import keras

# A float, a Keras schedule (evaluated on updates) or a callable.
LearningRate = (
    float | keras.optimizers.schedules.LearningRateSchedule | Callable[[], Any]
)
SecondMoment = Literal["micro", "macro"]
NonfinitePolicy = Literal["skip", "apply", "raise"]
# Whatever `keras.ops` accepts: backend tensors, keras.Variables, arrays.
TensorLike = Any
