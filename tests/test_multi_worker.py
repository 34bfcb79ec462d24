"""tf.distribute.MultiWorkerMirroredStrategy: two worker processes on
127.0.0.1 that each fixture starts and stops, bounded in time; no mocks.
Each compares with a single-process run on the same global batches: a
custom loop, Keras's own `fit` (which fails in Keras, as documented) and
`fit` with `keras_gradtools.distribute.enable_multi_worker_fit`, killed
mid-epoch and resumed.
"""

import os
import subprocess
import sys

import numpy as np
import pytest
from processes import finish
from processes import free_port
from processes import parse_results
from scripts.distributed_common import GLOBAL_BATCH
from scripts.distributed_common import MULTI_WORKER_CONFIGS
from scripts.distributed_common import custom_loop
from scripts.distributed_common import data
from scripts.distributed_common import make_model
from scripts.distributed_common import make_optimizer
from test_distributed import FLOAT32_ROUNDING
from test_distributed import SCRIPTS
from test_distributed import _one

pytestmark = pytest.mark.tensorflow_only


def _run_two_workers(script, *extra):
    """Runs `script INDEX PORT_0 PORT_1 *extra` as two worker processes on
    127.0.0.1 (bounded in time; both must succeed) and returns their
    `RESULT` objects."""
    ports = [str(free_port()), str(free_port())]
    workers = [
        subprocess.Popen(
            [sys.executable, os.path.join(SCRIPTS, script), str(i), *ports]
            + list(extra),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outputs = finish(workers, timeout=300)
    for worker, (_, stderr) in zip(workers, outputs):
        assert worker.returncode == 0, stderr[-4000:]
    return [r for stdout, _ in outputs for r in parse_results(stdout)]


@pytest.fixture(scope="module")
def multi_worker(tmp_path_factory):
    directory = tmp_path_factory.mktemp("multi_worker")
    return directory, _run_two_workers("multi_worker_run.py", str(directory))


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
    ports = [str(free_port()), str(free_port())]
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
        outputs = finish(interrupted, timeout=120)
    assert interrupted[0].returncode != 0  # its peer vanished mid-job
    resumed = _start_fit_workers(directory, "resumed")
    outputs = finish(resumed, timeout=300)
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
    results = [r for stdout, _ in outputs for r in parse_results(stdout)]
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


@pytest.mark.slow
def test_exact_accumulation_across_workers():
    """Two workers whose shards hold unequal valid tokens: with
    `exact_accumulation` each update equals Keras's SGD on the big batch
    on one device, at K = 1 and K = 2 (each worker's count summed)."""
    results = _run_two_workers("multi_worker_exact_run.py")
    assert sorted(r["worker"] for r in results) == [0, 1]
    for result in results:
        for k, difference in result["differences"].items():
            assert difference <= 1e-6, (k, result)
