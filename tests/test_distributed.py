"""tf.distribute: real strategies, no mocks.

MirroredStrategy runs in a subprocess with 3 logical CPUs (logical devices
must be set before TensorFlow starts) and is compared with a single-device
run on the same global batches; the 2-replica equality matrix is in
test_distributed_equality.py (a process of its own, run in parallel with
this file's). MultiWorkerMirroredStrategy, whose worker processes run on
127.0.0.1, is in test_multi_worker.py.
"""

import os
import subprocess
import sys

import numpy as np
import pytest
from processes import parse_results

pytestmark = pytest.mark.tensorflow_only
SCRIPTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "scripts")
# Weights are of order 1: float32 rounding of a few updates.
FLOAT32_ROUNDING = 5e-7


def _run_mirrored(checks, directory):
    completed = subprocess.run(
        [
            sys.executable,
            os.path.join(SCRIPTS, "mirrored_runs.py"),
            ",".join(checks),
            str(directory),
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    return parse_results(completed.stdout)


@pytest.fixture(scope="module")
def mirrored(tmp_path_factory):
    """The MirroredStrategy checks but the 2-replica equality matrix
    (test_distributed_equality.py, run beside these): a process for 2
    replicas (which also saves the mid-cycle state), then one for 3
    (collective groups of two sizes do not mix in one process)."""
    directory = tmp_path_factory.mktemp("mirrored")
    two = ("estimator", "monitor", "save_mid_cycle", "restore")
    two += ("clip_after_sum", "keras_contract", "exact")
    results = _run_mirrored(two, directory)
    return results + _run_mirrored(("equality3", "restore3"), directory)


def _one(results, **fields):
    found = [
        r for r in results if all(r.get(k) == v for k, v in fields.items())
    ]
    assert len(found) == 1, f"expected one result for {fields}: {found}"
    return found[0]


@pytest.mark.slow
def test_three_replicas_match_one_device(mirrored):
    results = [
        r for r in mirrored if r["check"] == "equality" and r["replicas"] == 3
    ]
    assert len(results) == 3
    for result in results:
        assert result["differing_replicas"] == [], result
        if result["kind"] == "adam_micro" and result["k"] > 1:
            continue
        assert result["max_abs_difference"] <= FLOAT32_ROUNDING, result


@pytest.mark.slow
def test_micro_second_moment_and_statistics_use_replicas_as_samples(
    mirrored,
):
    result = _one(mirrored, check="estimator", k=4)
    assert result["differing_replicas"] == []
    assert result["max_abs_difference"] <= 1e-6
    single_update = _one(mirrored, check="estimator", k=1)
    for checked in (result, single_update):
        for name, expected in checked["expected_statistics"].items():
            measured = checked["measured_statistics"][name]
            assert measured == pytest.approx(expected, rel=1e-5), name


restore_targets = pytest.mark.parametrize(
    "source,replicas",
    [(s, r) for s in ("checkpoint", "keras") for r in (1, 2, 3)],
)


@pytest.mark.slow
@restore_targets
def test_mid_cycle_sums_restore_onto_any_replica_count(
    mirrored, source, replicas
):
    result = _one(
        mirrored,
        check="checkpoint",
        kind="adam_macro",
        source=source,
        replicas=replicas,
    )
    saved = result["partial_sums_saved"]
    assert len(saved) == 2 and saved[0] != saved[1]  # two partial sums
    restored = result["sums_restored"]
    assert len(restored) == replicas
    assert sum(restored) == pytest.approx(sum(saved), rel=1e-6)
    assert result["micro_steps_restored"] == 6
    assert result["iterations"] == 2
    assert result["max_abs_difference"] <= FLOAT32_ROUNDING


@pytest.mark.slow
@restore_targets
def test_sums_of_squares_refuse_another_replica_count_mid_cycle(
    mirrored, source, replicas
):
    result = _one(
        mirrored,
        check="checkpoint",
        kind="adam_micro",
        source=source,
        replicas=replicas,
    )
    if replicas == 2:
        # Same replica count: the sums of squares combine. Not bitwise: the
        # restored replicas each hold half the saved sum rather than their
        # own partial sums, so the last micro-batches round differently.
        assert "error" not in result
        assert result["max_abs_difference"] <= FLOAT32_ROUNDING
        return
    if source == "keras":
        assert (
            "came from 2 replica(s); here they would come from"
            in (result["error"])
        )
    else:
        assert "begun on a different number of replicas" in result["error"]


@pytest.mark.slow
def test_clipping_acts_on_the_gradient_summed_over_replicas(mirrored):
    result = _one(mirrored, check="clip_after_sum")
    assert result["ours"] == pytest.approx([-0.6, -0.8], abs=1e-6)
    # Keras clips each replica's gradient before the sum: the contrast
    # this package exists for (if Keras changes, this documents it).
    assert result["keras"] == pytest.approx([-1.0, -1.0], abs=1e-6)


@pytest.mark.slow
def test_monitor_measures_the_known_noise_scale_under_a_strategy(mirrored):
    from test_gradient_variance_monitor import _tensorboard_scalars

    result = _one(mirrored, check="monitor")
    assert result["batch_size"] == 16  # the global batch, not per replica
    measured = result["history"]["grad_noise_scale"][-1]
    assert measured == pytest.approx(result["expected_noise_scale"], rel=0.25)
    scalars, others = _tensorboard_scalars(
        os.path.join(result["log_dir"], "gradients")
    )
    assert scalars["grad_noise_scale"][-1] == pytest.approx(measured)
    assert any(tag.startswith("grad_variance/") for tag in scalars)
    assert any("per_coordinate" in tag for tag in others)


CONTRACT_WHERE = (
    "single",
    "cross_replica",
    "replica",
    "replica_captured",
    "replica_lazy",
)


@pytest.mark.slow
def test_what_keras_accepts_under_the_strategy_ours_does(mirrored):
    """A plain tf.Variable among the trainable variables, gradients
    computed outside `strategy.run` (applied in cross-replica context, or
    the same tensors handed to every replica: applied once, not once per
    replica), an optimizer built by its first `apply` in an eager
    `strategy.run`, and variable constraints, for K = 1 and 2: the same
    weights as one device, every replica's copy equal."""
    found = [r for r in mirrored if r["check"] == "keras_contract"]
    assert {(r["k"], r["where"]) for r in found} == {
        (k, w) for k in (1, 2) for w in CONTRACT_WHERE
    }
    for r in found:
        assert r["iterations"] == 4 // r["k"]
        assert r["constrained_min"] >= 0.0
        assert r["differing_replicas"] == []
        assert r["max_abs_difference"] <= FLOAT32_ROUNDING, r
    for k in (1, 2):
        # Built lazily in replica context: the same variables, of the same
        # kinds (the accumulators per replica), as built in the scope.
        lazy = _one(mirrored, check="keras_contract", k=k, where="replica_lazy")
        scoped = _one(
            mirrored, check="keras_contract", k=k, where="cross_replica"
        )
        assert lazy["variable_kinds"] == scoped["variable_kinds"]
        assert "SyncOnReadVariable" in lazy["variable_kinds"]


@pytest.mark.slow
def test_keras_applies_a_captured_gradient_once_and_builds_lazily(mirrored):
    """What the contract above matches: Keras's SGD, on the same gradients,
    applies a tensor captured by every replica once and builds in an eager
    `strategy.run`, reaching the one-device weights."""
    found = [r for r in mirrored if r["check"] == "keras_contract_keras"]
    assert {r["where"] for r in found} == {
        "single",
        "replica_captured",
        "replica_lazy",
    }
    for r in found:
        assert r["max_abs_difference"] <= FLOAT32_ROUNDING, r


@pytest.mark.slow
def test_first_apply_in_a_traced_strategy_run_refuses_to_build(mirrored):
    result = _one(mirrored, check="traced_lazy_build")
    assert "traced `strategy.run`" in result["error"]
    assert "optimizer.build(model.trainable_variables)" in result["error"]
    assert result["built"] is False


@pytest.mark.slow
def test_gradients_partly_shared_by_every_replica_are_refused(mirrored):
    result = _one(mirrored, check="mixed_gradients")
    assert "some are the same tensor on every replica" in result["error"]
    assert result["iterations"] == 0


@pytest.mark.slow
def test_adaptive_accumulation_takes_one_k_on_every_replica(mirrored):
    r = _one(mirrored, check="adaptive")
    steps, factors = r["per_replica"]
    assert len(set(steps)) == 1 and len(set(factors)) == 1
    expected = r["expected_noise_scale"]
    assert expected / 1.6 <= r["effective_batch"] <= expected * 1.6


@pytest.mark.slow
@pytest.mark.parametrize("k", [1, 2])
def test_exact_accumulation_sums_each_replicas_count(mirrored, k):
    """Replicas whose valid tokens differ: with `exact_accumulation` the
    update equals Keras's SGD on the big batch on one device (without it, a
    mean of the replicas' means), and so do the weighted statistics."""
    result = _one(mirrored, check="exact", k=k)
    assert result["max_abs_difference"] <= 1e-6, result
    assert result["without_exact"] > 1e-3, result
    # The replicas' halves are the samples: the statistics equal one
    # device's with those halves as its micro-batches, whose variance (at
    # half the micro-batch size) is twice as large.
    variance, mean_norm_sq = result["statistics"]
    one_variance, one_mean_norm_sq = result["one_device_statistics"]
    np.testing.assert_allclose(2 * variance, one_variance, rtol=1e-4)
    np.testing.assert_allclose(mean_norm_sq, one_mean_norm_sq, rtol=1e-3)
