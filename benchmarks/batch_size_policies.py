"""Batch-size policies with and without moving beta_2 and the weight decay.

Usage:

    python benchmarks/batch_size_policies.py [--quick] [--seeds S]
        [--tasks digits,char-lm] [--targets TASK=LOSS,...] [--markdown]
        [--plot PATH]

The tasks, their data and models are those of the training-outcome
benchmark (`benchmarks/outcomes.py`: `digits`, the demo's MLP on
scikit-learn's digits, micro-batches of 32; `char-lm`, a one-layer causal
Transformer on the standard library's source, micro-batches of 16 windows
of 64 characters, the loss in bits per character), and so is the way a run
is made (`outcomes.Mode`, `compiled_for`, `fit_run`: one compilation per
optimizer configuration, each run loads the seed's initial weights and a
fresh optimizer's state; a seed fixes the weights and the order of the
samples, the same for every policy). AdamW with the "macro" second moment
(large-batch Adam: the one whose beta_2 a change of batch moves; "micro"
keeps its half-life in samples already), the learning rate and weight decay
of `SETUPS` taken as tuned for one micro-batch (K0 = 1). Every policy
changes K through a callback, so that the transfer rule applies the same
way to all (sample counts per task in `SETUPS`):

- `fixed 1x`: K = 1 throughout;
- `fixed 8x`: K = 8 from the start (`BatchSizeSchedule([(0, 8)])`);
- `warmup`: K = 1, 2, 4, 8 at the setup's `warmup` sample counts;
- `step decay 1x`: K = 1, learning rate halved at the setup's
  `boundaries` (`Seesaw(..., max_steps=1)`): the schedule Seesaw replaces;
- `seesaw`: at those boundaries K doubles and the rate x 1/sqrt(2);
- `seesaw +beta_1`: Seesaw, the first moment's decay moved too;
- `noise scale`: `AdaptiveAccumulation(32, update_freq=...)` (from K = 2).

Each policy but `fixed 1x` and `step decay 1x` runs twice: `lr` (the
learning rate alone follows K, sqrt rule) and `lr+b2+wd` (also beta_2**(K /
K0) and the weight decay keeping B / (lr wd) constant). Reported per task
over S seeds (median and range): samples and updates until the validation
loss first reaches the target (checked at every evaluation), and the
validation loss at the end (the same budget of samples for every policy).
With `--plot`, K, the learning rate and the validation loss over samples
for seed 0, one column per task. `--quick` is a smoke test (one seed, two
evaluations of a few micro-batches). Prints `benchmark: ok` last.
"""

import argparse
import dataclasses
import os
import shlex
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import machine  # noqa: E402
import outcomes  # noqa: E402
import report  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Setup:
    """A task's policies. Sample counts are in samples (windows)."""

    learning_rate: float
    weight_decay: float
    evaluations: int  # the budget: evaluations x micro_batches_per_eval
    micro_batches_per_eval: int
    warmup: tuple  # (samples, K) pairs
    boundaries: tuple  # where the step decay halves the rate
    update_freq: int  # AdaptiveAccumulation's, in micro-batches
    target: float  # validation loss, in the task's unit


SETUPS = {
    # 16 evaluations of 42 x 32 samples: 21.5k samples (16 epochs).
    "digits": Setup(
        learning_rate=3e-3,
        weight_decay=0.1,
        evaluations=16,
        micro_batches_per_eval=42,
        warmup=((0, 1), (2000, 2), (4000, 4), (8000, 8)),
        boundaries=(4000, 8000, 12000),
        update_freq=16,
        target=0.12,
    ),
    # 24 evaluations of 40 x 16 windows: 15360 windows (983k characters
    # predicted; outcomes.py's char-lm runs 768 x 16); the schedules at
    # about the same fractions of the budget as digits' (a tenth, a fifth,
    # two fifths; a fifth, two fifths, three fifths).
    "char-lm": Setup(
        learning_rate=3e-3,
        weight_decay=0.1,
        evaluations=24,
        micro_batches_per_eval=40,
        warmup=((0, 1), (1500, 2), (3000, 4), (6000, 8)),
        boundaries=(3000, 6000, 9000),
        update_freq=16,
        target=3.1,
    ),
}
POLICIES = (
    ("fixed 1x", False),
    ("fixed 8x", False),
    ("fixed 8x", True),
    ("warmup", False),
    ("warmup", True),
    ("step decay 1x", False),
    ("seesaw", False),
    ("seesaw", True),
    ("seesaw +beta_1", True),
    ("noise scale", False),
    ("noise scale", True),
)
MAX_STEPS = 32


def label(name, transfer):
    return f"{name} ({'lr+b2+wd' if transfer else 'lr'})"


def policy_callback(setup, name, transfer):
    import keras_gradtools as kg

    options = dict(
        transfer_beta_2=transfer, transfer_weight_decay=transfer
    )  # fmt: skip
    if name == "fixed 1x":
        return kg.BatchSizeSchedule([(0, 1)], **options)
    if name == "fixed 8x":
        return kg.BatchSizeSchedule([(0, 8)], **options)
    if name == "warmup":
        return kg.BatchSizeSchedule(list(setup.warmup), **options)
    if name == "step decay 1x":
        return kg.Seesaw(setup.boundaries, max_steps=1, **options)
    if name == "seesaw":
        return kg.Seesaw(setup.boundaries, **options)
    if name == "seesaw +beta_1":
        return kg.Seesaw(setup.boundaries, transfer_beta_1=True, **options)
    return kg.AdaptiveAccumulation(
        MAX_STEPS, update_freq=setup.update_freq, **options
    )


def policy_mode(setup, name, transfer):
    """The policy as an `outcomes.Mode`. The noise-scale policy's optimizer
    tracks the gradient statistics from the start (the callback would
    switch them on, which changes the compiled update): its configuration,
    and so its compilation, is its own."""
    import keras_gradtools as kg

    statistics = name == "noise scale"
    return outcomes.Mode(
        label(name, transfer),
        lambda lr: kg.AdamW(
            lr,
            weight_decay=setup.weight_decay,
            accumulation_steps=1,
            max_accumulation_steps=MAX_STEPS,
            second_moment="macro",
            track_gradient_statistics=statistics,
        ),
        lambda: [policy_callback(setup, name, transfer)],
        family=name,
    )


def run(task, setup, mode, model, weights, stream, evaluations):
    """One run: its trace (a row per evaluation) and its seconds."""
    import keras

    trace = []
    scale = task.scale
    optimizer = model.optimizer

    class Trace(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.micro_batches = 0

        def on_train_batch_end(self, batch, logs=None):
            self.micro_batches += 1

        def on_epoch_end(self, epoch, logs=None):
            factor = logs.get("learning_rate_factor", 1.0)
            trace.append(
                {
                    "samples": self.micro_batches * task.micro_batch,
                    "updates": int(
                        keras.ops.convert_to_numpy(optimizer.iterations)
                    ),
                    "val_loss": float(logs["val_loss"]) * scale,
                    "accumulation_steps": float(
                        logs.get("accumulation_steps", 1)
                    ),
                    "learning_rate": setup.learning_rate * factor,
                }
            )

    x_val, y_val = task.validation
    start = time.perf_counter()
    outcomes.fit_run(
        task,
        mode,
        setup.learning_rate,
        model,
        weights,
        stream,
        evaluations,
        validation_data=(x_val, y_val),
        validation_batch_size=len(x_val),
        callbacks=[Trace()],
    )
    return trace, time.perf_counter() - start


def reached(trace, target):
    for row in trace:
        if row["val_loss"] <= target:
            return row
    return None


def _cell(values, fmt):
    if not values:
        return "not reached"
    low, median, high = report.summary(values)
    return f"{fmt.format(median)} ({fmt.format(low)}-{fmt.format(high)})"


def task_table(task, results, target, samples, markdown):
    header = [
        "policy",
        "moves",
        "reached",
        "samples to target",
        "updates to target",
        f"val loss after {samples} samples",
        "updates in all",
        "fit seconds",
    ]
    rows = []
    for (name, transfer), runs in results.items():
        hits = [reached(t, target) for t, _ in runs]
        hits = [h for h in hits if h is not None]
        digits = "{:.4f}" if task.scale == 1.0 else "{:.3f}"
        rows.append(
            [
                name,
                "lr+b2+wd" if transfer else "lr",
                f"{len(hits)}/{len(runs)}",
                _cell([h["samples"] for h in hits], "{:.0f}"),
                _cell([h["updates"] for h in hits], "{:.0f}"),
                _cell([t[-1]["val_loss"] for t, _ in runs], digits),
                _cell([t[-1]["updates"] for t, _ in runs], "{:.0f}"),
                _cell([s for _, s in runs], "{:.1f}"),
            ]
        )
    return report.format_table(header, rows, markdown)


def plot(traces, units, path):
    """`traces`: {task: {label: trace}}; one column per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(
        3, len(traces), figsize=(6.5 * len(traces), 9), sharex="col",
        squeeze=False, constrained_layout=True,
    )  # fmt: skip
    for column, (task, by_label) in enumerate(traces.items()):
        top, middle, bottom = axes[:, column]
        for i, (name, trace) in enumerate(by_label.items()):
            samples = [0] + [r["samples"] for r in trace]
            first = trace[0] if trace else {}
            style = dict(
                color=f"C{i % 10}", linestyle="-" if i < 10 else "--",
                label=name,
            )  # fmt: skip
            for axis, key in ((top, "accumulation_steps"),
                              (middle, "learning_rate")):  # fmt: skip
                values = [r[key] for r in trace]
                axis.step(
                    samples, [first.get(key)] + values, where="pre", **style
                )
            bottom.plot(samples[1:], [r["val_loss"] for r in trace], **style)
        top.set_title(task, loc="left")
        top.set_ylabel("K (micro-batches)")
        top.set_yscale("log", base=2)
        middle.set_ylabel("learning rate")
        middle.set_yscale("log")
        bottom.set_ylabel(f"validation loss ({units[task]})")
        bottom.set_yscale("log")
        bottom.set_xlabel("samples seen")
        for axis in axes[:, column]:
            axis.grid(True, which="major", alpha=0.3)
        top.legend(fontsize=7, ncol=2)
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _targets(text):
    targets = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, value = item.partition("=")
        targets[name.strip().replace("_", "-")] = float(value)
    return targets


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="benchmarks/batch_size_policies.py",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--tasks", default="digits,char-lm")
    parser.add_argument(
        "--targets", default="", help="e.g. digits=0.12,char-lm=3.2"
    )
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--plot", default=None)
    args = parser.parse_args(argv)
    names = [
        name.strip().replace("_", "-")
        for name in args.tasks.split(",")
        if name.strip()
    ]
    unknown = sorted(set(names) - set(SETUPS))
    if unknown:
        parser.error(f"unknown tasks {unknown}; known: {sorted(SETUPS)}")
    targets = {name: SETUPS[name].target for name in names}
    targets.update(_targets(args.targets))
    seeds = list(range(args.seeds or (1 if args.quick else 3)))
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras

    print("# Batch-size policies: K, learning rate, beta_2, weight decay")
    print()
    print(
        "command: "
        + shlex.join(["python", "benchmarks/batch_size_policies.py", *argv])
    )
    print(
        f"backend: {keras.backend.backend()}; keras {keras.__version__}; "
        f"CPU: {machine.cpu_model()} ({machine.cpu_count()} cores); "
        f"seeds: {len(seeds)}"
    )
    print()
    plotted, units = {}, {}
    for name in names:
        setup = SETUPS[name]
        task = outcomes.TASKS[name](args.quick)
        evaluations = 2 if args.quick else setup.evaluations
        per_eval = 3 if args.quick else setup.micro_batches_per_eval
        micro_batches = evaluations * per_eval
        start = time.perf_counter()
        initial = {seed: task.model(seed).get_weights() for seed in seeds}
        streams = {seed: task.stream(seed, micro_batches) for seed in seeds}
        compiled = {}
        results = {policy: [] for policy in POLICIES}
        plotted[name], units[name] = {}, task.unit
        for seed in seeds:
            for policy in POLICIES:
                mode = policy_mode(setup, *policy)
                model, _ = outcomes.compiled_for(task, mode, compiled)
                trace, seconds = run(
                    task, setup, mode, model, initial[seed], streams[seed],
                    evaluations,
                )  # fmt: skip
                results[policy].append((trace, seconds))
                if seed == seeds[0]:
                    plotted[name][mode.name] = trace
        seconds = time.perf_counter() - start
        print(
            f"## {name}: {micro_batches} micro-batches of {task.micro_batch} "
            f"({micro_batches * task.micro_batch} samples) per run, "
            f"{task.model(0).count_params()} parameters, learning rate "
            f"{setup.learning_rate:g}, weight decay {setup.weight_decay:g} "
            f"(K0 = 1); target {targets[name]:g} {task.unit}; "
            f"{len(seeds) * len(POLICIES)} runs in {seconds:.0f} s"
        )
        print()
        print(
            task_table(
                task,
                results,
                targets[name],
                micro_batches * task.micro_batch,
                args.markdown,
            )  # fmt: skip
        )
        print()
        sys.stdout.flush()
        keras.utils.clear_session()
    if args.plot:
        plot(plotted, units, args.plot)
        print(f"plot: {args.plot}")
        print()
    print("benchmark: ok")


if __name__ == "__main__":
    main()
