"""Every performance number of the README, in one command.

Usage:

    python benchmarks/run_all.py [--quick] [--markdown]

Runs `benchmarks/step_cost.py` (the optimizer step against Keras's and a
memory-bandwidth floor: accumulation, noise, statistics, optimizer state),
`benchmarks/xla_pieces.py` (what the finite check, a sum of squares and
the two halves of the noise cost on their own) and
`benchmarks/fit_throughput.py` (`model.fit` samples per second, the
monitor's overhead, peak memory of a 50M-parameter model), each in a
process of its own so that no script's compiled functions or memory peak
reach another, and prints the three reports. `--quick` shrinks all three to a
format smoke test (CI runs it); timings are never asserted. Exits with the
first failing script's status, else prints `benchmark: ok` last.
"""

import argparse
import os
import subprocess
import sys

SCRIPTS = ("step_cost.py", "xla_pieces.py", "fit_throughput.py")


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
    for script in SCRIPTS:
        done = subprocess.run(
            [sys.executable, os.path.join(here, script), *flags],
            stdout=subprocess.PIPE,
            text=True,
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
