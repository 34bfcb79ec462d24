"""The compiled update does not grow with the number of tensors (issue 25).

XLA compiles every distinct fused kernel of a program separately; identical
kernels (the same computation on the same shapes) are compiled once. So the
first-step cost of a model of many tensors of few shapes is set by the
number of *distinct* kernels, and a pipeline stage that makes one kernel per
tensor (a slice at a constant offset, a constant index, a per-tensor
constant) costs about 15 ms per tensor on a CPU. These tests compile the
optimizer's update for a model of 20 and of 60 tensors of the same two
shapes and count the distinct kernels in the optimized HLO: a stage written
per tensor shows up as a difference of 40 or more (the noise, the per-variable
statistics and the clipping once made 4 to 6 distinct kernels per tensor).
"""

import re

import numpy as np
import pytest

import keras_gradtools as kg

pytestmark = pytest.mark.jax_only

# A few kernels may legitimately change with the count: a concatenation or
# stack of all the tensors' scalars takes one operand per tensor.
SLACK = 2


def _distinct_fused_kernels(hlo_text):
    computations = re.split(r"\n(?=%?\S+ \(.*\) -> .* \{\n)", hlo_text)
    kernels = set()
    for computation in computations:
        name = re.match(r"%?(\S+) \(", computation)
        if name is None or "fus" not in name.group(1):
            continue
        body = computation.split("\n", 1)[1]
        body = re.sub(r"%[\w.\-]+", "%x", body)
        body = re.sub(r", metadata=\{[^}]*\}", "", body)
        kernels.add(body)
    return len(kernels)


def _compiled_kernels(layers, **kwargs):
    import jax
    import keras

    variables = [
        keras.Variable(np.zeros(shape, "float32"))
        for _ in range(layers)
        for shape in ((16, 16), (16,))
    ]
    optimizer = kg.Adam(1e-3, **kwargs)
    optimizer.build(variables)
    grads = [np.ones(v.shape, "float32") for v in variables]

    def step(optimizer_values, values, grads):
        return optimizer.stateless_apply(optimizer_values, grads, values)

    compiled = (
        jax.jit(step)
        .lower(
            [v.value for v in optimizer.variables],
            [v.value for v in variables],
            grads,
        )
        .compile()
    )
    return _distinct_fused_kernels(compiled.as_text())


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"accumulation_steps": 4},
        {"accumulation_steps": 4, "second_moment": "micro", "clipnorm": 1.0},
        {"accumulation_steps": 4, "noise_eta": 1e-3},
        {
            "accumulation_steps": 4,
            "global_clipnorm": 1.0,
            "noise_eta": 1e-3,
            "track_gradient_statistics": True,
        },
    ],
    ids=["k1", "k4", "k4-micro-clipnorm", "k4-noise", "k4-clip-noise-stats"],
)
def test_distinct_kernels_do_not_grow_with_the_tensor_count(kwargs):
    few = _compiled_kernels(10, **kwargs)
    many = _compiled_kernels(30, **kwargs)
    assert many <= few + SLACK, (
        f"{few} distinct kernels for 20 tensors, {many} for 60: a stage "
        "compiles a kernel per tensor"
    )
