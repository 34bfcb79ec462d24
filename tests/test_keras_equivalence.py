"""Where the maths coincides, ours equals Keras's own optimizers.

K = 1 without noise must reproduce `keras.optimizers.SGD/Adam/AdamW` to
float32 rounding; Adam with K micro-batches in "macro" mode must equal Keras
Adam fed the mean of each K micro-gradients; a wrapped optimizer must equal
its inner optimizer fed the same means.
"""

import keras
import numpy as np
import pytest
from helpers import copy_variables
from helpers import make_variables
from helpers import max_abs_difference
from helpers import random_gradients
from helpers import values

import keras_gradtools as kg

FLOAT32_ROUNDING = 2e-6

PAIRS = {
    "sgd": (
        lambda **kw: kg.SGD(0.1, **kw),
        lambda **kw: keras.optimizers.SGD(0.1, **kw),
    ),
    "sgd_momentum": (
        lambda **kw: kg.SGD(0.1, momentum=0.9, **kw),
        lambda **kw: keras.optimizers.SGD(0.1, momentum=0.9, **kw),
    ),
    "sgd_nesterov": (
        lambda **kw: kg.SGD(0.1, momentum=0.9, nesterov=True, **kw),
        lambda **kw: keras.optimizers.SGD(
            0.1, momentum=0.9, nesterov=True, **kw
        ),
    ),
    "adam": (
        lambda **kw: kg.Adam(0.05, **kw),
        lambda **kw: keras.optimizers.Adam(0.05, **kw),
    ),
    "adam_amsgrad": (
        lambda **kw: kg.Adam(0.05, amsgrad=True, **kw),
        lambda **kw: keras.optimizers.Adam(0.05, amsgrad=True, **kw),
    ),
    "adamw": (
        lambda **kw: kg.AdamW(0.05, weight_decay=0.1, **kw),
        lambda **kw: keras.optimizers.AdamW(0.05, weight_decay=0.1, **kw),
    ),
}

CLIPS = [{}, {"clipvalue": 0.5}, {"clipnorm": 1.0}, {"global_clipnorm": 1.5}]


def _train(optimizer, variables, gradients):
    for grads in gradients:
        optimizer.apply(grads, variables)
    return values(variables)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(PAIRS))
@pytest.mark.parametrize("clip", CLIPS, ids=lambda c: next(iter(c), "none"))
def test_k1_without_noise_equals_keras(name, clip, rng):
    ours_factory, keras_factory = PAIRS[name]
    variables = make_variables(rng)
    gradients = [random_gradients(rng, variables, 2.0) for _ in range(5)]
    ours = _train(ours_factory(**clip), copy_variables(variables), gradients)
    reference = _train(
        keras_factory(**clip), copy_variables(variables), gradients
    )
    assert max_abs_difference(ours, reference) < FLOAT32_ROUNDING
    assert max_abs_difference(ours, values(variables)) > 1e-3


@pytest.mark.parametrize("jit_compile", [True, False])
def test_k1_equals_keras_with_and_without_xla(jit_compile, rng):
    variables = make_variables(rng)
    gradients = [random_gradients(rng, variables) for _ in range(4)]
    ours = _train(
        kg.Adam(0.05, jit_compile=jit_compile),
        copy_variables(variables),
        gradients,
    )
    reference = _train(
        keras.optimizers.Adam(0.05), copy_variables(variables), gradients
    )
    assert max_abs_difference(ours, reference) < FLOAT32_ROUNDING


@pytest.mark.slow
@pytest.mark.parametrize("k", [2, 4])
@pytest.mark.parametrize("clip", CLIPS, ids=lambda c: next(iter(c), "none"))
def test_macro_adam_equals_keras_adam_on_mean_gradients(k, clip, rng):
    variables = make_variables(rng)
    micro = [random_gradients(rng, variables, 2.0) for _ in range(3 * k)]
    ours = kg.Adam(0.05, accumulation_steps=k, second_moment="macro", **clip)
    ours_values = _train(ours, copy_variables(variables), micro)
    means = [
        [np.mean([g[i] for g in micro[c : c + k]], axis=0) for i in range(3)]
        for c in range(0, len(micro), k)
    ]
    reference = _train(
        keras.optimizers.Adam(0.05, **clip), copy_variables(variables), means
    )
    assert max_abs_difference(ours_values, reference) < FLOAT32_ROUNDING
    assert int(ours.iterations.numpy()) == 3
    assert int(ours.micro_steps.numpy()) == 3 * k


@pytest.mark.slow
@pytest.mark.parametrize(
    "inner_factory",
    [
        lambda: keras.optimizers.Lion(0.01),
        lambda: keras.optimizers.RMSprop(0.01),
        lambda: keras.optimizers.Adagrad(0.1),
    ],
    ids=["lion", "rmsprop", "adagrad"],
)
def test_wrapped_optimizer_equals_inner_on_mean_gradients(inner_factory, rng):
    k = 3
    variables = make_variables(rng)
    micro = [random_gradients(rng, variables) for _ in range(2 * k)]
    wrapped = kg.wrap(inner_factory(), accumulation_steps=k)
    ours = _train(wrapped, copy_variables(variables), micro)
    means = [
        [np.mean([g[i] for g in micro[c : c + k]], axis=0) for i in range(3)]
        for c in range(0, len(micro), k)
    ]
    reference = _train(inner_factory(), copy_variables(variables), means)
    assert max_abs_difference(ours, reference) < FLOAT32_ROUNDING
    assert int(wrapped.iterations.numpy()) == 2
    assert int(wrapped.inner_optimizer.iterations.numpy()) == 2


@pytest.mark.slow
def test_keras_alias_gradient_accumulation_steps(rng):
    variables = make_variables(rng)
    micro = [random_gradients(rng, variables) for _ in range(4)]
    alias = kg.Adam(0.05, gradient_accumulation_steps=2, second_moment="macro")
    explicit = kg.Adam(0.05, accumulation_steps=2, second_moment="macro")
    assert alias.accumulation_steps == 2
    a = _train(alias, copy_variables(variables), micro)
    b = _train(explicit, copy_variables(variables), micro)
    assert max_abs_difference(a, b) == 0.0
