"""tf.distribute: real strategies, no mocks.

MirroredStrategy runs in a subprocess with 3 logical CPUs (logical devices
must be set before TensorFlow starts); MultiWorkerMirroredStrategy runs as
two worker processes on 127.0.0.1 that the fixture starts and stops. Each
compares with a single-device run on the same global batches.
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from scripts.distributed_common import EQUALITY2_CASES
from scripts.distributed_common import GLOBAL_BATCH
from scripts.distributed_common import MULTI_WORKER_CONFIGS
from scripts.distributed_common import custom_loop
from scripts.distributed_common import data
from scripts.distributed_common import make_model
from scripts.distributed_common import make_optimizer

pytestmark = pytest.mark.tensorflow_only
SCRIPTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "scripts")
# Weights are of order 1: float32 rounding of a few updates.
FLOAT32_ROUNDING = 5e-7


def _results(stdout):
    return [
        json.loads(line[len("RESULT ") :])
        for line in stdout.splitlines()
        if line.startswith("RESULT ")
    ]


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
    return _results(completed.stdout)


@pytest.fixture(scope="module")
def mirrored(tmp_path_factory):
    """Every MirroredStrategy check: a process for 2 replicas (which also
    saves the mid-cycle state), then one for 3 (collective groups of two
    sizes do not mix in one process)."""
    directory = tmp_path_factory.mktemp("mirrored")
    two = ("equality", "estimator", "monitor", "save_mid_cycle", "restore")
    two += ("clip_after_sum", "keras_contract")
    results = _run_mirrored(two, directory)
    return results + _run_mirrored(("equality3", "restore3"), directory)


def _one(results, **fields):
    found = [
        r for r in results if all(r.get(k) == v for k, v in fields.items())
    ]
    assert len(found) == 1, f"expected one result for {fields}: {found}"
    return found[0]


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
        # Replicas are extra samples of the variance (DESIGN.md §5): not the
        # single-device update, checked against NumPy in the next test.
        assert result["max_abs_difference"] > 1e-3
    else:
        assert result["max_abs_difference"] <= FLOAT32_ROUNDING


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


@pytest.mark.slow
def test_what_keras_accepts_under_the_strategy_ours_does(mirrored):
    """A plain tf.Variable among the trainable variables, gradients
    computed outside `strategy.run`, and variable constraints, for K = 1
    and 2: the same weights as one device, every replica's copy equal."""
    found = [r for r in mirrored if r["check"] == "keras_contract"]
    assert {(r["k"], r["where"]) for r in found} == {
        (k, w) for k in (1, 2) for w in ("single", "cross_replica", "replica")
    }
    for r in found:
        assert r["iterations"] == 4 // r["k"]
        assert r["constrained_min"] >= 0.0
        assert r["differing_replicas"] == []
        assert r["max_abs_difference"] <= FLOAT32_ROUNDING


@pytest.mark.slow
def test_adaptive_accumulation_takes_one_k_on_every_replica(mirrored):
    r = _one(mirrored, check="adaptive")
    steps, factors = r["per_replica"]
    assert len(set(steps)) == 1 and len(set(factors)) == 1
    expected = r["expected_noise_scale"]
    assert expected / 1.6 <= r["effective_batch"] <= expected * 1.6


# ----------------------------------------------------------------------
# MultiWorkerMirroredStrategy: two processes on 127.0.0.1.


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def multi_worker(tmp_path_factory):
    directory = tmp_path_factory.mktemp("multi_worker")
    ports = [str(_free_port()), str(_free_port())]
    script = os.path.join(SCRIPTS, "multi_worker_run.py")
    workers = [
        subprocess.Popen(
            [sys.executable, script, str(i), *ports, str(directory)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outputs = []
    try:
        for worker in workers:
            outputs.append(worker.communicate(timeout=300))
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.communicate()
    for worker, (_, stderr) in zip(workers, outputs):
        assert worker.returncode == 0, stderr[-4000:]
    results = [r for stdout, _ in outputs for r in _results(stdout)]
    return directory, results


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(MULTI_WORKER_CONFIGS))
def test_two_workers_match_one_process(multi_worker, name):
    directory, results = multi_worker
    kind, k = MULTI_WORKER_CONFIGS[name]
    weights = [np.load(directory / f"worker{i}_{name}.npy") for i in (0, 1)]
    assert weights[0].tobytes() == weights[1].tobytes()
    x, y = data(GLOBAL_BATCH, 8)
    import tensorflow as tf

    model, optimizer = make_model(), make_optimizer(kind, k)
    optimizer.build(model.trainable_variables)
    custom_loop(tf.distribute.get_strategy(), model, optimizer, x, y, 8)
    single = np.concatenate([np.ravel(w) for w in model.get_weights()])
    assert np.max(np.abs(single - weights[0])) <= FLOAT32_ROUNDING
    for worker in (0, 1):
        result = _one(
            results, check="multi_worker_loop", worker=worker, config=name
        )
        assert result["iterations"] == 8 // k
        if kind == "adam_micro_sync":
            # sync_micro_batches: every micro-batch's gradient is summed over
            # the workers before it is accumulated (the price of the
            # single-device estimator), and the update sums again.
            assert result["top_level_collectives"] == ["CollectiveReduceV2"]
        elif k > 1:
            # Micro-batches 1..K-1 communicate nothing: every collective
            # sits in the body of the update's loop, none at top level.
            assert result["top_level_collectives"] == []
            assert any("while_body" in f for f in result["nested_collectives"])
        else:
            assert result["top_level_collectives"] == ["CollectiveReduceV2"]


@pytest.mark.slow
def test_keras_fit_under_multi_worker_fails_in_keras_as_documented(
    multi_worker,
):
    """Keras 3's own `fit` cannot run under MultiWorkerMirroredStrategy
    (keras-team/keras#20585): it fails converting a PerReplica batch before
    our optimizer runs. When Keras fixes it, this test says so."""
    _, results = multi_worker
    for worker in (0, 1):
        result = _one(results, check="multi_worker_fit", worker=worker)
        assert result["error_type"] == "ValueError"
        assert "PerReplica" in result["error"]


# ----------------------------------------------------------------------
# model.fit under MultiWorkerMirroredStrategy, with
# keras_gradtools.distribute.enable_multi_worker_fit.


def _start_fit_workers(directory, phase):
    ports = [str(_free_port()), str(_free_port())]
    script = os.path.join(SCRIPTS, "multi_worker_fit_run.py")
    return [
        subprocess.Popen(
            [sys.executable, script, str(directory), str(i), *ports, phase],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]


def _wait_for_line(process, line, timeout):
    """Reads `process`'s stdout until `line` (True), its end or the
    deadline (False)."""
    import select
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select(
            [process.stdout], [], [], deadline - time.monotonic()
        )
        if not ready:
            return False
        text = process.stdout.readline()
        if not text:
            return False
        if text.strip() == line:
            return True
    return False


def _finish(processes, timeout):
    outputs = []
    try:
        for process in processes:
            outputs.append(process.communicate(timeout=timeout))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.communicate()
    return outputs


@pytest.fixture(scope="module")
def multi_worker_fit(tmp_path_factory):
    """A 2-worker `fit` killed mid-epoch (worker 1 at epoch 3, SIGKILL) and
    resumed from BackupAndRestore, plus the single-process reference."""
    directory = tmp_path_factory.mktemp("multi_worker_fit")
    interrupted = _start_fit_workers(directory, "interrupted")
    try:
        # Worker 1 prints PAUSED at epoch 3, batch 4, and waits there.
        assert _wait_for_line(interrupted[1], "PAUSED", timeout=300)
        interrupted[1].kill()
    finally:
        outputs = _finish(interrupted, timeout=120)
    assert interrupted[0].returncode != 0  # its peer vanished mid-job
    resumed = _start_fit_workers(directory, "resumed")
    outputs = _finish(resumed, timeout=300)
    for process, (_, stderr) in zip(resumed, outputs):
        assert process.returncode == 0, stderr[-4000:]
    single = subprocess.run(
        [
            sys.executable,
            os.path.join(SCRIPTS, "multi_worker_fit_run.py"),
            str(directory),
            "single",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert single.returncode == 0, single.stderr[-4000:]
    results = [r for stdout, _ in outputs for r in _results(stdout)]
    return directory, results


@pytest.mark.slow
def test_fit_under_multi_worker_with_enable_multi_worker_fit(multi_worker_fit):
    directory, results = multi_worker_fit
    workers = [np.load(directory / f"worker{i}.npz") for i in (0, 1)]
    single = np.load(directory / "single.npz")
    for key in single.files:
        assert workers[0][key].tobytes() == workers[1][key].tobytes()
        np.testing.assert_allclose(
            workers[0][key], single[key], rtol=0, atol=FLOAT32_ROUNDING
        )
    for worker in (0, 1):
        result = _one(results, who=worker)
        assert result["keras_fit_fails"] is True  # plain fit still fails
        # Resumed from the backup of epoch 2: epochs 3 and 4 only.
        assert result["epochs_run"] == 2
        assert result["iterations"] == 4 * 64 // 8 // 2
        assert {"val_loss", "val_mae", "grad_noise_scale"} <= set(
            result["history_keys"]
        )


@pytest.mark.slow
def test_only_the_chief_writes_summaries(multi_worker_fit):
    directory, _ = multi_worker_fit
    for run in ("train", "validation", "gradients"):
        files = [
            f for f in os.listdir(directory / "logs" / run) if ".tfevents." in f
        ]
        # One event file per run directory from each job's chief (the
        # interrupted one and the resumed one); none from worker 1.
        assert len(files) == 2, (run, files)
