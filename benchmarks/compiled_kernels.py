"""How many distinct XLA kernels the optimizer's compiled update has, at two
tensor counts (JAX; issue 25, item 2; docs/performance.md).

XLA compiles each distinct fused kernel of a program separately and
identical ones once, so the first step of a model with many tensors of few
shapes costs what its *distinct* kernels cost. A pipeline stage written
per tensor (a slice at a constant offset, a constant index) adds kernels
with the tensor count; one written per shape does not. For each
configuration this compiles `stateless_apply` for a model of 2N tensors
of two shapes and counts the distinct fused computations in the optimized
HLO (names and metadata removed), the fused kernels it launches (identical
ones each time), and times lowering plus compiling, for N = 10 and 30;
Keras's Adam, with and without its accumulation, compiled the same way,
for comparison.

    KERAS_BACKEND=jax python benchmarks/compiled_kernels.py [--markdown]
"""

import argparse
import re
import time

CONFIGURATIONS = {
    "Adam K=1": {},
    "Adam K=1 on_nonfinite=apply": {"on_nonfinite": "apply"},
    "Adam K=4 macro": {"accumulation_steps": 4},
    "Adam K=4 macro on_nonfinite=apply": {
        "accumulation_steps": 4,
        "on_nonfinite": "apply",
    },
    "Adam K=4 micro": {"accumulation_steps": 4, "second_moment": "micro"},
    "Adam K=4 micro on_nonfinite=apply": {
        "accumulation_steps": 4,
        "second_moment": "micro",
        "on_nonfinite": "apply",
    },
    "Adam K=4 micro, clipnorm": {
        "accumulation_steps": 4,
        "second_moment": "micro",
        "clipnorm": 1.0,
    },
    "Adam K=4 noise": {"accumulation_steps": 4, "noise_eta": 1e-3},
    "Adam K=4 clip+noise+statistics": {
        "accumulation_steps": 4,
        "global_clipnorm": 1.0,
        "noise_eta": 1e-3,
        "track_gradient_statistics": True,
    },
}


# Keras's own optimizers, compiled the same way, for comparison.
KERAS_CONFIGURATIONS = {
    "Keras Adam": {},
    "Keras Adam(gradient_accumulation_steps=4)": {
        "gradient_accumulation_steps": 4
    },
}


def fused_kernel_instances(hlo_text):
    """The number of fusion instructions (kernel launches, identical ones
    counted each time) in the entry and branch computations."""
    return len(re.findall(r" fusion\(", hlo_text))


def distinct_fused_kernels(hlo_text):
    """The number of distinct fused computations in an optimized HLO module
    (`compiled.as_text()`), with instruction names and metadata removed."""
    computations = re.split(r"\n(?=%?\S+ \(.*\) -> .* \{\n)", hlo_text)
    kernels = set()
    for computation in computations:
        name = re.match(r"%?(\S+) \(", computation)
        if name is None or "fus" not in name.group(1):
            continue
        body = computation.split("\n", 1)[1]
        body = re.sub(r"%[\w.\-]+", "%x", body)
        body = re.sub(r", metadata=\{[^}]*\}", "", body)
        kernels.add(body)
    return len(kernels)


def compiled_update(layers, keras_optimizer=False, **kwargs):
    """Compiles `kg.Adam(**kwargs).stateless_apply` (with `keras_optimizer`,
    `keras.optimizers.Adam(**kwargs)`'s) for `2 * layers` tensors of shapes
    (16, 16) and (16,) with `jax.jit`.

    Returns:
        `(distinct kernels, seconds to lower and compile, fused-kernel
        instances)`.
    """
    import jax
    import keras
    import numpy as np

    import keras_gradtools as kg

    variables = [
        keras.Variable(np.zeros(shape, "float32"))
        for _ in range(layers)
        for shape in ((16, 16), (16,))
    ]
    if keras_optimizer:
        optimizer = keras.optimizers.Adam(1e-3, **kwargs)
    else:
        optimizer = kg.Adam(1e-3, **kwargs)
    optimizer.build(variables)
    grads = [np.ones(v.shape, "float32") for v in variables]

    def step(optimizer_values, values, grads):
        return optimizer.stateless_apply(optimizer_values, grads, values)

    start = time.perf_counter()
    compiled = (
        jax.jit(step)
        .lower(
            [v.value for v in optimizer.variables],
            [v.value for v in variables],
            grads,
        )
        .compile()
    )
    seconds = time.perf_counter() - start
    text = compiled.as_text()
    return distinct_fused_kernels(text), seconds, fused_kernel_instances(text)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--layers", default="10,30")
    args = parser.parse_args(argv)
    import keras

    if keras.backend.backend() != "jax":
        raise SystemExit("run with KERAS_BACKEND=jax")
    counts = [int(n) for n in args.layers.split(",")]
    header = ["configuration"]
    header += [f"kernels, {2 * n} tensors" for n in counts]
    header += [f"fusions, {2 * n} tensors" for n in counts]
    header += [f"compile s, {2 * n} tensors" for n in counts]
    rows = []
    configurations = [
        (f"ours {name}", False, kwargs)
        for name, kwargs in CONFIGURATIONS.items()
    ] + [(name, True, kwargs) for name, kwargs in KERAS_CONFIGURATIONS.items()]
    for name, keras_optimizer, kwargs in configurations:
        measured = [
            compiled_update(n, keras_optimizer=keras_optimizer, **kwargs)
            for n in counts
        ]
        rows.append(
            [name]
            + [str(kernels) for kernels, _, _ in measured]
            + [str(instances) for _, _, instances in measured]
            + [f"{seconds:.1f}" for _, seconds, _ in measured]
        )
    if args.markdown:
        print("| " + " | ".join(header) + " |")
        print("| --- |" + " ---: |" * (len(header) - 1))
        for row in rows:
            print("| " + " | ".join(row) + " |")
    else:
        print("  ".join(header))
        for row in rows:
            print("  ".join(row))
    print("benchmark: ok")


if __name__ == "__main__":
    main()
