"""Smoke tests of the benchmark scripts: each runs in --quick mode on the
backend of the suite and prints its report's rows (no timing is ever
asserted)."""

import os
import pathlib
import subprocess
import sys

import pytest
from test_examples import _load

ROOT = pathlib.Path(__file__).resolve().parent.parent

# Each benchmark script in --quick mode, on the backend of this suite, with
# rows its report must hold (run_all.py runs the same scripts).
BENCHMARKS = {
    "tensorflow": {
        "step_cost.py": [
            "ours/keras Adam (K=1)",
            "micro / macro",
            "noise / no noise",
            "ours K=4 macro / ideal",
            "statistics on / off",
        ],
        "xla_pieces.py": [
            "finite check / floor",
            "ops.erfinv / ours, net of the copy",
        ],
        # Measures each backend in a process of its own: run once, here,
        # for both.
        "scaling.py": ["## tensorflow", "## jax", "floor", "optax"],
    },
    "jax": {
        "jax_step_cost.py": [
            "ours Adam K=4 macro",
            "optax.MultiSteps",
            "statistics on / off",
        ],
        # The same Keras `fit` code on either backend: its smoke test runs
        # in the suite that ends first (JAX).
        "fit_throughput.py": [
            "monitor overhead",
            "ours K=4 / ours K=1",
            "peak RSS in fit MiB",
        ],
        "jax_allreduce.py": ["all-reduce ms", "local s + g ms"],
        "first_step.py": ["6-layer MLP", "keras adam", "ours K=1"],
        "fit_k1.py": [
            "MLP 64-64-64-10",
            "keras adam",
            "ours on_nonfinite=apply",
            "ours check without fallback",
            "ours gate off",
        ],
        "real_models.py": [
            "mlp50 (50)",
            "keras accumulation K=4",
            "ours K=4 clip+noise+statistics",
            "optax MultiSteps K=4",
            "first step / keras acc",
            "peak RSS / keras adam",
        ],
    },
}


def _benchmark_cases():
    import keras

    return sorted(BENCHMARKS[keras.backend.backend()].items())


@pytest.mark.slow
@pytest.mark.parametrize(
    "script, rows", _benchmark_cases(), ids=lambda v: str(v)[:20]
)
def test_benchmark_script_quick_mode_prints_its_rows(script, rows):
    import keras

    backend = keras.backend.backend()
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), "--quick"],
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3"),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert out.rstrip().endswith("benchmark: ok"), out[-2000:]
    for row in rows:
        assert row in out, (row, out[-3000:])


@pytest.mark.slow
@pytest.mark.jax_only
def test_adaptive_batch_evidence_quick_mode(tmp_path):
    """The evidence script of the README's "Adaptive batch size" section:
    both problems, the three policies, a table each and the PNG (in the JAX
    suite, the lighter of the two; AdaptiveAccumulation itself is tested on
    both backends in test_adaptive_accumulation.py)."""
    import keras

    picture = tmp_path / "adaptive.png"
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "adaptive_batch.py"),
            "--quick",
            "--plot",
            str(picture),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(
            os.environ,
            KERAS_BACKEND=keras.backend.backend(),
            TF_CPP_MIN_LOG_LEVEL="3",
        ),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert out.rstrip().endswith("benchmark: ok")
    assert out.count("| policy") + out.count("policy ") >= 2, out
    for policy in ("fixed 32", "fixed 256", "adaptive"):
        assert out.count(policy) >= 2, (policy, out)
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_run_all_names_every_benchmark_script():
    run_all = _load("benchmarks/run_all.py")
    listed = {script for script, _ in run_all.SCRIPTS}
    tested = set(BENCHMARKS["tensorflow"]) | set(BENCHMARKS["jax"])
    assert listed == tested


def test_pipeline_route_is_downward_and_opens_each_file_at_most_twice():
    """benchmarks/pipeline_route.py (a report of the code's shape, not a
    benchmark), on the active backend: one gradient's route (Adam "micro",
    K = 4, the updating micro-batch, clipping and noise) passes through
    the pipeline, its stages, the rule sequence and the rule; a reader
    opens each file that calls on into others at most twice; and the only
    calls against the route's order are the pipeline's one call into the
    rule and the rule's calls into its own base class."""
    route = _load("benchmarks/pipeline_route.py")
    _, step = route.optimizer_and_step()
    stops = route.trace_route(step)
    files = {callee for _, callee, _, _ in stops}
    for file in (
        "pipeline/pipeline.py",
        "pipeline/accumulator.py",
        "pipeline/stages.py",
        "transforms/clipping.py",
        "transforms/threefry.py",
        "optimizers/rule_sequence.py",
        "optimizers/adam.py",
    ):
        assert file in files
    openings, upward, leaves, order = route.reading_route(stops)
    runner = next(file for file in order if file.endswith("_apply.py"))
    assert (
        order.index(runner)
        < order.index("pipeline/pipeline.py")
        < order.index("optimizers/rule_sequence.py")
        < order.index("optimizers/adam.py")
    )
    for file in order:
        assert len(openings[file]) <= 2, (file, openings[file])
    # The stages are leaves: they call nothing back.
    for stage in ("pipeline/accumulator.py", "pipeline/stages.py"):
        assert stage in leaves
    allowed = {
        ("pipeline/pipeline.py", "optimizers/base.py", "apply_rule"),
    }
    for caller, callee, name in upward:
        caller_file = caller.split("::")[0]
        assert (caller_file, callee, name) in allowed or (
            caller_file == "optimizers/adam.py"
            and callee == "optimizers/rule_sequence.py"
        ), (caller, callee, name)


@pytest.mark.jax_only
def test_real_models_reports_and_plots_a_saved_sweep(tmp_path):
    """real_models.py --from-json: the ratios of a saved run (hand-written
    times) and the sweep's plot, without measuring anything."""
    import json

    def row(tensors, first_step_s, step_s=0.01):
        return {
            "trainable_tensors": tensors,
            "first_step_s": first_step_s,
            "step_s": step_s,
            "state_bytes": 1024,
            "max_rss_bytes": 2**30,
        }

    results = {
        f"mlp{n}": {
            "keras adam": [row(n, 2.0 * scale)],
            "keras accumulation K=4": [row(n, 4.0 * scale)],
            "ours K=1": [row(n, 3.0 * scale)],
            "ours K=4 macro": [row(n, 2.0 * scale)],
        }
        for n, scale in ((50, 1), (500, 5))
    }
    saved = tmp_path / "run.json"
    saved.write_text(
        json.dumps(
            {
                "backend": "jax",
                "keras": "3",
                "cpu": "cpu",
                "cores": 2,
                "micro_batch": 32,
                "rounds": 1,
                "windows": 1,
                "date": "2026-12-07",
                "results": results,
            }
        )
    )
    picture = tmp_path / "sweep.png"
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "real_models.py"),
            "--from-json",
            str(saved),
            "--plot",
            str(picture),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if "ours K=" in line]
    # ours K=1 / keras adam = 3 / 2; ours K=4 macro / keras acc = 2 / 4.
    assert len(lines) == 4 and all("1.50x" in x for x in lines[::2]), lines
    assert all("0.50x" in line for line in lines[1::2]), lines
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
