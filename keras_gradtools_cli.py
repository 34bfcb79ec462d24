"""The `keras-gradtools` command.

A module of its own, outside the `keras_gradtools` package: importing the
package imports Keras and its backend (seconds), while `--help`,
`--version` and argument errors must answer at once. The demo's options are
defined here for the same reason; `keras_gradtools.demo` is imported only
to run it.

    keras-gradtools demo [--quick] [--epochs N] [--output-dir DIR] [...]
"""

import argparse
import importlib.metadata
import os
import sys

DEMO_DESCRIPTION = """\
Train a classifier of scikit-learn's 8x8 digits (shipped inside
scikit-learn: nothing is downloaded) three ways that differ only in the
gradient pipeline, and compare them:

  plain        Adam, batch 32, one update per batch
  accumulate   Adam, micro-batch 32, accumulation_steps=8 ("micro" second
               moment): one update per 256 samples
  acc+noise    the same plus annealed gradient noise and global-norm
               clipping

Each run is watched by a GradientVarianceMonitor and writes TensorBoard
logs, a PNG of the gradient statistics and a .keras file under
--output-dir; the command ends with a comparison table and advice on the
batch size."""


def version():
    """The installed package's version (without importing it)."""
    try:
        return importlib.metadata.version("keras-gradtools")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed)"


def add_demo_arguments(parser):
    """The demo's options (also used by `examples/train_digits.py`)."""
    parser.add_argument(
        "--epochs", type=int, default=30, help="epochs per run (default 30)"
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=32,
        help="samples per (micro-)batch (default 32)",
    )
    parser.add_argument(
        "--accumulation-steps",
        type=int,
        default=8,
        help="micro-batches per update in the accumulating runs (default 8)",
    )
    parser.add_argument(
        "--learning-rate",
        type=float,
        default=2e-3,
        help="Adam's learning rate (default 2e-3)",
    )
    parser.add_argument(
        "--noise-eta",
        type=float,
        default=1e-4,
        help="initial noise variance of the acc+noise run (default 1e-4)",
    )
    parser.add_argument(
        "--clipnorm",
        type=float,
        default=1.0,
        help="global-norm clipping of the acc+noise run (default 1.0)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the data split, weights and noise (default 0)",
    )
    parser.add_argument(
        "--output-dir",
        default=os.path.join("outputs", "train_digits"),
        help="where logs, pictures and models go "
        "(default outputs/train_digits)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="2 epochs per run: a smoke test",
    )
    parser.add_argument(
        "--verbose",
        type=int,
        default=2,
        choices=[0, 1, 2],
        help="Keras's fit verbosity (default 2: one line per epoch)",
    )
    return parser


def build_parser():
    parser = argparse.ArgumentParser(
        prog="keras-gradtools",
        description="keras_gradtools: gradient accumulation, annealed noise, "
        "clipping and gradient statistics for Keras 3 optimizers.",
    )
    parser.add_argument(
        "--version", action="version", version=f"%(prog)s {version()}"
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = commands.add_parser(
        "demo",
        help="train scikit-learn's digits three ways and compare them",
        description=DEMO_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_demo_arguments(demo)
    return parser


def main(argv=None):
    """Runs the command line. Returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from keras_gradtools import demo

    try:
        return demo.run(args)
    except demo.MissingDependencyError as error:
        print(f"keras-gradtools demo: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
