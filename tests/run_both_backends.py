"""Runs the test suite on both Keras backends, at the same time.

    python tests/run_both_backends.py [pytest arguments]

One `python -m pytest` per backend (KERAS_BACKEND=tensorflow and
KERAS_BACKEND=jax: one process can hold only one Keras backend), started
together so that the two share the machine's cores, each writing its
report (with its slowest tests) to the terminal when it ends. Each suite
runs its test files in order, longest first (conftest.py); the TensorFlow
suite, the larger, on two pytest-xdist workers (`--dist loadfile`: a
file's module fixtures run once), so that the cores stay busy while a test
waits on its subprocesses and after the JAX suite is done. Exits with 0
only if both pass.

The JAX suite's processes (pytest and the scripts its tests start) share
one persistent XLA compilation cache, new for each run and removed at its
end: many tests build the same models and optimizer steps, which JAX would
otherwise compile again for every new `jit` (Keras makes a new one per
model). A hit loads the executable XLA compiled for the same program, so
what runs is the same. (TensorFlow's XLA cache keys on the function, not
the program: a cold cache saves nothing there, measured.)
"""

import os
import subprocess
import sys
import tempfile
import time

BACKENDS = ("tensorflow", "jax")
# pytest-xdist workers per backend (1: no xdist). Measured on 2 cores, the
# whole suite in a clone of main: 2 + 1 ran it in 29.1 min, 2 + 2 in 30.5
# and 3 + 2 in 32.0 (more processes than cores slow the strategy
# subprocesses, whose replicas wait on each other).
WORKERS = {"tensorflow": 2, "jax": 1}
# Scheduling priority (nice) per backend. The JAX suite, one process, gets a
# core of its own when it wants one; the TensorFlow workers take what is
# left. Set when the JAX suite was the longer chain (it ran 5 minutes past
# the TensorFlow suite with equal priority); now the TensorFlow suite is
# (fresh-clone CI on 2 cores: 20.1 vs 15.9 min), but its length is its own
# chain of strategy fixtures: with nice 2 instead of 5 the tests took 20.5
# min both ways (JAX 19.2 min).
NICENESS = {"tensorflow": 5, "jax": 0}


def jax_compilation_cache(directory):
    """The environment that points JAX at a compilation cache in
    `directory` and caches every compilation (by default only those over a
    second)."""
    return {
        "JAX_COMPILATION_CACHE_DIR": directory,
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    }


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    with tempfile.TemporaryDirectory(prefix="jax_cache_") as cache:
        return run_suites(argv, jax_compilation_cache(cache))


def run_suites(argv, jax_environment):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    runs = {}
    start = time.monotonic()
    for backend in BACKENDS:
        log = tempfile.TemporaryFile(mode="w+")
        env = dict(os.environ, KERAS_BACKEND=backend)
        if backend == "jax":
            env.update(jax_environment)
        workers = WORKERS[backend]
        parallel = ["-n", str(workers), "--dist", "loadfile"]
        # Hand files out in collection order (longest first, conftest.py),
        # not reordered by their number of tests.
        parallel = (parallel + ["--no-loadscope-reorder"]) * (workers > 1)
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pytest",
                "-q",
                "--durations=15",
                *parallel,
                *argv,
            ],
            cwd=root,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
            preexec_fn=lambda niceness=NICENESS[backend]: os.nice(niceness),
        )
        runs[backend] = (process, log)
    status = 0
    for backend, (process, log) in runs.items():
        code = process.wait()
        log.seek(0)
        print(f"===== KERAS_BACKEND={backend}: pytest exit code {code} =====")
        sys.stdout.write(log.read())
        sys.stdout.flush()
        status = status or code
    minutes = (time.monotonic() - start) / 60
    print(
        f"both backends: {'passed' if status == 0 else 'FAILED'} "
        f"({minutes:.1f} min)"
    )
    return status


if __name__ == "__main__":
    sys.exit(main())
