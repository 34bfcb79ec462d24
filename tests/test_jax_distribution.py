"""`keras.distribution` on JAX: real meshes of forced CPU devices and real
processes on 127.0.0.1, no mocks.

The forced device count is fixed when JAX starts, so the meshes run in a
subprocess with 4 devices, each check on a mesh of 4, 2 or 1 of them;
every result is compared with one device on the same global batches.
"""

import os
import subprocess
import sys

import numpy as np
import pytest
from processes import finish
from processes import free_port
from processes import parse_results

pytestmark = [pytest.mark.jax_only, pytest.mark.slow]
SCRIPTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "scripts")
# Weights of order 1 after a few updates: float32 rounding.
FLOAT32_ROUNDING = 5e-7


def _run(devices, checks, directory, timeout=600):
    completed = subprocess.run(
        [
            sys.executable,
            os.path.join(SCRIPTS, "jax_distribution_runs.py"),
            str(devices),
            ",".join(checks),
            str(directory),
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    return parse_results(completed.stdout)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One process with 4 forced devices; `CHECK:N` meshes the first N
    (the mid-cycle file saved on 4 is restored onto 4, 2 and 1)."""
    directory = tmp_path_factory.mktemp("jax_distribution")
    checks = ["data_parallel:2", "data_parallel", "collectives"]
    checks += ["model_parallel", "save", "monitor", "adaptive", "transfer:2"]
    checks += ["restore", "restore:2", "restore:1"]
    results = _run(4, checks, directory)
    return directory, results


def _select(results, **fields):
    return [r for r in results if all(r.get(k) == v for k, v in fields.items())]


def test_data_parallel_equals_one_device(runs):
    _, results = runs
    found = _select(results, check="data_parallel")
    assert {(r["devices"], r["kind"], r["k"]) for r in found} >= {
        (2, kind, k)
        for kind in ("sgd", "adam_macro", "adam_micro", "adamw", "wrap_rmsprop")
        for k in (1, 4)
    } | {(4, "adam_micro", 4), (4, "sgd", 1)}
    for r in found:
        assert r["max_abs_difference"] <= FLOAT32_ROUNDING, r
        # Every device holds the same values: the same noise draw included.
        assert r["differing_copies"] == [], r
        assert r["iterations"] == 16 // r["k"]
        assert r["noise_std"][0] == r["noise_std"][1] > 0


def test_forced_devices_get_threads_to_spare(runs):
    """PJRT_NPROC took effect: XLA's CPU pool has more threads than the
    forced devices, so collectives waiting on some cannot starve the others
    (docs/distributed.md, "Forced CPU devices"). Fails if XLA stops reading
    PJRT_NPROC or names its threads differently."""
    _, results = runs
    (r,) = _select(results, check="thread_pool")
    assert r["threads"] >= 4 * r["devices"] == 16, r


def test_collectives_per_micro_batch_and_per_update(runs):
    """Under JAX's automatic sharding the gradient of a replicated weight
    is all-reduced inside Keras's backward pass, before any optimizer sees
    it: one (combined) all-reduce per micro-batch for ours and Keras's
    alike; the update adds none (its state is replicated)."""
    _, results = runs
    found = {r["config"]: r for r in _select(results, check="collectives")}
    assert len(found) == 6
    for config, r in found.items():
        assert r["every_micro_batch"] == 1, config
        assert r["per_update"] == 0, config


def test_model_parallel_slots_take_their_variables_layout(runs):
    _, results = runs
    found = _select(results, check="model_parallel")
    assert len(found) == 2
    for r in found:
        assert r["kernel_spec"] == "P(None, 'model')"
        assert r["mismatched_layouts"] == []
        assert r["max_abs_difference"] <= FLOAT32_ROUNDING


def test_mid_cycle_checkpoint_restores_onto_any_device_count(runs):
    _, results = runs
    found = {r["devices"]: r for r in _select(results, check="restore")}
    assert sorted(found) == [1, 2, 4]
    for r in found.values():
        assert r["micro_steps_restored"] == 6  # saved mid-cycle (K = 4)
        assert r["max_abs_difference"] <= FLOAT32_ROUNDING
    assert found[4]["max_abs_difference"] == 0.0  # same devices: bitwise


def test_monitor_under_data_parallel_measures_the_known_noise_scale(runs):
    _, results = runs
    (r,) = _select(results, check="monitor")
    assert r["batch_size"] == 16  # the global batch
    assert r["measured"] == pytest.approx(r["expected_noise_scale"], rel=0.25)
    assert os.path.isdir(os.path.join(r["log_dir"], "gradients"))


def test_adaptive_accumulation_takes_one_k_on_every_device(runs):
    _, results = runs
    (r,) = _select(results, check="adaptive")
    assert len(r["per_device"]) == 4 and len(set(r["per_device"])) == 1
    expected = r["expected_noise_scale"]
    assert expected / 1.6 <= r["effective_batch"] <= expected * 1.6


def test_transfer_state_is_the_same_on_every_device(runs):
    """K 2 -> 8 under DataParallel on 2 devices: the learning-rate factor
    (sqrt rule: 2), the effective beta_2 (beta_2**4), the weight-decay
    factor (tau constant: 4 / 2) and the switches are one value on every
    device, and the run equals one device's."""
    _, results = runs
    (r,) = _select(results, check="transfer")
    assert r["accumulation_steps"] == 8
    assert r["learning_rate_factor"] == pytest.approx(2.0)
    assert r["weight_decay_factor"] == pytest.approx(2.0)
    assert r["effective_beta_2"] == pytest.approx(r["beta_2"] ** 4, rel=1e-6)
    assert r["single_device"] == pytest.approx(
        [2.0, 2.0, r["effective_beta_2"]]
    )
    for name, values in r["per_device"].items():
        assert len(values) == 2 and values[0] == values[1], (name, values)
    assert r["per_device"]["transfer_beta_2"][0] == 1.0
    assert r["differing_copies"] == []
    assert r["max_abs_difference"] <= FLOAT32_ROUNDING


def test_two_processes_equal_one_process(tmp_path):
    script = os.path.join(SCRIPTS, "jax_multi_process_run.py")
    port = str(free_port())
    processes = [
        subprocess.Popen(
            [sys.executable, script, str(tmp_path), str(i), port],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outputs = finish(processes, timeout=300)
    for process, (_, stderr) in zip(processes, outputs):
        assert process.returncode == 0, stderr[-4000:]
    single = subprocess.run(
        [sys.executable, script, str(tmp_path), "single"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert single.returncode == 0, single.stderr[-4000:]
    weights = [np.load(tmp_path / f"process{i}.npz") for i in (0, 1)]
    reference = np.load(tmp_path / "single.npz")
    for key in reference.files:
        assert weights[0][key].tobytes() == weights[1][key].tobytes()
        np.testing.assert_allclose(
            weights[0][key], reference[key], rtol=0, atol=FLOAT32_ROUNDING
        )
    results = [r for stdout, _ in outputs for r in parse_results(stdout)]
    assert sorted(r["process"] for r in results) == [0, 1]
    for r in results:
        assert r["devices"] == 2
        assert r["iterations"] == 2 * 128 // 16 // 4
        assert r["batch_size_seen"] == 16
        assert r["noise_scale_logged"]
    # One writer: process 0's event file only.
    gradients = tmp_path / "logs" / "gradients"
    assert len([f for f in os.listdir(gradients) if ".tfevents." in f]) == 1
