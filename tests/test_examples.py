"""Smoke tests of the examples and the command line: they run and produce
sane output."""

import importlib.util
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _load(relative):
    path = ROOT / relative
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_train_digits_quick_mode(tmp_path, capsys):
    import keras

    train_digits = _load("examples/train_digits.py")
    assert train_digits.main(["--quick", "--output-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines()]
    table = {r[0]: r for r in rows if r and r[0] in train_digits.RUNS}
    assert set(table) == set(train_digits.RUNS)
    plain_updates = int(table["plain"][1])
    assert int(table["accumulate"][1]) == plain_updates // 8
    for run in train_digits.RUNS:
        accuracy = float(table[run][2])
        assert 0.3 < accuracy <= 1.0, (run, accuracy)
        saved = tmp_path / f"digits_{run.replace('+', '_')}.keras"
        model = keras.saving.load_model(saved)
        assert np.isfinite(model.get_weights()[0]).all()
        run_dir = tmp_path / "logs" / run.replace("+", "_")
        assert any((run_dir / "train").rglob("*.v2"))
        assert any((run_dir / "gradients").rglob("*tfevents*"))
        picture = tmp_path / f"gradient_statistics_{run.replace('+', '_')}.png"
        assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Gradient noise scale B_simple" in out
    # Two epochs: one measurement in the second half, said as such.
    assert "1 measurement" in out and "1 measurements" not in out
    assert out.count("Confidence: low (only 1 measurement") == 3
    assert "B_simple" in out.split("-" * 20)[0]  # the table's header


def test_demo_without_scikit_learn_names_the_extra(monkeypatch, capsys):
    import importlib.util

    import keras_gradtools_cli
    from keras_gradtools import demo

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "sklearn" else find_spec(name, *a),
    )
    with pytest.raises(ModuleNotFoundError, match=r"keras-gradtools\[exa"):
        demo.check_dependencies()
    assert keras_gradtools_cli.main(["demo", "--quick"]) == 1
    error = capsys.readouterr().err
    assert "scikit-learn" in error
    assert 'pip install "keras-gradtools[examples]"' in error


def test_demo_epoch_curves_without_tensorflow(tmp_path):
    """The demo's stand-in for keras.callbacks.TensorBoard (used where
    TensorFlow is not installed) writes its tags and steps."""
    from helpers import compiled_classifier
    from helpers import digits

    from keras_gradtools import demo
    from keras_gradtools.callbacks.summary_writer import read_events

    x, y = digits(128)
    model = compiled_classifier("adam", metrics=["accuracy"])
    history = model.fit(
        x, y, batch_size=32, epochs=2, verbose=0, validation_split=0.25,
        callbacks=[demo.EpochLogs(str(tmp_path))],
    )  # fmt: skip
    runs = read_events(str(tmp_path))
    for run, prefix in (("train", ""), ("validation", "val_")):
        for name in ("loss", "accuracy"):
            events = runs[run][f"epoch_{name}"]
            assert [step for step, _ in events] == [0, 1]
            np.testing.assert_allclose(
                [float(v) for _, v in events],
                history.history[prefix + name],
                rtol=1e-6,
            )


@pytest.mark.slow
@pytest.mark.tensorflow_only
def test_custom_loop_prints_no_autograph_warning():
    """An eager `apply` compiles the pipeline with `tf.function`; AutoGraph
    converting it reached `importlib.import_module` (through
    `backends.current()`) and warned that it could not transform
    `_gcd_import`."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples/custom_loop.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "AutoGraph could not transform" not in done.stderr


def test_readme_snippets_runs_marked_blocks_only(tmp_path):
    markdown = tmp_path / "README.md"
    markdown.write_text(
        "# t\n\n<!-- ci: run -->\n```python\nprint('first ok')\n```\n\n"
        "```python\nraise SystemExit('unmarked: never run')\n```\n\n"
        "<!-- ci: run -->\n\n```python\nraise SystemExit('second fails')\n"
        "```\n"
    )
    script = str(ROOT / ".ci" / "readme_snippets.py")
    done = subprocess.run(
        [sys.executable, script, str(markdown)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1
    assert "ok   " in done.stdout and "README.md:4" in done.stdout
    assert "FAIL" in done.stdout and "second fails" in done.stdout
    assert "unmarked" not in done.stdout
    assert "1/2 passed" in done.stdout
    unmarked = tmp_path / "plain.md"
    unmarked.write_text("```python\nprint(1)\n```\n")
    for flags, code in (([], 2), (["--allow-none"], 0)):
        done = subprocess.run(
            [sys.executable, script, str(unmarked), *flags],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == code
        assert "no Python block" in done.stderr


@pytest.mark.slow
@pytest.mark.parametrize("compiled_step", [False, True])
def test_custom_loop_quick_mode(compiled_step, capsys):
    custom_loop = _load("examples/custom_loop.py")
    argv = ["--quick"] + (["--compiled-step"] if compiled_step else [])
    assert custom_loop.main(argv) == 0
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    micro, updates = [int(w) for w in summary.split() if w.isdigit()][:2]
    assert updates == micro // 4 and micro == 2 * 57
    accuracy = float(summary.split("train accuracy ")[1].split(",")[0])
    assert 0.5 < accuracy <= 1.0


@pytest.mark.slow
def test_resume_example_reports_bitwise_equality(tmp_path, capsys):
    resume = _load("examples/resume.py")
    assert resume.main(["--quick", "--output-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "bitwise identical" in out
    assert (tmp_path / "mid_cycle.keras").exists()


@pytest.mark.slow
def test_batch_size_advisor_quick_mode(capsys):
    advisor = _load("examples/batch_size_advisor.py")
    assert advisor.main(["--quick"]) == 0
    out = capsys.readouterr().out
    assert "suggested accumulation_steps = " in out
    steps = int(out.split("suggested accumulation_steps = ")[1].split()[0])
    assert steps >= 1
    assert "Gradient noise scale B_simple" in out


CLI_PROBE = """
import sys
import keras_gradtools_cli
try:
    code = keras_gradtools_cli.main(sys.argv[1:])
except SystemExit as exit:
    code = exit.code
print("EXIT", code)
heavy = ("keras", "tensorflow", "jax")
print("IMPORTED", [m for m in heavy if m in sys.modules])
"""


@pytest.mark.parametrize(
    "argv, code, says",
    [
        (["--help"], 0, "usage: keras-gradtools"),
        (["--version"], 0, "keras-gradtools 0."),
        (["demo", "--help"], 0, "--accumulation-steps"),
        (["demo", "--epochs", "many"], 2, "invalid int value"),
        (["train-everything"], 2, "invalid choice"),
        ([], 2, "usage: keras-gradtools"),
    ],
)
def test_command_line_answers_without_importing_keras(argv, code, says):
    """Help, the version and argument errors come from the command line
    module alone: no Keras, TensorFlow or JAX is imported for them."""
    done = subprocess.run(
        [sys.executable, "-c", CLI_PROBE, *argv],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert f"EXIT {code}" in done.stdout
    assert "IMPORTED []" in done.stdout
    assert says in done.stdout + done.stderr


@pytest.mark.slow
@pytest.mark.tensorflow_only
@pytest.mark.parametrize("loop", [[], ["--custom-loop"]])
def test_distributed_example_quick_mode(loop):
    # A subprocess: the example configures logical CPUs before TF starts.
    import subprocess
    import sys

    completed = subprocess.run(
        [sys.executable, str(ROOT / "examples/distributed.py"), "--quick"]
        + loop,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    out = completed.stdout
    assert "2 replicas on 2 logical CPU devices" in out
    assert "replicas' weights bitwise identical: True" in out
    difference = float(out.split("w(one device)| = ")[1].split()[0])
    assert difference <= 5e-7


@pytest.mark.slow
@pytest.mark.jax_only
def test_distributed_jax_example_quick_mode():
    # A subprocess: the example forces CPU devices before JAX starts.
    completed = subprocess.run(
        [sys.executable, str(ROOT / "examples/distributed_jax.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=300,
        env={k: v for k, v in os.environ.items() if k != "XLA_FLAGS"},
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    out = completed.stdout
    assert "devices' weights bitwise identical: True" in out
    difference = float(out.split("w(one device)| = ")[1].split()[0])
    assert difference <= 5e-6
