"""Train a digits classifier three ways and compare them.

The main job of keras_gradtools, runnable offline on a CPU in about a
minute: scikit-learn's 8x8 digits (shipped inside scikit-learn), a small
MLP, and three optimizers that differ only in the gradient pipeline:

  plain        Adam, batch 32, one update per batch
  accumulate   Adam, micro-batch 32, accumulation_steps=8 (the default
               "macro" second moment): one update per 256 samples
  acc+noise    the same plus annealed gradient noise and global-norm clipping

Each run is watched by a GradientVarianceMonitor (from the optimizer's own
sums when accumulating, by probing fixed batches otherwise) and writes
TensorBoard logs, a PNG of the gradient statistics and a `.keras` file under
--output-dir; the script ends with a comparison table and batch-size advice.

    keras-gradtools demo                  # full run (~1 minute)
    keras-gradtools demo --quick          # smoke test (seconds)
    python examples/train_digits.py       # the same, from a checkout
    tensorboard --logdir outputs/train_digits/logs
"""

import argparse
import importlib.util
import os
import time

import keras
import numpy as np

import keras_gradtools as kg
from keras_gradtools import plotting
from keras_gradtools.callbacks.summary_writer import SummaryWriter

# What the demo needs beyond keras_gradtools, and the extra that installs it.
NEEDS = (("sklearn", "scikit-learn"), ("matplotlib", "matplotlib"))
INSTALL_HINT = (
    'pip install "keras-gradtools[examples]" (from a checkout: '
    'pip install -e ".[cpu,examples]", or ".[jax,examples]" on JAX)'
)


class MissingDependencyError(ModuleNotFoundError):
    """A package the demo needs is not installed (the message says which
    extra installs it)."""


def check_dependencies():
    """Raises `MissingDependencyError` naming the `examples` extra when
    scikit-learn or matplotlib is missing, before anything trains."""
    missing = [
        package
        for module, package in NEEDS
        if importlib.util.find_spec(module) is None
    ]
    if missing:
        raise MissingDependencyError(
            f"the demo needs {' and '.join(missing)} (the digits data and "
            f"the pictures), not installed here: {INSTALL_HINT}",
            name=missing[0],
        )


def tensorflow_available():
    """Whether TensorFlow is importable (`keras.callbacks.TensorBoard`
    needs it, on every backend)."""
    return importlib.util.find_spec("tensorflow") is not None


class EpochLogs(keras.callbacks.Callback):
    """The epoch curves `keras.callbacks.TensorBoard` writes (`epoch_loss`,
    `epoch_accuracy` under `log_dir/train` and `log_dir/validation`, step
    = epoch), written without TensorFlow: the demo's stand-in for it on a
    JAX install without TensorFlow.

    Args:
        log_dir: The run's log directory.
    """

    def __init__(self, log_dir):
        super().__init__()
        self.log_dir = log_dir
        self._writers = {}

    def _writer(self, run):
        if run not in self._writers:
            path = os.path.join(self.log_dir, run)
            self._writers[run] = SummaryWriter(path)
        return self._writers[run]

    def on_epoch_end(self, epoch, logs=None):
        for name, value in (logs or {}).items():
            if name in ("loss", "accuracy"):
                self._writer("train").scalar(f"epoch_{name}", value, epoch)
            elif name in ("val_loss", "val_accuracy"):
                self._writer("validation").scalar(
                    f"epoch_{name[4:]}", value, epoch
                )
        for writer in self._writers.values():
            writer.flush()

    def on_train_end(self, logs=None):
        for writer in self._writers.values():
            writer.close()
        self._writers = {}


def parse_args(argv=None):
    """The demo's options (defined with the command line, which answers
    `--help` without importing Keras)."""
    import keras_gradtools_cli

    parser = argparse.ArgumentParser(
        prog="python examples/train_digits.py",
        description=keras_gradtools_cli.DEMO_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    return keras_gradtools_cli.add_demo_arguments(parser).parse_args(argv)


def load_data(seed):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.data / 16.0).astype("float32")
    y = digits.target.astype("int32")
    return train_test_split(x, y, test_size=0.2, random_state=seed, stratify=y)


def build_model(seed):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(128, activation="relu"),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(10),
        ],
        name="digits_mlp",
    )


RUNS = ("plain", "accumulate", "acc+noise")


def optimizers(args):
    k = args.accumulation_steps
    lr = args.learning_rate
    return {
        "plain": kg.Adam(lr),
        "accumulate": kg.Adam(lr, accumulation_steps=k),
        "acc+noise": kg.Adam(
            lr,
            accumulation_steps=k,
            noise_eta=args.noise_eta,
            noise_seed=args.seed,
            global_clipnorm=args.clipnorm,
        ),
    }


def train(name, optimizer, data, args):
    x_train, x_test, y_train, y_test = data
    model = build_model(args.seed)
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    run_dir = name.replace("+", "_")
    log_dir = os.path.join(args.output_dir, "logs", run_dir)
    print(f"\n== {name}: {_describe(optimizer)}")
    # Without accumulation the optimizer has nothing to measure from, so the
    # monitor probes 8 fixed training batches instead.
    monitor = kg.GradientVarianceMonitor(
        log_dir=log_dir,
        probe_data=(x_train, y_train),
        batch_size=args.batch_size,
        verbose=0,
    )
    if tensorflow_available():
        curves = keras.callbacks.TensorBoard(log_dir=log_dir)
    else:
        curves = EpochLogs(log_dir)
    start = time.perf_counter()
    history = model.fit(
        x_train,
        y_train,
        batch_size=args.batch_size,
        epochs=args.epochs,
        validation_data=(x_test, y_test),
        callbacks=[curves, monitor],
        verbose=args.verbose,
    )
    seconds = time.perf_counter() - start
    loss, accuracy = model.evaluate(x_test, y_test, verbose=0)
    path = os.path.join(args.output_dir, f"digits_{run_dir}.keras")
    model.save(path)
    picture = os.path.join(
        args.output_dir, f"gradient_statistics_{run_dir}.png"
    )
    details = monitor.advice_details
    return {
        "run": name,
        "updates": int(keras.ops.convert_to_numpy(optimizer.iterations)),
        "test_accuracy": float(accuracy),
        "test_loss": float(loss),
        "seconds": seconds,
        # The advice's number: the median of the second half of training.
        "noise_scale": details.noise_scale if details else float("nan"),
        "lower_bound": bool(details and details.lower_bound_only),
        "variance": float(history.history["grad_variance"][-1]),
        "measured_by": monitor.mode,
        "advice": monitor.advice,
        "history": history.history,
        "saved": path,
        "picture": picture,
    }


def _describe(optimizer):
    config = optimizer.get_config()
    keys = ["accumulation_steps", "noise_eta", "global_clipnorm"]
    return ", ".join(f"{k}={config[k]}" for k in keys if config.get(k)) or (
        "no accumulation, no noise, no clipping"
    )


def print_table(results, batch_size):
    print("\n" + "=" * 78)
    header = (
        f"{'run':<11} {'updates':>7} {'test acc':>9} {'test loss':>9} "
        f"{'wall s':>7} {'B_simple':>9} {'final tr Σ':>11} "
        f"{'measured by':>12}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        scale = r["noise_scale"]
        scale = (
            f"{('>' if r['lower_bound'] else '') + f'{scale:.0f}':>9}"
            if np.isfinite(scale)
            else f"{'n/a':>9}"
        )
        print(
            f"{r['run']:<11} {r['updates']:>7d} {r['test_accuracy']:>9.4f} "
            f"{r['test_loss']:>9.4f} {r['seconds']:>7.1f} {scale} "
            f"{r['variance']:>11.3g} {r['measured_by']:>12}"
        )
    print(
        "\nB_simple: the gradient noise scale in samples (McCandlish et al. "
        "2018), the median over the second half of training (it grows as "
        "the loss falls): the number the advice below uses. final tr Σ: "
        "the gradient variance of one micro-batch at the last epoch. "
        "'optimizer' = measured inside the update, 'probe' = from 8 fixed "
        "batches."
    )
    by_run = {r["run"]: r for r in results}
    if {"plain", "accumulate"} <= set(by_run):
        ratio = by_run["accumulate"]["variance"] / by_run["plain"]["variance"]
        print(
            f"final tr Σ, accumulate / plain: {ratio:.1f}x (the plain run "
            f"made {by_run['plain']['updates']} updates to the accumulate "
            f"run's {by_run['accumulate']['updates']}: a later point of "
            "training, where the gradients vary less)."
        )
    for r in results:
        if r["advice"]:
            print(f"{r['run']}: {r['advice']}")


def main(argv=None):
    """`python examples/train_digits.py [options]`."""
    return run(parse_args(argv))


def run(args):
    """Runs the demo with parsed options. Returns 0."""
    check_dependencies()
    if args.quick:
        args.epochs = 2
    if not tensorflow_available():
        print(
            "TensorFlow is not installed: keras.callbacks.TensorBoard needs "
            "it, so the demo writes the epoch loss and accuracy curves "
            "itself (same tags and directories); the gradient statistics "
            "are written without TensorFlow in any case."
        )
    os.makedirs(args.output_dir, exist_ok=True)
    data = load_data(args.seed)
    results = [
        train(name, optimizer, data, args)
        for name, optimizer in optimizers(args).items()
    ]
    # On shared ranges, so that the three pictures compare at a glance.
    limits = plotting.statistics_limits(*[r["history"] for r in results])
    for r in results:
        kg.plot_gradient_statistics(
            r["history"],
            r["picture"],
            title=f"Gradient statistics, digits MLP: {r['run']}",
            limits=limits,
        )
    print_table(results, args.batch_size)
    print(f"\nTensorBoard: tensorboard --logdir {args.output_dir}/logs")
    print(f"Models: {', '.join(r['saved'] for r in results)}")
    print(f"Pictures: {', '.join(r['picture'] for r in results)}")
    return 0
