"""Does an effective batch that follows the noise scale help? Measured.

Usage:

    python benchmarks/adaptive_batch.py [--quick] [--seeds S] [--markdown]
                                        [--plot PATH]

Two problems, three batch policies each, over S seeds (default 5):

- digits: scikit-learn's 8x8 digits, an MLP (64-128-64-10), Adam; target:
  validation accuracy >= 0.965.
- noisy regression: a linear model fitting y = x.w* + noise (d = 64,
  label noise 1); the gradient noise scale grows as the weights approach
  w* (the signal vanishes, the noise stays). Target: validation MSE within
  5% of the noise floor.

Policies, all with micro-batches of 32 samples and Adam:

- `fixed 32`: accumulation_steps=1 (one update per micro-batch);
- `fixed 256`: accumulation_steps=8;
- `adaptive`: `AdaptiveAccumulation(max_steps=32)` from K=2, the effective
  batch following B_simple.

The learning rate is tuned for one micro-batch and follows the effective
batch by the square-root rule in every policy (fixed 256 gets sqrt(8)
times it; adaptive gets AdaptiveAccumulation's "sqrt" factor), so the
policies differ in the batch only. For each run: updates, samples and wall
seconds of `fit` until the target is first met (checked once per epoch),
then median and range over seeds. With `--plot`, a PNG of K and B_simple
over training of one adaptive run per problem. `--quick` is a smoke test
(one seed, one epoch). Prints `benchmark: ok` last.
"""

import argparse
import os
import shlex
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import report  # noqa: E402

MICRO_BATCH = 32
POLICIES = ("fixed 32", "fixed 256", "adaptive")


def digits_problem(seed):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = (data.data / 16.0).astype("float32")
    y = data.target.astype("int32")
    x_train, x_val, y_train, y_val = train_test_split(
        x, y, test_size=0.25, random_state=0, stratify=y
    )

    def model():
        # The demo's MLP (64-128-64-10), seeded the same way.
        from keras_gradtools.demo import build_model

        return build_model(seed)

    return {
        "name": "digits",
        "data": (x_train, y_train, x_val, y_val),
        "model": model,
        "loss": "sparse_categorical_crossentropy_logits",
        "learning_rate": 1e-3,
        "metric": "val_accuracy",
        "target": 0.965,
        "higher_is_better": True,
        "max_epochs": 60,
    }


def regression_problem(seed):
    import numpy as np

    rng = np.random.default_rng(100 + seed)
    d, noise = 64, 1.0
    w = rng.normal(size=(d, 1)) / np.sqrt(d) * 3
    x = rng.normal(size=(8192 + 2048, d)).astype("float32")
    y = (x @ w + noise * rng.normal(size=(len(x), 1))).astype("float32")

    def model():
        import keras

        keras.utils.set_random_seed(seed)
        return keras.Sequential(
            [
                keras.Input((d,)),
                keras.layers.Dense(1, kernel_initializer="zeros"),
            ]
        )

    return {
        "name": "noisy regression",
        "data": (x[:8192], y[:8192], x[8192:], y[8192:]),
        "model": model,
        "loss": "mse",
        "learning_rate": 3e-3,
        "metric": "val_loss",
        "target": 1.05 * noise**2,
        "higher_is_better": False,
        "max_epochs": 40,
    }


class UntilTarget:
    """Records updates, samples and seconds when the target is first met."""

    def __init__(self, problem):
        import keras

        problem_ = problem

        class Callback(keras.callbacks.Callback):
            def on_train_begin(self, logs=None):
                self.start = time.perf_counter()
                self.micro_batches = 0
                self.reached = None

            def on_train_batch_end(self, batch, logs=None):
                self.micro_batches += 1

            def on_epoch_end(self, epoch, logs=None):
                value = logs[problem_["metric"]]
                met = (
                    value >= problem_["target"]
                    if problem_["higher_is_better"]
                    else value <= problem_["target"]
                )
                if met and self.reached is None:
                    optimizer = self.model.optimizer
                    self.reached = {
                        "updates": int(
                            keras.ops.convert_to_numpy(optimizer.iterations)
                        ),
                        "samples": self.micro_batches * MICRO_BATCH,
                        "seconds": time.perf_counter() - self.start,
                        "epochs": epoch + 1,
                    }
                    self.model.stop_training = True

        self.callback = Callback()


def run(problem, policy, quick):
    import keras

    import keras_gradtools as kg

    x, y, x_val, y_val = problem["data"]
    lr = problem["learning_rate"]
    callbacks = []
    if policy == "fixed 32":
        optimizer = kg.Adam(lr)
    elif policy == "fixed 256":
        optimizer = kg.Adam(lr * 8**0.5, accumulation_steps=8)
    else:
        optimizer = kg.Adam(lr, max_accumulation_steps=32)
        adaptive = kg.AdaptiveAccumulation(32, update_freq=16)
        callbacks.append(adaptive)
    model = problem["model"]()
    if problem["loss"] == "mse":
        loss, metrics = "mse", []
    else:
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        metrics = ["accuracy"]
    model.compile(optimizer=optimizer, loss=loss, metrics=metrics)
    until = UntilTarget(problem).callback
    callbacks.append(until)
    epochs = 1 if quick else problem["max_epochs"]
    model.fit(
        x,
        y,
        batch_size=MICRO_BATCH,
        epochs=epochs,
        validation_data=(x_val, y_val),
        verbose=0,
        callbacks=callbacks,
    )
    result = until.reached
    history = adaptive.history if policy == "adaptive" else None
    return result, history


def _cell(values, fmt):
    if not values:
        return "not reached"
    low, median, high = report.summary(values)
    return f"{fmt.format(median)} ({fmt.format(low)}-{fmt.format(high)})"


def plot(histories, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(
        len(histories), 1, figsize=(8, 3.2 * len(histories)),
        constrained_layout=True,
    )  # fmt: skip
    for axis, (name, history) in zip(axes, histories.items()):
        updates = [h["updates"] for h in history]
        effective = [h["accumulation_steps"] * MICRO_BATCH for h in history]
        noise = [h["noise_scale"] for h in history]
        axis.plot(updates, noise, color="C1", label="B_simple (samples)")
        axis.step(
            updates, effective, where="post", color="C0",
            label="effective batch K x 32",
        )  # fmt: skip
        axis.set_yscale("log")
        axis.set_xlabel("optimizer updates")
        axis.set_ylabel("samples")
        axis.set_title(f"{name}: AdaptiveAccumulation", loc="left")
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=8)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="benchmarks/adaptive_batch.py",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--plot", default=None)
    args = parser.parse_args(argv)
    seeds = args.seeds or (1 if args.quick else 5)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras

    print("# Adaptive batch size: samples, updates and time to a target")
    print()
    print(
        "command: "
        + shlex.join(["python", "benchmarks/adaptive_batch.py", *argv])
    )
    print(f"backend: {keras.backend.backend()}; seeds: {seeds}")
    print()
    histories = {}
    for make in (digits_problem, regression_problem):
        results = {policy: [] for policy in POLICIES}
        missed = {policy: 0 for policy in POLICIES}
        for seed in range(seeds):
            problem = make(seed)
            for policy in POLICIES:
                reached, history = run(problem, policy, args.quick)
                if reached is None:
                    missed[policy] += 1
                else:
                    results[policy].append(reached)
                if history and seed == 0:
                    histories[problem["name"]] = history
        direction = ">=" if problem["higher_is_better"] else "<="
        print(
            f"{problem['name']}: target {problem['metric']} {direction} "
            f"{problem['target']:.3g}; median (range) over the seeds that "
            "reached it"
        )
        print()
        rows = []
        for policy in POLICIES:
            runs = results[policy]
            rows.append(
                [
                    policy,
                    f"{len(runs)}/{seeds}",
                    _cell([r["updates"] for r in runs], "{:.0f}"),
                    _cell([r["samples"] for r in runs], "{:.0f}"),
                    _cell([r["seconds"] for r in runs], "{:.1f}"),
                ]
            )
        print(
            report.format_table(
                ["policy", "reached", "updates", "samples", "fit seconds"],
                rows,
                args.markdown,
            )
        )
        print()
    if args.plot and histories:
        plot(histories, args.plot)
        print(f"picture: {args.plot}")
    print("benchmark: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
