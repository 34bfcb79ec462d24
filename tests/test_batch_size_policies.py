"""Batch-size policies (BatchSizeSchedule, Seesaw, AdaptiveAccumulation)
and the transfer rule they share: K at the scheduled sample counts, the
learning-rate factor, beta_2 with a half-life fixed in samples (against a
float64 NumPy Adam), AdamW's timescale, resuming with BackupAndRestore,
old files loading with the new state neutral."""

import math
import os

import keras
import numpy as np
import pytest
from helpers import digits
from helpers import frozen_linear_model
from helpers import linear_regression
from helpers import tiny_classifier
from keras import ops

import keras_gradtools as kg
from keras_gradtools.backends import callback_hooks
from keras_gradtools.callbacks.transfer import HyperparameterTransfer

FIXTURES = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    "saved_models",
)


def _int(variable):
    return int(ops.convert_to_numpy(variable))


class _UpdateRecorder(keras.callbacks.Callback):
    """Notes after which micro-batches (counted over the whole run) an
    update happened."""

    def __init__(self):
        super().__init__()
        self.update_after = []
        self._last = None

    def on_train_batch_end(self, batch, logs=None):
        callback_hooks.sync_state(self.model)
        optimizer = self.model.optimizer
        updates = _int(optimizer.iterations)
        if self._last is not None and updates != self._last:
            self.update_after.append(_int(optimizer.micro_steps))
        self._last = updates

    def on_train_begin(self, logs=None):
        if self.model.optimizer.built:
            self._last = _int(self.model.optimizer.iterations)
        else:
            self._last = 0


def test_schedule_reaches_k_at_the_scheduled_samples_across_epochs():
    """Micro-batches of 8, 7 per epoch. K = 3 until 40 samples, 4 until
    120, then 2: a change waits for the cycle in progress, so the updates
    end after micro-batches 3, 6 (K = 3), 10, 14, 18 (K = 4; the cycle
    6..9 spans epochs 1 and 2), then every 2 (worked out by hand)."""
    x, y, _ = linear_regression(56, seed=1)
    optimizer = kg.SGD(0.0, accumulation_steps=3, max_accumulation_steps=4)
    model = frozen_linear_model(optimizer)
    schedule = kg.BatchSizeSchedule([(0, 3), (40, 4), (120, 2)])
    recorder = _UpdateRecorder()
    history = model.fit(
        x,
        y,
        batch_size=8,
        epochs=4,
        shuffle=False,
        verbose=0,
        callbacks=[schedule, recorder],
    )
    assert recorder.update_after == [3, 6, 10, 14, 18, 20, 22, 24, 26, 28]
    assert history.history["accumulation_steps"] == [4.0, 4.0, 2.0, 2.0]
    assert history.history["samples_seen"] == [56.0, 112.0, 168.0, 224.0]
    # sqrt rule relative to K0 = 3.
    np.testing.assert_allclose(
        history.history["learning_rate_factor"],
        [math.sqrt(4 / 3)] * 2 + [math.sqrt(2 / 3)] * 2,
        rtol=1e-6,
    )
    changes = [
        (r["samples_seen"], r["accumulation_steps"]) for r in schedule.history
    ]
    assert changes == [(0, 3.0), (48, 4.0), (144, 2.0)]

    # A second fit continues from the optimizer's state (224 samples).
    schedule = kg.BatchSizeSchedule([(0, 3), (240, 4)])
    recorder = _UpdateRecorder()
    model.fit(
        x[:24],
        y[:24],
        batch_size=8,
        epochs=2,
        shuffle=False,
        verbose=0,
        callbacks=[schedule, recorder],
    )
    # 224: K=3 (the boundary is at 224); at 248 >= 240 the cycle 28..30
    # ends at 31, then K=4.
    assert recorder.update_after == [31]
    assert optimizer.accumulation_steps == 4


def test_sqrt_rule_gives_factor_two_from_k_2_to_8():
    x, y, _ = linear_regression(64, seed=2)
    optimizer = kg.SGD(0.0, accumulation_steps=2, max_accumulation_steps=8)
    model = frozen_linear_model(optimizer)
    schedule = kg.BatchSizeSchedule([(0, 2), (16, 8)])
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[schedule])
    assert optimizer.accumulation_steps == 8
    assert optimizer.learning_rate_factor == 2.0


def test_seesaw_doubles_k_and_multiplies_the_rate_by_one_over_sqrt_2():
    """Boundaries every 32 samples (4 micro-batches of 8), decay 1/2, K0 = 1,
    at most 8: K 1, 2, 4, 8, then the rate decays in full (the cap). The
    learning rate: 1e-2 * (1/sqrt 2)**n while K doubles, then * 1/2."""
    x, y = digits(40)
    optimizer = kg.Adam(1e-2, accumulation_steps=1, max_accumulation_steps=8)
    model = tiny_classifier()
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    seesaw = kg.Seesaw([32, 64, 96, 128])
    recorder = _UpdateRecorder()
    history = model.fit(
        x,
        y,
        batch_size=8,
        epochs=5,
        shuffle=False,
        verbose=0,
        callbacks=[seesaw, recorder],
    )
    # K=1 for micro-batches 1..4, K=2 for 5..8, K=4 for 9..12, K=8 from 13.
    assert recorder.update_after == [1, 2, 3, 4, 6, 8, 12, 20]
    assert history.history["accumulation_steps"] == [2.0, 4.0, 8.0, 8.0, 8.0]
    root = 1 / math.sqrt(2)
    np.testing.assert_allclose(
        history.history["effective_learning_rate"],
        1e-2 * np.array([root, root**2, root**3, root**3 / 2, root**3 / 2]),
        rtol=1e-6,
    )
    changes = [
        (r["samples_seen"], r["effective_learning_rate"])
        for r in seesaw.history
    ]
    assert [c[0] for c in changes] == [0, 32, 64, 96, 160]


def _numpy_adam(gradients, steps, base_steps, lr, beta_1, beta_2, epsilon,
                move_beta_1, move_beta_2):  # fmt: skip
    """Float64 Adam on the cycles' mean gradients, beta**(K / K0) per
    update where moved, bias corrections 1 - prod(beta_i)."""
    w = np.zeros_like(gradients[0], dtype="float64")
    m = np.zeros_like(w)
    v = np.zeros_like(w)
    power_1 = power_2 = 1.0
    start = 0
    for k in steps:
        g = np.mean(gradients[start : start + k], axis=0).astype("float64")
        start += k
        b1 = beta_1 ** (k / base_steps) if move_beta_1 else beta_1
        b2 = beta_2 ** (k / base_steps) if move_beta_2 else beta_2
        power_1 *= b1
        power_2 *= b2
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        alpha = lr * np.sqrt(1 - power_2) / (1 - power_1)
        w = w - alpha * m / (np.sqrt(v) + epsilon)
    return w


@pytest.mark.parametrize(
    "move_beta_1, move_beta_2", [(False, True), (True, True), (False, False)]
)
def test_beta_after_a_change_equals_beta_to_the_k_ratio(
    move_beta_1, move_beta_2
):
    """Adam "macro", K0 = 2, two updates at K = 2 then two at K = 4: the
    weights equal a float64 NumPy Adam with beta**(K / K0) after the change,
    to float32 rounding."""
    rng = np.random.default_rng(5)
    gradients = rng.normal(size=(12, 6)).astype("float32")
    variable = keras.Variable(np.zeros(6, "float32"))
    optimizer = kg.Adam(
        0.1,
        beta_1=0.8,
        beta_2=0.9,
        accumulation_steps=2,
        max_accumulation_steps=4,
        second_moment="macro",
    )
    optimizer.build([variable])
    optimizer.set_hyperparameter_transfer(
        beta_1=move_beta_1, beta_2=move_beta_2
    )
    for g in gradients[:4]:
        optimizer.apply([g], [variable])
    optimizer.accumulation_steps = 4
    assert optimizer.effective_beta_2 == pytest.approx(
        0.9**2 if move_beta_2 else 0.9, rel=1e-12
    )
    for g in gradients[4:]:
        optimizer.apply([g], [variable])
    assert _int(optimizer.iterations) == 4
    expected = _numpy_adam(
        gradients, [2, 2, 4, 4], 2, 0.1, 0.8, 0.9, 1e-7,
        move_beta_1, move_beta_2,
    )  # fmt: skip
    np.testing.assert_allclose(
        ops.convert_to_numpy(variable), expected, rtol=2e-6, atol=1e-7
    )
    other = _numpy_adam(
        gradients, [2, 2, 4, 4], 2, 0.1, 0.8, 0.9, 1e-7,
        not move_beta_1, not move_beta_2,
    )  # fmt: skip
    assert np.max(np.abs(expected - other)) > 1e-4  # the switch matters


def test_micro_second_moment_keeps_its_half_life_in_samples_already():
    """ "micro" decays v by beta_2 per micro-batch: the beta_2 switch leaves
    its update unchanged."""
    rng = np.random.default_rng(6)
    gradients = rng.normal(size=(12, 5)).astype("float32")
    results = []
    for switch in (False, True):
        variable = keras.Variable(np.zeros(5, "float32"))
        optimizer = kg.Adam(
            0.1,
            accumulation_steps=2,
            max_accumulation_steps=4,
            second_moment="micro",
        )
        optimizer.build([variable])
        optimizer.set_hyperparameter_transfer(beta_2=switch)
        for i, g in enumerate(gradients):
            if i == 4:
                optimizer.accumulation_steps = 4
            optimizer.apply([g], [variable])
        results.append(ops.convert_to_numpy(variable))
        assert optimizer.effective_beta_2 == pytest.approx(0.999**4)
    np.testing.assert_array_equal(results[0], results[1])


@pytest.mark.parametrize("rule", ["sqrt", "linear"])
def test_adamw_timescale_is_constant_across_a_change(rule):
    """With zero gradients AdamW only decays: w <- w (1 - lr_eff wd_eff).
    The timescale tau = B / (lr_eff wd_eff) is the same at K = 2 and K = 8
    with the transfer on; without it, it doubles under the sqrt rule."""
    taus = {}
    for transfer in (True, False):
        variable = keras.Variable(np.ones(4, "float32"))
        optimizer = kg.AdamW(
            1e-2, weight_decay=0.5, accumulation_steps=2,
            max_accumulation_steps=8,
        )  # fmt: skip
        optimizer.build([variable])
        rule_object = HyperparameterTransfer(rule, weight_decay=transfer)
        zero = [np.zeros(4, "float32")]
        measured = []
        for steps in (2, 8):
            rule_object.apply(optimizer, steps)
            before = float(ops.convert_to_numpy(variable)[0])
            for _ in range(steps):
                optimizer.apply(zero, [variable])
            after = float(ops.convert_to_numpy(variable)[0])
            decay = 1 - after / before  # lr_eff * wd_eff
            measured.append(steps / decay)  # B / (lr wd), B in micro-batches
        taus[transfer] = measured
    np.testing.assert_allclose(taus[True][1], taus[True][0], rtol=1e-4)
    if rule == "sqrt":
        # lr x 2 for a batch x 4: the weight decay must double.
        np.testing.assert_allclose(
            taus[False][1] / taus[False][0], 2.0, rtol=1e-4
        )
    else:
        # lr x 4 for a batch x 4: tau holds with the weight decay as it is.
        np.testing.assert_allclose(taus[False][1], taus[False][0], rtol=1e-4)


def _backup_run(backup_dir, interrupt_at=None):
    keras.utils.set_random_seed(3)
    x, y = digits(56)
    model = tiny_classifier(seed=3)
    optimizer = kg.AdamW(
        5e-3,
        weight_decay=0.1,
        accumulation_steps=2,
        max_accumulation_steps=8,
        second_moment="macro",
    )
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    schedule = kg.BatchSizeSchedule(
        [(0, 2), (40, 3), (100, 8)], transfer_beta_1=True
    )
    callbacks = [keras.callbacks.BackupAndRestore(str(backup_dir)), schedule]
    if interrupt_at is not None:

        class Interrupt(keras.callbacks.Callback):
            def on_epoch_begin(self, epoch, logs=None):
                self.epoch = epoch

            def on_train_batch_end(self, batch, logs=None):
                if (self.epoch, batch) == interrupt_at:
                    raise RuntimeError("interrupted")

        callbacks.append(Interrupt())
    model.fit(
        x, y, batch_size=8, epochs=5, shuffle=False, verbose=0,
        callbacks=callbacks,
    )  # fmt: skip
    return model


@pytest.mark.slow
def test_backup_and_restore_mid_schedule_is_bitwise_identical(tmp_path):
    """Interrupted in epoch 2 (a change pending: K = 8 is due at 100
    samples, inside a cycle of 3) and resumed in a fresh model: weights,
    K, factors and switches equal a run never interrupted, bitwise."""
    reference = _backup_run(tmp_path / "a")
    with pytest.raises(RuntimeError, match="interrupted"):
        _backup_run(tmp_path / "b", interrupt_at=(2, 0))
    resumed = _backup_run(tmp_path / "b")
    assert reference.optimizer.accumulation_steps == 8
    assert resumed.optimizer.weight_decay_factor == pytest.approx(2.0)
    for a, b in zip(reference.get_weights(), resumed.get_weights()):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(reference.optimizer.variables, resumed.optimizer.variables):
        np.testing.assert_array_equal(
            ops.convert_to_numpy(a), ops.convert_to_numpy(b), err_msg=a.path
        )


def test_new_state_saves_and_old_files_load_with_it_neutral(tmp_path):
    backend = keras.backend.backend()
    path = os.path.join(FIXTURES, backend, "adamw_mid_cycle_noise.keras")
    model = keras.saving.load_model(path)
    optimizer = model.optimizer
    assert optimizer.hyperparameter_transfer == {
        "beta_1": False,
        "beta_2": False,
    }
    assert optimizer.weight_decay_factor == 1.0
    assert optimizer.effective_weight_decay == pytest.approx(0.01)
    # Set, saved and loaded back.
    optimizer.set_hyperparameter_transfer(beta_1=True, beta_2=True)
    optimizer.weight_decay_factor = 1.75
    model.save(str(tmp_path / "moved.keras"))
    loaded = keras.saving.load_model(str(tmp_path / "moved.keras")).optimizer
    assert loaded.hyperparameter_transfer == {"beta_1": True, "beta_2": True}
    assert loaded.weight_decay_factor == 1.75


def test_upward_only_never_lowers_k():
    """Frozen regression, B_simple = 11 samples, micro-batches of 4: from
    K = 16 the controller lowers K towards 2..4, unless upward_only."""
    x, y, _ = linear_regression(1536, seed=2)
    ends = {}
    for upward in (False, True):
        optimizer = kg.SGD(
            0.0, accumulation_steps=16, max_accumulation_steps=16
        )
        model = frozen_linear_model(optimizer)
        adaptive = kg.AdaptiveAccumulation(
            16, update_freq=48, upward_only=upward
        )
        model.fit(x, y, batch_size=4, epochs=1, verbose=0, callbacks=[adaptive])
        ends[upward] = [r["accumulation_steps"] for r in adaptive.history]
    assert min(ends[False]) <= 8
    assert ends[True] == [16.0] * len(ends[True])


def test_policies_refuse_what_they_cannot_do():
    x, y, _ = linear_regression(32)
    model = frozen_linear_model(kg.SGD(0.1, max_accumulation_steps=4))
    with pytest.raises(ValueError, match="max_accumulation_steps=8"):
        model.fit(
            x, y, verbose=0,
            callbacks=[kg.BatchSizeSchedule([(0, 1), (8, 8)])],
        )  # fmt: skip
    model = frozen_linear_model(kg.SGD(0.1))
    with pytest.raises(ValueError, match="max_accumulation_steps > 1"):
        model.fit(x, y, verbose=0, callbacks=[kg.BatchSizeSchedule([(0, 1)])])
    model = frozen_linear_model(
        kg.SGD(0.1, weight_decay=0.1, max_accumulation_steps=4)
    )
    with pytest.raises(ValueError, match="transfer_weight_decay=False"):
        model.fit(
            x, y, verbose=0,
            callbacks=[kg.BatchSizeSchedule([(0, 1), (8, 4)])],
        )  # fmt: skip
    model = frozen_linear_model(kg.SGD(0.1, max_accumulation_steps=4))
    with pytest.raises(ValueError, match="scheduled accumulation_steps"):
        model.fit(
            x, y, verbose=0, callbacks=[kg.BatchSizeSchedule(lambda s: 9)]
        )
    for steps, message in (
        ([(5, 1)], "at 0 samples"),
        ([(0, 1), (0, 2)], "strictly increasing"),
        ([(0, 0)], "accumulation_steps"),
        (3, "pairs"),
    ):
        with pytest.raises(ValueError, match=message):
            kg.BatchSizeSchedule(steps)
    with pytest.raises(ValueError, match="learning_rate_rule"):
        kg.BatchSizeSchedule([(0, 1)], learning_rate_rule="adascale")
    with pytest.raises(ValueError, match=r"decay.*1/n"):
        kg.Seesaw([10], decay=0.3)
    with pytest.raises(ValueError, match="increase strictly"):
        kg.Seesaw([10, 10])
    schedule = keras.optimizers.schedules.PiecewiseConstantDecay([4], [1, 2])
    with pytest.raises(ValueError, match="`boundaries` must be a sequence"):
        kg.Seesaw(schedule)
    with pytest.raises(ValueError, match="max_accumulation_steps > 1"):
        optimizer = kg.Adam()
        optimizer.build([keras.Variable(np.zeros(2, "float32"))])
        optimizer.set_hyperparameter_transfer(beta_2=True)


def test_tensorboard_and_history_carry_the_schedule(tmp_path):
    from keras_gradtools.callbacks.summary_writer import read_events

    x, y, _ = linear_regression(64, seed=4)
    model = frozen_linear_model(kg.Adam(1e-3, max_accumulation_steps=4))
    schedule = kg.BatchSizeSchedule([(0, 1), (32, 4)], log_dir=str(tmp_path))
    history = model.fit(
        x, y, batch_size=8, epochs=2, verbose=0, callbacks=[schedule]
    )
    tags = read_events(str(tmp_path))["gradients"]
    for name in ("accumulation_steps", "effective_learning_rate"):
        values = [float(v) for _, v in tags[name]]
        np.testing.assert_allclose(values, history.history[name], rtol=1e-6)
    assert history.history["accumulation_steps"] == [4.0, 4.0]
    np.testing.assert_allclose(
        history.history["effective_learning_rate"], [2e-3, 2e-3], rtol=1e-6
    )


def _load_benchmark():
    from test_examples import _load

    return _load("benchmarks/batch_size_policies.py")


@pytest.mark.slow
@pytest.mark.jax_only  # the benchmark's code is the same on both backends
def test_benchmark_runs_reuse_one_compilation_exactly():
    """The benchmark compiles once per optimizer configuration and starts
    every run from a fresh optimizer's state: a policy run after another
    on the same compiled model (its callback having switched the transfer
    on and moved K) gives the trace of its first run, bitwise."""
    policies = _load_benchmark()
    outcomes = policies.outcomes
    setup = policies.Setup(
        learning_rate=3e-3,
        weight_decay=0.1,
        evaluations=2,
        micro_batches_per_eval=6,
        warmup=((0, 1), (64, 2), (128, 4)),
        boundaries=(64, 128, 192),
        update_freq=4,
        target=0.1,
    )
    task = outcomes.digits_task(quick=True)
    weights = task.model(1).get_weights()
    stream = task.stream(1, 12)

    def trace(name, transfer, compiled):
        mode = policies.policy_mode(setup, name, transfer)
        model, _ = outcomes.compiled_for(task, mode, compiled)
        rows, _ = policies.run(task, setup, mode, model, weights, stream, 2)
        return rows

    shared = {}
    fresh = trace("seesaw", True, shared)  # compiles
    other = trace("fixed 8x", True, shared)
    assert [r["accumulation_steps"] for r in other] == [8, 8]
    assert trace("seesaw", True, shared) == fresh
    # K = 1, 1 (to 64 samples), 2 (to 128), 4 from 128 samples (its cycle
    # ends after 256), 8 from 256: K and updates after 192 and 384 samples.
    assert [r["accumulation_steps"] for r in fresh] == [4, 8]
    assert [r["updates"] for r in fresh] == [3, 4]


@pytest.mark.slow
@pytest.mark.jax_only  # the benchmark's code is the same on both backends
def test_benchmark_quick_mode(tmp_path):
    """`--quick` on digits: a table with every policy, a target reached
    (the char-lm task runs the same code on other data, and its own smoke
    test is outcomes.py's; CI time), the plot."""
    import subprocess
    import sys

    root = os.path.dirname(FIXTURES)
    plot = tmp_path / "policies.png"
    done = subprocess.run(
        [
            sys.executable,
            os.path.join(root, "benchmarks", "batch_size_policies.py"),
            "--quick",
            "--tasks",
            "digits",
            "--targets",
            "digits=2.2",
            "--plot",
            str(plot),
        ],
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.rstrip().endswith("benchmark: ok")
    assert "## digits:" in done.stdout and "target 2.2 nats" in done.stdout
    lines = done.stdout.splitlines()
    for policy in ("fixed 1x", "fixed 8x", "warmup", "seesaw", "noise scale"):
        assert any(line.startswith(policy) for line in lines), policy
    (fixed,) = [line for line in lines if line.startswith("fixed 1x")]
    assert "1/1" in fixed  # the target reached
    assert plot.stat().st_size > 10_000
