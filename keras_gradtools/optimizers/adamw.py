"""AdamW: Adam with decoupled weight decay."""

from typing import Any

from keras_gradtools.optimizers.adam import Adam
from keras_gradtools.pipeline import arguments
from keras_gradtools.registration import register
from keras_gradtools.types import LearningRate
from keras_gradtools.types import SecondMoment


@register
class AdamW(Adam):
    """AdamW (Loshchilov and Hutter, 2019) with accumulation, clipping, noise.

    Adam whose weight decay is decoupled from the gradient: once per update,
    before the Adam step, `w = w - learning_rate * weight_decay * w`. With
    `accumulation_steps=1` and no noise this is exactly
    `keras.optimizers.AdamW`. When a batch-size policy changes K, the
    decay is multiplied by `weight_decay_factor` (state, 1 until then), so
    that AdamW's timescale B / (learning_rate * weight_decay) stays
    constant (Bergsma et al., 2025; `BatchSizeSchedule`).

    Args:
        learning_rate: A float, a `LearningRateSchedule` (evaluated on
            updates) or a callable. Defaults to 0.001.
        weight_decay: Float >= 0, defaults to 0.004.
        beta_1, beta_2, epsilon, amsgrad, second_moment: As for
            `keras_gradtools.Adam`.
        {{pipeline_keyword_args}}
        **kwargs: `keras.optimizers.Optimizer` arguments.

    Example:

    >>> opt = keras_gradtools.AdamW(1e-3, weight_decay=0.01,
    ...                             accumulation_steps=4)
    """

    def __init__(
        self,
        learning_rate: LearningRate = 0.001,
        weight_decay: float = 0.004,
        beta_1: float = 0.9,
        beta_2: float = 0.999,
        epsilon: float = 1e-7,
        amsgrad: bool = False,
        second_moment: SecondMoment = "macro",
        name: str | None = None,
        **kwargs: Any,
    ) -> None:
        if weight_decay is None:
            raise ValueError(
                "`weight_decay` must be a float >= 0 for AdamW (use Adam for "
                "no weight decay). Received: weight_decay=None"
            )
        super().__init__(
            learning_rate=learning_rate,
            beta_1=beta_1,
            beta_2=beta_2,
            epsilon=epsilon,
            amsgrad=amsgrad,
            second_moment=second_moment,
            name=name,
            weight_decay=weight_decay,
            **kwargs,
        )


arguments.declare_arguments(AdamW)
