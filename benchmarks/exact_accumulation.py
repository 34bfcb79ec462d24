"""Accumulation against one big batch when micro-batches differ.

Usage:

    python -m benchmarks.exact_accumulation [--markdown]
    python benchmarks/exact_accumulation.py [--markdown]

Keras averages each micro-batch's loss over what that micro-batch holds
(its valid tokens under a padding mask, its own size for a ragged batch,
its sum of sample weights under `"mean_with_sample_weight"`), so K
accumulated micro-batches averaged with 1/K are a mean of means, not the
mean of the big batch (docs/design.md §7). For one update from the same
initial weights (drawn by NumPy, the same on both backends), this
measures the largest |weight difference| from the exact update (one batch
of all the samples, computed in float64 NumPy) of: Keras's own optimizer
on that one batch (float32: the rounding floor), Keras's accumulation
(`gradient_accumulation_steps=K`), ours without the fix
(`accumulation_steps=K`) and ours with
`keras_gradtools.exact_accumulation(model)`, for SGD (learning rate 0.5)
and Adam (0.01; a first Adam step is about ±lr per weight, so a mean of
means that flips a gradient's sign shows as 2·lr). Tasks:

- padded: 16 token sequences as K = 4 micro-batches of 4, of 1, 6, 2 and
  5 valid tokens (`Embedding(mask_zero=True)`, sparse categorical
  cross-entropy), against one batch of 16 (the issue's example);
- ragged: 10 samples as micro-batches of 4, 4 and 2 (K = 3), against one
  batch of 10;
- weighted: 16 samples with sample weights as K = 4 micro-batches of 4,
  the loss reduced with `reduction="mean_with_sample_weight"`;
- equal: the padded task with 4 valid tokens in every sequence (the
  control: equal micro-batches, where every method is exact).

Runs on the Keras backend in use (`KERAS_BACKEND=jax` or `tensorflow`),
in about 40 s on 2 cores; both backends print the same numbers to
rounding, except Keras's own Adam on one batch of the padded tasks on
TensorFlow: the embedding's gradient is a `tf.IndexedSlices` with
repeated rows, and Keras's Adam squares each slice before adding them
(ours sums repeated rows first, docs/design.md §1). Prints
`benchmark: ok` last.
"""

import argparse
import os
import shlex
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import report  # noqa: E402

LEARNING_RATE = 0.5
ADAM_LEARNING_RATE = 0.01
SEQUENCES, STEPS, VOCABULARY, WIDTH = 16, 6, 7, 4
FEATURES, CLASSES = 5, 3


def padded_task(lengths):
    """Token sequences whose valid lengths are `lengths` (repeated for the
    4 sequences of each micro-batch), and the Embedding + Dense model."""
    import numpy as np

    rng = np.random.default_rng(0)
    lengths = np.repeat(lengths, SEQUENCES // len(lengths))
    x = np.zeros((SEQUENCES, STEPS), "int32")
    for i, length in enumerate(lengths):
        x[i, :length] = rng.integers(1, VOCABULARY, length)
    y = rng.integers(0, VOCABULARY, (SEQUENCES, STEPS))
    return {
        "x": x,
        "y": y,
        "sample_weight": None,
        "micro_batch": 4,
        "steps": 4,
        "build": build_sequence_model,
        "reduction": "sum_over_batch_size",
    }


def ragged_task():
    """10 samples, fed as micro-batches of 4, 4 and 2."""
    import numpy as np

    rng = np.random.default_rng(1)
    return {
        "x": rng.normal(size=(10, FEATURES)).astype("float32"),
        "y": rng.integers(0, CLASSES, 10),
        "sample_weight": None,
        "micro_batch": 4,
        "steps": 3,
        "build": build_dense_model,
        "reduction": "sum_over_batch_size",
    }


def weighted_task():
    """16 samples whose micro-batches carry unequal sums of weights."""
    import numpy as np

    rng = np.random.default_rng(2)
    scale = np.repeat([0.2, 3.0, 1.0, 0.5], 4)
    return {
        "x": rng.normal(size=(16, FEATURES)).astype("float32"),
        "y": rng.integers(0, CLASSES, 16),
        "sample_weight": (scale * rng.uniform(0.5, 1.5, 16)).astype("float32"),
        "micro_batch": 4,
        "steps": 4,
        "build": build_dense_model,
        "reduction": "mean_with_sample_weight",
    }


def build_sequence_model():
    import keras

    inputs = keras.Input((STEPS,), dtype="int32")
    hidden = keras.layers.Embedding(VOCABULARY, WIDTH, mask_zero=True)(inputs)
    return keras.Model(inputs, keras.layers.Dense(VOCABULARY)(hidden))


def build_dense_model():
    import keras

    inputs = keras.Input((FEATURES,))
    return keras.Model(inputs, keras.layers.Dense(CLASSES)(inputs))


def numpy_update(task, weights, rule, rate):
    """The big batch's update in float64 NumPy: the gradient of the
    weighted mean cross-entropy (weights: the mask times the sample
    weights), then one step of SGD or Adam as Keras writes it."""
    import numpy as np

    weights = [w.astype("float64") for w in weights]
    x, y = task["x"], task["y"]
    if task["build"] is build_sequence_model:
        table, kernel, bias = weights
        features = table[x]
        per_value = (x != 0).astype("float64")
    else:
        kernel, bias = weights
        features = x.astype("float64")
        per_value = np.ones(len(x))
    if task["sample_weight"] is not None:
        per_value = per_value * task["sample_weight"].astype("float64")
    logits = features @ kernel + bias
    logits -= logits.max(axis=-1, keepdims=True)
    probabilities = np.exp(logits)
    probabilities /= probabilities.sum(axis=-1, keepdims=True)
    d_logits = probabilities - np.eye(kernel.shape[1])[y]
    d_logits *= (per_value / per_value.sum())[..., None]
    d_kernel = features.reshape(-1, kernel.shape[0]).T @ d_logits.reshape(
        -1, kernel.shape[1]
    )
    d_bias = d_logits.reshape(-1, kernel.shape[1]).sum(axis=0)
    grads = [d_kernel, d_bias]
    if task["build"] is build_sequence_model:
        d_table = np.zeros_like(table)
        np.add.at(d_table, x, d_logits @ kernel.T)
        grads = [d_table, *grads]
    if rule == "sgd":
        return [w - rate * g for w, g in zip(weights, grads)]
    # Adam's first step (Keras's defaults: beta_1 0.9, beta_2 0.999,
    # epsilon 1e-7).
    rate = rate * np.sqrt(1 - 0.999) / (1 - 0.9)
    return [
        w - rate * (0.1 * g) / (np.sqrt(0.001 * g * g) + 1e-7)
        for w, g in zip(weights, grads)
    ]


def trained(task, initial, optimizer, batch_size, exact=False):
    """The weights after `fit` over the task's samples once, in order, in
    batches of `batch_size`, from `initial`."""
    import keras

    import keras_gradtools as kg

    model = task["build"]()
    model.set_weights(initial)
    model.compile(
        optimizer=optimizer,
        # Tiny models, one step each: compiling with XLA would dominate.
        jit_compile=False,
        loss=keras.losses.SparseCategoricalCrossentropy(
            from_logits=True, reduction=task["reduction"]
        ),
    )
    if exact:
        kg.exact_accumulation(model)
    model.fit(
        task["x"],
        task["y"],
        sample_weight=task["sample_weight"],
        batch_size=batch_size,
        epochs=1,
        shuffle=False,
        verbose=0,
    )
    return model.get_weights()


def largest_difference(a, b):
    import numpy as np

    return max(float(np.max(np.abs(u - v))) for u, v in zip(a, b))


METHODS = (
    # (row, rule, how the K micro-batches are accumulated)
    ("Keras `SGD`, one batch of all samples", "sgd", None),
    ("Keras `SGD(gradient_accumulation_steps=K)`", "sgd", "keras"),
    ("ours `kg.SGD(accumulation_steps=K)`", "sgd", "ours"),
    ("ours `kg.SGD` + `exact_accumulation(model)`", "sgd", "exact"),
    ("Keras `Adam`, one batch of all samples", "adam", None),
    ("Keras `Adam(gradient_accumulation_steps=K)`", "adam", "keras"),
    ("ours `kg.Adam(accumulation_steps=K)`", "adam", "ours"),
    ("ours `kg.Adam` + `exact_accumulation(model)`", "adam", "exact"),
)


def initial_weights(task):
    """The same initial weights on every backend (Keras's initializers
    draw differently on each)."""
    import numpy as np

    rng = np.random.default_rng(3)
    return [
        rng.uniform(-0.5, 0.5, w.shape).astype("float32")
        for w in task["build"]().get_weights()
    ]


def measure(task):
    """The column of one task: each method's largest |weight difference|
    from the exact update (float64 NumPy)."""
    import keras

    import keras_gradtools as kg

    initial = initial_weights(task)
    samples, steps = len(task["x"]), task["steps"]
    rates = {"sgd": LEARNING_RATE, "adam": ADAM_LEARNING_RATE}
    optimizers = {
        "sgd": lambda **kw: keras.optimizers.SGD(rates["sgd"], **kw),
        "adam": lambda **kw: keras.optimizers.Adam(rates["adam"], **kw),
    }
    ours = {
        "sgd": lambda: kg.SGD(rates["sgd"], accumulation_steps=steps),
        "adam": lambda: kg.Adam(rates["adam"], accumulation_steps=steps),
    }
    column = []
    for _, rule, method in METHODS:
        if method is None:
            got = trained(task, initial, optimizers[rule](), samples)
        elif method == "keras":
            optimizer = optimizers[rule](gradient_accumulation_steps=steps)
            got = trained(task, initial, optimizer, task["micro_batch"])
        else:
            got = trained(
                task,
                initial,
                ours[rule](),
                task["micro_batch"],
                exact=method == "exact",
            )
        exact = numpy_update(task, initial, rule, rates[rule])
        column.append(largest_difference(got, exact))
    return column


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="benchmarks/exact_accumulation.py",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args(argv)
    import keras

    import keras_gradtools as kg

    tasks = {
        "padded (K=4)": padded_task([1, 6, 2, 5]),
        "ragged 4+4+2 (K=3)": ragged_task(),
        "sample weights (K=4)": weighted_task(),
        "equal (control, K=4)": padded_task([4, 4, 4, 4]),
    }
    print("# Accumulated micro-batches against one big batch")
    print()
    print(
        "command: "
        + shlex.join(["python", "-m", "benchmarks.exact_accumulation", *argv])
    )
    print(
        f"backend: {keras.backend.backend()} (Keras {keras.__version__}, "
        f"keras_gradtools {kg.__version__}); one update, learning rate "
        f"{LEARNING_RATE} (SGD) and {ADAM_LEARNING_RATE} (Adam), float32; "
        "largest |weight difference| from the exact update (float64 NumPy)"
    )
    print()
    start = time.perf_counter()
    columns = [measure(task) for task in tasks.values()]
    rows = [
        [name] + [f"{column[i]:.1e}" for column in columns]
        for i, (name, _, _) in enumerate(METHODS)
    ]
    print(report.format_table(["update", *tasks], rows, args.markdown))
    print()
    print(f"time: {time.perf_counter() - start:.0f} s")
    print()
    print("benchmark: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
