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
ENTRY_FILE = os.path.join("optimizers", "base.py")


def _package_file(code):
    path = os.path.abspath(code.co_filename)
    if not path.startswith(PACKAGE + os.sep):
        return None
    return os.path.relpath(path, PACKAGE)


def trace_route(function):
    """Runs `function()` and returns the stops: `(caller, callee file,
    callee function, is_callback)` for every call between two package
    files, `caller` as `"file::function"` (or `None` outside the package).

    A *callback* is a call into a function defined inside another function
    (a lambda or a closure handed down, e.g. the branch that `run_if`
    calls): the reader reads it where it is written, in the caller's file.
    """
    stops = []
    seen = set()
    # The route starts where `apply` is entered (on JAX, Keras's
    # `stateless_apply` first maps the state's values, which is not the
    # gradient's way) and ends where it returns.
    inside = []

    def profile(frame, event, arg):
        del arg
        code = frame.f_code
        is_apply = code.co_name == "apply" and _package_file(code) == ENTRY_FILE
        if event == "return" and is_apply and inside:
            inside.pop()
            return
        if event != "call":
            return
        if is_apply:
            inside.append(frame)
        if not inside:
            return
        callee = _package_file(code)
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
            callback = "<locals>" in code.co_qualname or (
                code.co_name == "<lambda>"
            )
            stop = (
                f"{caller}::{caller_frame.f_code.co_name}" if caller else None,
                callee,
                code.co_name,
                callback,
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


def _file(caller):
    return caller.split("::")[0] if caller else None


def summarize(stops):
    """Returns `(entries per file, upward calls, files in the order first
    entered)`, every stop counted."""
    entries = collections.Counter(stop[1] for stop in stops)
    seen = []
    upward = []
    for caller, callee, name, _ in stops:
        caller_file = _file(caller)
        if (
            callee in seen
            and caller_file in seen
            and seen.index(callee) < seen.index(caller_file)
        ):
            upward.append((caller, callee, name))
        if callee not in seen:
            seen.append(callee)
    return entries, upward, seen


def leaf_files(stops):
    """The files that, on the route, call no package file but other leaves
    (ignoring callbacks): helpers such as `private_api.py`, `sparse.py` or
    the backend's primitive operations, which any layer may call."""
    calls = collections.defaultdict(set)
    files = set()
    for caller, callee, _, callback in stops:
        files.add(callee)
        if caller is not None and not callback:
            calls[_file(caller)].add(callee)
    leaves = set()
    changed = True
    while changed:
        changed = False
        for name in files - leaves:
            if calls[name] <= leaves:
                leaves.add(name)
                changed = True
    return leaves


def reading_route(stops):
    """The route as a reader follows it: callbacks are read where they are
    written, and a file is opened once from each file that calls into it.

    Returns:
        `(openings, upward, leaves, order)`: for each file, the files it is
        opened from; the non-callback calls from one non-leaf
        file into a non-leaf file opened earlier; the leaf files; and the
        non-leaf files in the order first opened.
    """
    leaves = leaf_files(stops)
    openings = collections.defaultdict(list)
    order = []
    upward = []
    for caller, callee, name, callback in stops:
        if callback:
            continue
        caller_file = _file(caller)
        if caller_file not in openings[callee]:
            openings[callee].append(caller_file)
        if callee in leaves:
            continue
        if callee not in order:
            order.append(callee)
        elif caller_file in order and (
            order.index(callee) < order.index(caller_file)
        ):
            upward.append((caller, callee, name))
    return openings, upward, leaves, order


def optimizer_and_step():
    """The configuration of the module's docstring: returns `(optimizer,
    step)`, `step()` tracing the micro-batch that updates."""
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
    _, step = optimizer_and_step()
    stops = trace_route(step)
    entries, upward, order = summarize(stops)
    print(f"backend: {keras.backend.backend()}")
    print(f"stops (calls between package files): {len(stops)}")
    print(
        f"  of which callbacks (a lambda or closure handed down): "
        f"{sum(stop[3] for stop in stops)}"
    )
    print(f"files: {len(entries)}")
    print("entries per file (every stop), in the order first entered:")
    for name in order:
        print(f"  {entries[name]:4d}  {name}")
    print(f"upward calls (into a file entered earlier): {len(upward)}")
    for caller, callee, name in collections.Counter(upward):
        print(f"  {caller} -> {callee}::{name}")
    openings, reading_upward, leaves, reading_order = reading_route(stops)
    print()
    print("as a reader follows it (callbacks read where written; a file")
    print("opened once from each file that calls it; leaf helpers apart):")
    print(f"  starts in {ENTRY_FILE}::apply")

    def opened(name):
        callers = ", ".join(str(c) for c in openings[name])
        return f"  {len(openings[name]):4d}  {name}  (from {callers})"

    for name in reading_order:
        print(opened(name))
    print("  leaf helpers (call no file but other leaves):")
    for name in sorted(leaves):
        print("  " + opened(name))
    print(f"  upward calls between route files: {len(reading_upward)}")
    for caller, callee, name in reading_upward:
        print(f"    {caller} -> {callee}::{name}")
    if args.route:
        print()
        for caller, callee, name, callback in stops:
            mark = "  (callback)" if callback else ""
            print(f"  {caller} -> {callee}::{name}{mark}")


if __name__ == "__main__":
    main()
