"""Train a digits classifier three ways and compare them.

The main job of keras_gradtools, runnable offline on a CPU in about a
minute: scikit-learn's 8x8 digits (shipped inside scikit-learn), a small
MLP, and three optimizers that differ only in the gradient pipeline:

  plain        Adam, batch 32, one update per batch
  accumulate   Adam, micro-batch 32, accumulation_steps=8 ("micro" second
               moment): one update per 256 samples
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
import os
import time

import keras
import numpy as np

import keras_gradtools as kg


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
    start = time.perf_counter()
    history = model.fit(
        x_train,
        y_train,
        batch_size=args.batch_size,
        epochs=args.epochs,
        validation_data=(x_test, y_test),
        callbacks=[keras.callbacks.TensorBoard(log_dir=log_dir), monitor],
        verbose=args.verbose,
    )
    seconds = time.perf_counter() - start
    loss, accuracy = model.evaluate(x_test, y_test, verbose=0)
    path = os.path.join(args.output_dir, f"digits_{run_dir}.keras")
    model.save(path)
    picture = os.path.join(
        args.output_dir, f"gradient_statistics_{run_dir}.png"
    )
    kg.plot_gradient_statistics(
        history, picture, title=f"Gradient statistics, digits MLP: {name}"
    )
    return {
        "run": name,
        "updates": int(optimizer.iterations.numpy()),
        "test_accuracy": float(accuracy),
        "test_loss": float(loss),
        "seconds": seconds,
        "noise_scale": float(np.median(history.history["grad_noise_scale"])),
        "measured_by": monitor.mode,
        "advice": monitor.advice,
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
        f"{'wall s':>7} {'noise scale':>12} {'measured by':>12}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        scale = r["noise_scale"]
        scale = f"{scale:12.0f}" if np.isfinite(scale) else f"{'n/a':>12}"
        print(
            f"{r['run']:<11} {r['updates']:>7d} {r['test_accuracy']:>9.4f} "
            f"{r['test_loss']:>9.4f} {r['seconds']:>7.1f} {scale} "
            f"{r['measured_by']:>12}"
        )
    print(
        "\nnoise scale: B_simple in samples, median over the epochs (it "
        "grows as the loss falls); from running averages (McCandlish et al. "
        "2018); 'optimizer' = measured inside the update, 'probe' = from 8 "
        "fixed batches."
    )
    for r in results:
        if r["advice"]:
            print(f"{r['run']}: {r['advice']}")


def main(argv=None):
    """`python examples/train_digits.py [options]`."""
    return run(parse_args(argv))


def run(args):
    """Runs the demo with parsed options. Returns 0."""
    if args.quick:
        args.epochs = 2
    os.makedirs(args.output_dir, exist_ok=True)
    data = load_data(args.seed)
    results = [
        train(name, optimizer, data, args)
        for name, optimizer in optimizers(args).items()
    ]
    print_table(results, args.batch_size)
    print(f"\nTensorBoard: tensorboard --logdir {args.output_dir}/logs")
    print(f"Models: {', '.join(r['saved'] for r in results)}")
    print(f"Pictures: {', '.join(r['picture'] for r in results)}")
    return 0
