"""MirroredStrategy over 2 logical CPUs equals one device, for every
optimizer configuration with K = 4 through a custom loop and `fit`, and
K = 1 through `fit` (the matrix of scripts/distributed_common.py), in a
process of its own (tests/scripts/mirrored_runs.py).
"""

import pytest
from scripts.distributed_common import EQUALITY2_CASES
from test_distributed import FLOAT32_ROUNDING
from test_distributed import _one
from test_distributed import _run_mirrored

pytestmark = pytest.mark.tensorflow_only


@pytest.fixture(scope="module")
def mirrored(tmp_path_factory):
    return _run_mirrored(("equality",), tmp_path_factory.mktemp("equality"))


@pytest.mark.slow
@pytest.mark.parametrize("kind, k, mode", EQUALITY2_CASES)
def test_two_replicas_match_one_device(mirrored, kind, k, mode):
    result = _one(
        mirrored, check="equality", replicas=2, kind=kind, k=k, mode=mode
    )
    assert result["differing_replicas"] == []
    assert result["iterations"][0] == result["iterations"][1] == 8 // k
    assert result["micro_steps"] == [8, 8]
    # The noise is the same draw: same schedule, same seed, same counter.
    assert result["noise_std"][0] == result["noise_std"][1] > 0
    if kind == "adam_micro" and k > 1:
        # Replicas are more samples of the variance (docs/design.md §5): not the
        # single-device update, checked against NumPy in the next test.
        assert result["max_abs_difference"] > 1e-3
    else:
        assert result["max_abs_difference"] <= FLOAT32_ROUNDING
