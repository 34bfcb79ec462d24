"""Batch-size policies with and without moving beta_2 and the weight decay.

Usage:

    python benchmarks/batch_size_policies.py [--quick] [--seeds S]
        [--epochs E] [--target LOSS] [--markdown] [--plot PATH]

Digits (scikit-learn's 8x8 digits, the demo's MLP 64-128-64-10), AdamW
with the "macro" second moment (large-batch Adam: the one whose beta_2 a
change of batch moves; "micro" keeps its half-life in samples already),
learning rate 3e-3 and weight decay 0.1 taken as tuned for one micro-batch of 32
(K0 = 1). Every policy changes K through a callback, so that the
transfer rule applies the same way to all:

- `fixed 32`: K = 1 throughout;
- `fixed 256`: K = 8 from the start (`BatchSizeSchedule([(0, 8)])`);
- `warmup`: K = 1, 2, 4, 8 at 0, 2k, 4k, 8k samples;
- `step decay 32`: K = 1, learning rate halved at 4k, 8k, 12k samples
  (`Seesaw(..., max_steps=1)`): the schedule Seesaw replaces;
- `seesaw`: at those boundaries K doubles and the rate x 1/sqrt(2);
- `seesaw +beta_1`: Seesaw, the first moment's decay moved too;
- `noise scale`: `AdaptiveAccumulation(32, update_freq=16)` (from K = 2).

Each policy but `fixed 32` and `step decay 32` runs twice: `lr` (the
learning rate alone follows K, sqrt rule) and `lr+b2+wd` (also beta_2**(K /
K0) and the weight decay keeping B / (lr wd) constant). Reported over S
seeds (median and range): samples and updates until the validation loss
first reaches `--target` (checked every epoch), and the validation loss
after E epochs (the same budget of samples for every policy). With
`--plot`, K, the learning rate and the validation loss over samples for
seed 0. `--quick` is a smoke test (one seed, one epoch). Prints
`benchmark: ok` last.
"""

import argparse
import os
import shlex
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import report  # noqa: E402

MICRO_BATCH = 32
LEARNING_RATE = 3e-3
WEIGHT_DECAY = 0.1
WARMUP = [(0, 1), (2000, 2), (4000, 4), (8000, 8)]
BOUNDARIES = [4000, 8000, 12000]
POLICIES = (
    ("fixed 32", False),
    ("fixed 256", False),
    ("fixed 256", True),
    ("warmup", False),
    ("warmup", True),
    ("step decay 32", False),
    ("seesaw", False),
    ("seesaw", True),
    ("seesaw +beta_1", True),
    ("noise scale", False),
    ("noise scale", True),
)


def digits_data():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = (data.data / 16.0).astype("float32")
    y = data.target.astype("int32")
    return train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)


def policy_callback(name, transfer):
    import keras_gradtools as kg

    options = dict(
        transfer_beta_2=transfer, transfer_weight_decay=transfer
    )  # fmt: skip
    if name == "fixed 32":
        return kg.BatchSizeSchedule([(0, 1)], **options)
    if name == "fixed 256":
        return kg.BatchSizeSchedule([(0, 8)], **options)
    if name == "warmup":
        return kg.BatchSizeSchedule(WARMUP, **options)
    if name == "step decay 32":
        return kg.Seesaw(BOUNDARIES, max_steps=1, **options)
    if name == "seesaw":
        return kg.Seesaw(BOUNDARIES, **options)
    if name == "seesaw +beta_1":
        return kg.Seesaw(BOUNDARIES, transfer_beta_1=True, **options)
    return kg.AdaptiveAccumulation(32, update_freq=16, **options)


def run(data, name, transfer, seed, epochs):
    import keras

    import keras_gradtools as kg
    from keras_gradtools.demo import build_model

    x, x_val, y, y_val = data
    optimizer = kg.AdamW(
        LEARNING_RATE,
        weight_decay=WEIGHT_DECAY,
        accumulation_steps=1,
        max_accumulation_steps=32,
        second_moment="macro",
    )
    model = build_model(seed)
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    policy = policy_callback(name, transfer)
    trace = []

    class Trace(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.micro_batches = 0

        def on_train_batch_end(self, batch, logs=None):
            self.micro_batches += 1

        def on_epoch_end(self, epoch, logs=None):
            factor = logs.get("learning_rate_factor", 1.0)
            trace.append(
                {
                    "samples": self.micro_batches * MICRO_BATCH,
                    "updates": int(
                        keras.ops.convert_to_numpy(optimizer.iterations)
                    ),
                    "val_loss": float(logs["val_loss"]),
                    "accumulation_steps": float(
                        logs.get("accumulation_steps", 1)
                    ),
                    "learning_rate": LEARNING_RATE * factor,
                }
            )

    start = time.perf_counter()
    model.fit(
        x,
        y,
        batch_size=MICRO_BATCH,
        epochs=epochs,
        validation_data=(x_val, y_val),
        verbose=0,
        callbacks=[policy, Trace()],
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


def plot(traces, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(
        3, 1, figsize=(8, 9), sharex=True, constrained_layout=True
    )
    for i, (label, trace) in enumerate(traces.items()):
        samples = [r["samples"] for r in trace]
        style = dict(
            color=f"C{i % 10}", linestyle="-" if i < 10 else "--", label=label
        )
        axes[0].step(
            samples, [r["accumulation_steps"] for r in trace], where="post",
            **style,
        )  # fmt: skip
        axes[1].step(
            samples, [r["learning_rate"] for r in trace], where="post",
            **style,
        )  # fmt: skip
        axes[2].plot(samples, [r["val_loss"] for r in trace], **style)
    axes[0].set_ylabel("K (micro-batches of 32)")
    axes[0].set_yscale("log", base=2)
    axes[1].set_ylabel("learning rate")
    axes[1].set_yscale("log")
    axes[2].set_ylabel("validation loss")
    axes[2].set_yscale("log")
    axes[2].set_xlabel("samples seen")
    for axis in axes:
        axis.grid(True, which="major", alpha=0.3)
    axes[0].legend(fontsize=7, ncol=2)
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="benchmarks/batch_size_policies.py",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--target", type=float, default=0.15)
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--plot", default=None)
    args = parser.parse_args(argv)
    seeds = args.seeds or (1 if args.quick else 2)
    epochs = args.epochs or (1 if args.quick else 12)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras

    print("# Batch-size policies: K, learning rate, beta_2, weight decay")
    print()
    print(
        "command: "
        + shlex.join(["python", "benchmarks/batch_size_policies.py", *argv])
    )
    print(
        f"backend: {keras.backend.backend()}; seeds: {seeds}; epochs: "
        f"{epochs}; target validation loss: {args.target}"
    )
    print()
    data = digits_data()
    results = {policy: [] for policy in POLICIES}
    plotted = {}
    for seed in range(seeds):
        for name, transfer in POLICIES:
            trace, seconds = run(data, name, transfer, seed, epochs)
            results[(name, transfer)].append((trace, seconds))
            if seed == 0:
                label = f"{name} ({'lr+b2+wd' if transfer else 'lr'})"
                plotted[label] = trace
    header = [
        "policy",
        "moves",
        "reached",
        "samples to target",
        "updates to target",
        f"val loss after {epochs} epochs",
        "updates in all",
        "fit seconds",
    ]
    rows = []
    for (name, transfer), runs in results.items():
        hits = [reached(t, args.target) for t, _ in runs]
        hits = [h for h in hits if h is not None]
        rows.append(
            [
                name,
                "lr+b2+wd" if transfer else "lr",
                f"{len(hits)}/{len(runs)}",
                _cell([h["samples"] for h in hits], "{:.0f}"),
                _cell([h["updates"] for h in hits], "{:.0f}"),
                _cell([t[-1]["val_loss"] for t, _ in runs], "{:.4f}"),
                _cell([t[-1]["updates"] for t, _ in runs], "{:.0f}"),
                _cell([s for _, s in runs], "{:.1f}"),
            ]
        )
    print(report.format_table(header, rows, args.markdown))
    if args.plot:
        plot(plotted, args.plot)
        print()
        print(f"plot: {args.plot}")
    print()
    print("benchmark: ok")


if __name__ == "__main__":
    main()
