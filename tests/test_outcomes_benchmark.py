"""The training-outcome benchmark (benchmarks/outcomes.py): its smoke test,
the exactness of its reuse of one compilation for many runs, its tasks'
data and its report's arithmetic (no timing is ever asserted)."""

import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from test_examples import ROOT
from test_examples import _load

outcomes = _load("benchmarks/outcomes.py")

MODES_K8 = ("K=8 macro", "K=8 micro", "K=8 micro*sqrtK")


def _table_rows(text, title_start):
    """The body rows of the markdown table under the line that starts with
    `title_start`, as lists of cells."""
    lines = text.splitlines()
    start = next(
        i for i, line in enumerate(lines) if line.startswith(title_start)
    )
    rows = []
    for line in lines[start + 1 :]:
        if not line.strip() and rows:
            break
        if line.startswith("| ") and not line.startswith("| ---"):
            rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows[1:]  # without the header


@pytest.mark.slow
@pytest.mark.jax_only
def test_quick_mode_prints_a_finite_loss_for_every_mode(tmp_path):
    """`--quick` on every task: each mode's row holds a finite loss at each
    rate, the summary and paired tables are there, and the PNG is written."""
    import keras

    picture = tmp_path / "outcomes.png"
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "outcomes.py"),
            "--quick",
            "--markdown",
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
    assert out.rstrip().endswith("benchmark: ok"), out[-2000:]
    expected = {
        "digits": ("K=1", "K=8 keras", *MODES_K8),
        "char-lm": ("K=1", *MODES_K8),
        "padded-tags": ("K=1", "K=8 keras", *MODES_K8),
    }
    for task, modes in expected.items():
        rows = _table_rows(out, f"{task}: final validation loss")
        assert [row[0] for row in rows] == list(modes), (task, rows)
        for row in rows:
            values = [float(cell.split()[0]) for cell in row[1:]]
            assert len(values) == 2, (task, row)
            assert all(math.isfinite(v) and v > 0 for v in values), row
        summary = _table_rows(out, f"{task}: each mode at its tuned rate")
        assert [row[0] for row in summary] == list(modes), (task, summary)
        paired = _table_rows(out, f"{task}: paired differences")
        assert "K=8 micro - macro" in [row[0] for row in paired], paired
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_a_reused_compilation_gives_the_run_of_a_fresh_one():
    """Runs after other runs on one compiled model (weights and optimizer
    state loaded) end exactly where a run on a freshly compiled model
    ends, and two modes of one configuration share the compilation."""
    task = outcomes.digits_task(quick=True)
    task.micro_batches = 24
    seeds = [0, 1]
    initial = {seed: task.model(seed).get_weights() for seed in seeds}
    streams = {seed: task.stream(seed, task.micro_batches) for seed in seeds}
    judge = outcomes.evaluator(task)
    modes = {m.name: m for m in outcomes.standard_modes((8,))}
    task.learning_rates = (3e-2, 3e-3)
    compiled = {}
    reused = outcomes.run_mode(
        task, modes["K=8 micro"], seeds, streams, initial, judge, compiled
    )
    scaled = outcomes.run_mode(
        task, modes["K=8 micro*sqrtK"], seeds, streams, initial, judge, compiled
    )
    assert len(compiled) == 1
    task.learning_rates = (3e-3,)
    fresh = outcomes.run_mode(
        task, modes["K=8 micro"], [1], streams, initial, judge, {}
    )
    assert reused[3e-3][1] == fresh[3e-3][0]
    assert reused[3e-3][0] != reused[3e-3][1]  # the seeds differ
    # sqrt(8) * 3e-3 is another run than 3e-3.
    assert scaled[3e-3] != reused[3e-3]


@pytest.mark.slow
def test_padding_is_masked_out_of_the_tagging_loss():
    """The padded task's loss ignores the tags at padded positions (the
    mask of `Embedding(mask_zero=True)` reaches the loss)."""
    task = outcomes.padded_tags_task(quick=True)
    model = task.model(0)
    model.compile(loss=outcomes._loss())
    x, y = task.validation
    changed = np.where(x == 0, (y + 1) % outcomes.TAGS, y)
    assert (changed != y).any()
    first = model.evaluate(x, y, batch_size=len(x), verbose=0)
    second = model.evaluate(x, changed, batch_size=len(x), verbose=0)
    assert first == second


def test_padded_micro_batches_vary_strongly_in_length():
    task = outcomes.padded_tags_task(quick=True)
    x, y = task.stream(0, 64)
    real = (x > 0).sum(axis=1).reshape(64, task.micro_batch)
    # One length per micro-batch, all its sequences alike.
    assert (real == real[:, :1]).all()
    per_batch = real[:, 0]
    assert per_batch.min() <= 4 and per_batch.max() >= 32
    assert ((y > 0) <= (x > 0)).all()  # no tag on padding
    assert set(np.unique(y[x > 0])) <= set(range(outcomes.TAGS))


def test_language_model_text_comes_from_different_modules():
    train = set(outcomes.LM_TRAIN_MODULES)
    validation = set(outcomes.LM_VALIDATION_MODULES)
    assert not train & validation
    ids = outcomes.encode(outcomes.stdlib_text(outcomes.LM_VALIDATION_MODULES))
    assert len(ids) > 100_000
    assert ids.min() >= 0 and ids.max() < outcomes.LM_VOCABULARY
    assert (ids == 1).mean() > 0.01  # newlines
    np.testing.assert_array_equal(
        outcomes.encode("a\n\t~ "), [ord("a") - 30, 1, 0, ord("~") - 30, 2]
    )


def test_streams_are_the_same_for_a_seed_and_differ_between_seeds():
    task = outcomes.digits_task(quick=True)
    first, second = task.stream(0, 50), task.stream(0, 50)
    np.testing.assert_array_equal(first[0], second[0])
    assert len(first[0]) == 50 * task.micro_batch
    assert not np.array_equal(first[0], task.stream(1, 50)[0])


def test_report_picks_the_tuned_rate_and_pairs_seeds():
    losses = {1e-3: [0.5, 0.4, 0.6], 1e-2: [0.3, 0.35, math.inf]}
    assert outcomes.tuned_rate(losses) == 1e-2  # median 0.35 < 0.5
    assert outcomes.cell(losses[1e-3], 1.0) == "0.500 (0.400-0.600)"
    assert outcomes.cell(losses[1e-2], 1.0) == "0.350 (0.300-diverged)"
    assert outcomes.paired_cell([0.5, 0.7], [0.4, 0.9], 1.0) == (
        "-0.050 (-0.200 to +0.100)"
    )
    assert outcomes.paired_cell([0.5, math.inf], [0.4, 0.9], 1.0) == (
        "1 diverged"
    )
    assert re.fullmatch(r"\+0\.\d{3}", outcomes.paired_cell([1.0], [0.9], 1))


def test_a_factory_that_changes_the_configuration_is_refused():
    import keras_gradtools as kg

    class Model:
        trainable_variables = []

        def set_weights(self, weights):
            pass

    with pytest.raises(ValueError, match="only the optimizer's state"):
        outcomes.load_run_state(
            Model(),
            kg.Adam(1e-3, accumulation_steps=8, second_moment="micro"),
            kg.Adam(1e-3, accumulation_steps=8, second_moment="macro"),
            [],
        )


@pytest.mark.slow
def test_exact_mode_weighs_the_padded_micro_batches_by_their_tokens():
    """`--exact`: "macro exact" gets its own compilation (its `prepare`,
    `kg.exact_accumulation`, is part of the key) and its update differs from
    the mean of means when the micro-batches' valid tokens differ, and
    equals it when they are equal."""
    task = outcomes.padded_tags_task(quick=True)
    modes = {m.name: m for m in outcomes.exact_modes((4,))}
    assert modes["K=4 macro exact"].prepare is not None
    initial = {0: task.model(0).get_weights()}
    x, y = task.stream(0, 8)
    counts = outcomes.micro_batch_counts_of(task, x)
    assert counts.max() > 2 * counts.min()
    relative, cosine = outcomes.update_differences(
        task, 4, [0], {0: (x, y)}, initial, updates=2
    )
    assert min(relative) > 0.01 and max(cosine) < 1
    equal = np.where(np.arange(x.shape[1]) < 5, np.maximum(x, 1), 0)
    same, _ = outcomes.update_differences(
        task, 4, [0], {0: (equal, y)}, initial, updates=1
    )
    assert same[0] < 1e-4
