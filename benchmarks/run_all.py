"""Every performance number of the README, in one command.

Usage:

    python benchmarks/run_all.py [--quick] [--markdown]

Runs, each in a process of its own (so that no script's compiled
functions or memory peak reach another) and on its backend:
`benchmarks/step_cost.py` (TensorFlow: the optimizer step against Keras's
and a memory-bandwidth floor), `benchmarks/xla_pieces.py` (TensorFlow: the
finite check, a sum of squares and the noise on their own),
`benchmarks/fit_throughput.py` on both backends (`model.fit` samples per
second, the monitor's overhead, peak memory), `benchmarks/jax_step_cost.py`
(JAX: ours against optax and Keras), `benchmarks/jax_allreduce.py` (JAX:
an all-reduce per micro-batch against a local sum),
`benchmarks/first_step.py` (JAX: time to the first step on a deep MLP),
`benchmarks/fit_k1.py` (JAX: `fit` at K=1 against Keras's Adam, with and
without the finite check), `benchmarks/real_models.py` (JAX: first step,
step time, optimizer state and peak memory on real architectures, as
ratios to Keras) and
`benchmarks/scaling.py` on both backends (cost against model size and
tensor count), and prints the reports. `--quick` shrinks every one to a
format smoke test (CI runs it); timings are never asserted. Exits with the
first failing script's status, else prints `benchmark: ok` last.
"""

import argparse
import os
import subprocess
import sys

# (script, the Keras backend it runs on)
SCRIPTS = (
    ("step_cost.py", "tensorflow"),
    ("xla_pieces.py", "tensorflow"),
    ("fit_throughput.py", "tensorflow"),
    ("jax_step_cost.py", "jax"),
    ("fit_throughput.py", "jax"),
    ("jax_allreduce.py", "jax"),
    ("first_step.py", "jax"),
    ("real_models.py", "jax"),
    ("fit_k1.py", "jax"),
    ("scaling.py", None),  # runs each backend itself
)


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="benchmarks/run_all.py",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args(argv)
    flags = [
        f
        for f, on in (("--quick", args.quick), ("--markdown", args.markdown))
        if on
    ]
    here = os.path.dirname(os.path.abspath(__file__))
    for script, backend in SCRIPTS:
        done = subprocess.run(
            [sys.executable, os.path.join(here, script), *flags],
            stdout=subprocess.PIPE,
            text=True,
            env=dict(
                os.environ, **({"KERAS_BACKEND": backend} if backend else {})
            ),
        )
        sys.stdout.write(done.stdout)
        sys.stdout.write("\n")
        if done.returncode != 0:
            print(f"{script} failed with status {done.returncode}")
            return done.returncode
    print("benchmark: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
