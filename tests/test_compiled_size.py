"""The compiled update does not grow with the number of tensors (issue 25).

XLA compiles every distinct fused kernel of a program separately; identical
kernels (the same computation on the same shapes) are compiled once. So the
first-step cost of a model of many tensors of few shapes is set by the
number of *distinct* kernels, and a pipeline stage that makes one kernel per
tensor (a slice at a constant offset, a constant index, a per-tensor
constant) costs a kernel's compile per tensor. These tests compile the
optimizer's update for a model of 20 and of 60 tensors of the same two
shapes and count the distinct kernels in the optimized HLO: a stage written
per tensor shows up as a difference of 40 or more (the noise, the per-variable
statistics and the clipping once made 4 to 6 distinct kernels per tensor).
"""

import pytest
from test_examples import _load

_kernels = _load("benchmarks/compiled_kernels.py")
CONFIGURATIONS = _kernels.CONFIGURATIONS
compiled_update = _kernels.compiled_update

pytestmark = pytest.mark.jax_only

# A few kernels may legitimately change with the count: a concatenation or
# stack of all the tensors' scalars takes one operand per tensor.
SLACK = 2


@pytest.mark.parametrize("name", list(CONFIGURATIONS))
def test_distinct_kernels_do_not_grow_with_the_tensor_count(name):
    few = compiled_update(10, **CONFIGURATIONS[name])[0]
    many = compiled_update(30, **CONFIGURATIONS[name])[0]
    assert many <= few + SLACK, (
        f"{few} distinct kernels for 20 tensors, {many} for 60: a stage "
        "compiles a kernel per tensor"
    )
