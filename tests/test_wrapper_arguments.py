"""`wrap(...)`: the arguments of the update rule go to the inner optimizer,
and what Keras lets a user set on an optimizer reaches it."""

import keras
import numpy as np
import pytest
from keras import ops

import keras_gradtools as kg


@pytest.mark.parametrize(
    "argument", ["weight_decay", "learning_rate", "use_ema", "ema_momentum"]
)
def test_rule_arguments_say_they_belong_to_the_inner_optimizer(argument):
    with pytest.raises(TypeError) as error:
        kg.wrap(keras.optimizers.AdamW(), **{argument: 0.5})
    message = str(error.value)
    assert f"`{argument}`" in message
    assert "inner optimizer" in message
    assert f"keras.optimizers.AdamW({argument}=0.5)" in message


def test_unknown_argument_lists_the_accepted_ones():
    with pytest.raises(TypeError, match="accumulation_steps, max_accum"):
        kg.wrap(keras.optimizers.SGD(), accumulate=4)


@pytest.mark.parametrize("how", ["var_names", "var_list"])
def test_exclude_from_weight_decay_reaches_the_inner_optimizer(how):
    kernel = keras.Variable(np.ones((2, 2), "float32"), name="kernel")
    bias = keras.Variable(np.ones((2,), "float32"), name="bias")
    inner = keras.optimizers.AdamW(learning_rate=0.5, weight_decay=0.1)
    optimizer = kg.wrap(inner, accumulation_steps=2)
    if how == "var_names":
        optimizer.exclude_from_weight_decay(var_names=["bias"])
    else:
        optimizer.exclude_from_weight_decay(var_list=[bias])
    zeros = [ops.zeros((2, 2)), ops.zeros((2,))]
    for _ in range(2):
        optimizer.apply(zeros, [kernel, bias])
    # One update: decay multiplies by 1 - lr * wd = 0.95; the bias is exempt.
    np.testing.assert_allclose(ops.convert_to_numpy(kernel), 0.95, rtol=1e-6)
    np.testing.assert_array_equal(ops.convert_to_numpy(bias), 1.0)
