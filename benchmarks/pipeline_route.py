"""The route of one gradient through the code, traced: from
`optimizer.apply` to the weight update, which files it passes through and
how often it enters each.

The configuration is the one issue 24 counted: Adam with the "micro"
second moment, K = 4, the last micro-batch of a cycle (the one that
updates), global-norm clipping and noise, traced in place as inside
`fit` (on JAX a `keras.StatelessScope`, as `stateless_apply` runs it; on
TensorFlow a `tf.function` without XLA, so that the trace is Python).

A *stop* is a call from a function into a function of another file of the
package, counted once however often it repeats (a loop over variables, a
sort key); a file is *entered* by each stop into it. An *upward* call goes
from a file into one entered earlier on the route (a callback: the
pipeline asking its optimizer to apply the rule, or the backend's branch
calling back into the pipeline).

    python benchmarks/pipeline_route.py               # the active backend
    python benchmarks/pipeline_route.py --route       # and every stop
"""

import argparse
import collections
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_gradtools as kg  # noqa: E402

PACKAGE = os.path.dirname(os.path.abspath(kg.__file__))


def _package_file(code):
    path = os.path.abspath(code.co_filename)
    if not path.startswith(PACKAGE + os.sep):
        return None
    return os.path.relpath(path, PACKAGE)


def trace_route(function):
    """Runs `function()` and returns the stops: `(caller file, callee
    file, callee function)` for every call between two package files."""
    stops = []
    seen = set()

    def profile(frame, event, arg):
        del arg
        if event != "call":
            return
        callee = _package_file(frame.f_code)
        if callee is None:
            return
        caller_frame = frame.f_back
        while caller_frame is not None and (
            _package_file(caller_frame.f_code) is None
        ):
            caller_frame = caller_frame.f_back
        caller = (
            None if caller_frame is None else _package_file(caller_frame.f_code)
        )
        if caller != callee:
            stop = (
                f"{caller}::{caller_frame.f_code.co_name}" if caller else None,
                callee,
                frame.f_code.co_name,
            )
            if stop not in seen:
                seen.add(stop)
                stops.append(stop)

    sys.setprofile(profile)
    try:
        function()
    finally:
        sys.setprofile(None)
    return stops


def summarize(stops):
    """Returns `(entries per file, upward calls)`."""
    entries = collections.Counter(callee for _, callee, _ in stops)
    seen = []
    upward = []
    for caller, callee, name in stops:
        caller_file = caller.split("::")[0] if caller else None
        if (
            callee in seen
            and caller_file in seen
            and seen.index(callee) < seen.index(caller_file)
        ):
            upward.append((caller, callee, name))
        if callee not in seen:
            seen.append(callee)
    return entries, upward, seen


def _optimizer_and_step():
    k = 4
    optimizer = kg.Adam(
        1e-3,
        accumulation_steps=k,
        second_moment="micro",
        global_clipnorm=1.0,
        noise_eta=0.01,
        noise_seed=1,
    )
    variables = [
        keras.Variable(np.ones((8, 4), "float32"), name="kernel"),
        keras.Variable(np.zeros((4,), "float32"), name="bias"),
    ]
    grads = [np.full((8, 4), 0.1, "float32"), np.full((4,), 0.2, "float32")]
    optimizer.build(variables)
    # K - 1 micro-batches first: the traced one is the last of its cycle.
    for _ in range(k - 1):
        optimizer.apply(grads, variables)
    if keras.backend.backend() == "jax":
        values = [v.value for v in optimizer.variables]
        trainable = [v.value for v in variables]

        def step():
            optimizer.stateless_apply(values, grads, trainable)

        return optimizer, step
    import tensorflow as tf

    @tf.function(autograph=False)
    def traced(grads):
        optimizer.apply(grads, variables)

    def step():
        traced.get_concrete_function(
            [tf.TensorSpec(g.shape, g.dtype) for g in grads]
        )

    return optimizer, step


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--route", action="store_true", help="print every stop in order"
    )
    args = parser.parse_args()
    _, step = _optimizer_and_step()
    stops = trace_route(step)
    entries, upward, order = summarize(stops)
    print(f"backend: {keras.backend.backend()}")
    print(f"stops (calls between package files): {len(stops)}")
    print(f"files: {len(entries)}")
    print("entries per file, in the order first entered:")
    for name in order:
        print(f"  {entries[name]:4d}  {name}")
    print(f"upward calls (into a file entered earlier): {len(upward)}")
    for caller, callee, name in collections.Counter(upward):
        print(f"  {caller} -> {callee}::{name}")
    if args.route:
        for caller, callee, name in stops:
            print(f"  {caller} -> {callee}::{name}")


if __name__ == "__main__":
    main()
