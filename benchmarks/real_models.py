"""Time to the first `fit` step, steady-state step time, optimizer state and
peak memory on real architectures built from configuration (issue 25,
item 1; docs/performance.md, "Time to the first step").

Usage:

    KERAS_BACKEND=jax python benchmarks/real_models.py [--quick]
        [--models mobilenetv3small,resnet50,bert,gemma_lora]
        [--tensors 50,200,500,2000] [--rounds R] [--markdown] [--json PATH]
        [--plot PNG]
    python benchmarks/real_models.py --from-json PATH [--markdown] [--plot PNG]

Models (no weights are downloaded, every one is built from configuration):
`keras.applications.MobileNetV3Small` and `ResNet50` at 32x32x3 with 10
classes; when `keras_hub` is importable, a BERT encoder classifier and a
Gemma causal LM with LoRA (rank 4) on its backbone, 12 layers deep and 64
wide (else they are skipped, with a line saying so); and an MLP of
`Dense(16, tanh)` layers with each count of trainable tensors `--tensors`
names (a sweep of the variable count, which tracing and compile time grow
with).

Configurations: Keras's Adam; Keras's `Adam(gradient_accumulation_steps=4)`;
ours `kg.Adam` K=1; K=4 "macro"; K=4 "micro"; K=4 "macro" with
`global_clipnorm=1.0, noise_eta=0.01, track_gradient_statistics=True`;
and, on JAX, `optax.MultiSteps(optax.adam(1e-3), 4)` in a custom loop (the
model's `stateless_call`, `jax.value_and_grad` and the optax update in one
`jax.jit` step with donated state, timed the same way).

The KerasHub models need `keras-hub`, which pulls `tensorflow-text` and the
full TensorFlow; install it without them:

    pip install --no-deps keras-hub
    pip install absl-py regex rich tokenizers kagglehub

Each (model, configuration) runs in a fresh subprocess, so nothing compiled
or imported is shared and its peak resident memory is its own: a first
`fit` of one micro-batch with `jit_compile=True`, timed from the call to
its return (compilation included), then a second `fit` of warm-up and
steady micro-batches, timed at the end of each (a callback, so that
asynchronous dispatch is waited for). Steady-state time per micro-batch is
the median over windows of 4 consecutive micro-batches (one K=4 cycle) of
the window's mean. Optimizer state is the sum of the sizes of
`optimizer.variables`; peak memory the child's max RSS
(`getrusage(RUSAGE_SELF)`, imports included, the same for every row).

The configurations run one after the other for each model, the models one
after the other, in each of R rounds (interleaved). Reported are ratios
measured side by side in one run (median over rounds): to Keras's Adam, and
for K=4 configurations also to Keras's accumulation. Absolute times go to
`--json` only, for reference; `--plot` draws the MLP sweep (time to the
first step against the trainable-tensor count, every configuration from
the same run, and its ratio to Keras's), and `--from-json` prints the
tables and draws the plot again from a saved `--json` without measuring.
Timings are never asserted. `--quick` (a CI
smoke test): the MLP at 50 tensors only, 1 round, one steady window; it
prints `benchmark: ok` last.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import configurations  # noqa: E402
import machine  # noqa: E402
import report  # noqa: E402

CONFIGURATIONS = (
    "keras adam",
    "keras accumulation K=4",
    "ours K=1",
    "ours K=4 macro",
    "ours K=4 micro",
    "ours K=4 clip+noise+statistics",
    "optax MultiSteps K=4",
)
# A custom JAX loop (optax has no `fit`): measured on JAX only.
OPTAX = CONFIGURATIONS[-1]
KERAS_ADAM = CONFIGURATIONS[0]
KERAS_ACCUMULATION = CONFIGURATIONS[1]
APPLICATIONS = ("mobilenetv3small", "resnet50")
KERAS_HUB_MODELS = ("bert", "gemma_lora")
DEFAULT_MODELS = APPLICATIONS + KERAS_HUB_MODELS
DEFAULT_TENSORS = (50, 200, 500, 2000)
WINDOW = 4  # micro-batches per steady window: one K=4 cycle
BATCH = 32
# The KerasHub models' depth (BERT-base's and Gemma-2B's order of tensor
# count: 12 layers give the BERT classifier about 200 trainable tensors),
# at a small width so that a CPU run takes minutes.
LAYERS = 12


def _optimizer(configuration):
    return configurations.adam_optimizer(configuration, noise_eta=0.01)


def keras_hub_available():
    try:
        import keras_hub  # noqa: F401
    except ImportError:
        return False
    return True


def _mlp(tensors):
    """`tensors // 2` Dense layers (kernel and bias each) on 16 features."""
    import keras

    # Keras walks a Sequential model's graph recursively, a few frames per
    # layer: 1,000 layers pass Python's default limit of 1,000 frames.
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * tensors + 1000))

    layers = [keras.Input((16,))]
    layers += [
        keras.layers.Dense(16, activation="tanh")
        for _ in range(max(tensors // 2 - 1, 0))
    ]
    return keras.Sequential(layers + [keras.layers.Dense(10)])


def _build(name, steps):
    """The model `name`, its loss and `steps` micro-batches of data."""
    import keras
    import numpy as np

    rng = np.random.default_rng(0)
    n = BATCH * steps
    sparse = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    if name.startswith("mlp"):
        model = _mlp(int(name[3:]))
        x = rng.standard_normal((n, 16), dtype="float32")
        return model, sparse, x, rng.integers(0, 10, n)
    if name in APPLICATIONS:
        application = {
            "mobilenetv3small": keras.applications.MobileNetV3Small,
            "resnet50": keras.applications.ResNet50,
        }[name]
        model = application(
            weights=None,
            input_shape=(32, 32, 3),
            classes=10,
            classifier_activation=None,
        )
        x = rng.random((n, 32, 32, 3), dtype="float32")
        return model, sparse, x, rng.integers(0, 10, n)
    import keras_hub

    length, vocabulary = 64, 1000
    tokens = rng.integers(1, vocabulary, (n, length)).astype("int32")
    mask = np.ones((n, length), dtype="bool")
    if name == "bert":
        backbone = keras_hub.models.BertBackbone(
            vocabulary_size=vocabulary,
            num_layers=LAYERS,
            num_heads=2,
            hidden_dim=64,
            intermediate_dim=128,
            max_sequence_length=length,
        )
        model = keras_hub.models.BertTextClassifier(
            backbone, num_classes=2, preprocessor=None
        )
        x = {
            "token_ids": tokens,
            "segment_ids": np.zeros_like(tokens),
            "padding_mask": mask,
        }
        return model, sparse, x, rng.integers(0, 2, n)
    if name == "gemma_lora":
        backbone = keras_hub.models.GemmaBackbone(
            vocabulary_size=vocabulary,
            num_layers=LAYERS,
            num_query_heads=2,
            num_key_value_heads=1,
            hidden_dim=64,
            intermediate_dim=128,
            head_dim=32,
        )
        backbone.enable_lora(rank=4)
        model = keras_hub.models.GemmaCausalLM(backbone, preprocessor=None)
        x = {"token_ids": tokens[:, :-1], "padding_mask": mask[:, :-1]}
        return model, sparse, x, tokens[:, 1:]
    raise ValueError(f"unknown model {name!r}")


def _state_bytes(optimizer):
    import numpy as np

    return int(
        sum(
            int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize
            for v in optimizer.variables
        )
    )


def run_one(name, configuration, windows):
    """Measures one (model, configuration) in this (fresh) process and
    prints one `RESULT {json}` line."""
    import resource

    import keras

    if configuration == OPTAX:
        print("RESULT " + json.dumps(_run_optax(name, windows)), flush=True)
        return
    keras.utils.set_random_seed(0)
    warmup = WINDOW  # one K=4 cycle after the first step
    steps = 1 + warmup + WINDOW * windows
    model, loss, x, y = _build(name, steps)
    model.compile(
        optimizer=_optimizer(configuration), loss=loss, jit_compile=True
    )

    def take(data, start, stop):
        if isinstance(data, dict):
            return {k: v[start:stop] for k, v in data.items()}
        return data[start:stop]

    start = time.perf_counter()
    model.fit(take(x, 0, BATCH), y[:BATCH], batch_size=BATCH, verbose=0)
    first = time.perf_counter() - start

    ends = []

    class Clock(keras.callbacks.Callback):
        # Not async-safe: Keras turns the logs into Python numbers before
        # calling it, which waits for the step to finish.
        def on_train_batch_end(self, batch, logs=None):
            ends.append(time.perf_counter())

    model.fit(
        take(x, BATCH, None),
        y[BATCH:],
        batch_size=BATCH,
        verbose=0,
        shuffle=False,
        callbacks=[Clock()],
    )
    # ends[warmup - 1] closes the warm-up; each window is WINDOW steps.
    per_step = [
        (ends[warmup - 1 + WINDOW * (w + 1)] - ends[warmup - 1 + WINDOW * w])
        / WINDOW
        for w in range(windows)
    ]
    result = {
        "backend": keras.backend.backend(),
        "keras": keras.__version__,
        "model": name,
        "configuration": configuration,
        "trainable_tensors": len(model.trainable_weights),
        "parameters": int(model.count_params()),
        "first_step_s": first,
        "step_s": statistics.median(per_step),
        "state_bytes": _state_bytes(model.optimizer),
        "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        * 1024,  # KiB on Linux
    }
    print("RESULT " + json.dumps(result), flush=True)


def _run_optax(name, windows):
    """`run_one` for optax's `MultiSteps` in a custom JAX loop."""
    import functools
    import resource

    import jax
    import keras
    import numpy as np
    import optax

    keras.utils.set_random_seed(0)
    warmup = WINDOW
    steps = 1 + warmup + WINDOW * windows
    model, loss, x, y = _build(name, steps)
    transform = optax.MultiSteps(optax.adam(1e-3), every_k_schedule=4)
    trainable = [v.value for v in model.trainable_variables]
    non_trainable = [v.value for v in model.non_trainable_variables]
    state = transform.init(trainable)

    def loss_of(trainable, non_trainable, x, y):
        out, non_trainable = model.stateless_call(
            trainable, non_trainable, x, training=True
        )
        return loss(y, out), non_trainable

    @functools.partial(jax.jit, donate_argnums=(0, 1, 2))
    def step(trainable, non_trainable, state, x, y):
        (value, non_trainable), grads = jax.value_and_grad(
            loss_of, has_aux=True
        )(trainable, non_trainable, x, y)
        updates, state = transform.update(grads, state, trainable)
        return (
            value,
            optax.apply_updates(trainable, updates),
            (non_trainable),
            state,
        )

    def batch(data, i):
        if isinstance(data, dict):
            return {k: v[i * BATCH : (i + 1) * BATCH] for k, v in data.items()}
        return data[i * BATCH : (i + 1) * BATCH]

    ends = []
    start = time.perf_counter()
    for i in range(steps):
        value, trainable, non_trainable, state = step(
            trainable, non_trainable, state, batch(x, i), batch(y, i)
        )
        jax.block_until_ready(value)
        ends.append(time.perf_counter())
    per_step = [
        (ends[warmup + WINDOW * (w + 1)] - ends[warmup + WINDOW * w]) / WINDOW
        for w in range(windows)
    ]
    return {
        "backend": keras.backend.backend(),
        "keras": keras.__version__,
        "model": name,
        "configuration": OPTAX,
        "trainable_tensors": len(model.trainable_weights),
        "parameters": int(model.count_params()),
        "first_step_s": ends[0] - start,
        "step_s": statistics.median(per_step),
        "state_bytes": int(
            sum(
                int(np.prod(leaf.shape)) * leaf.dtype.itemsize
                for leaf in jax.tree_util.tree_leaves(state)
            )
        ),
        "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        * 1024,
    }


def measure(name, configuration, windows):
    completed = subprocess.run(
        [
            sys.executable,
            os.path.abspath(__file__),
            "--one",
            f"{name}:{configuration}",
            "--windows",
            str(windows),
        ],
        capture_output=True,
        text=True,
        timeout=3600,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
    )
    for line in completed.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    raise RuntimeError(
        f"{name} / {configuration} failed:\n{completed.stderr[-3000:]}"
    )


def _median_ratio(mine, reference, metric):
    """Median over rounds of `metric` of `mine` / that of `reference` in
    the same round."""
    return statistics.median(
        a[metric] / b[metric] for a, b in zip(mine, reference)
    )


def _ratio(mine, reference, metric):
    """`_median_ratio`, formatted ("-" without a reference)."""
    if not reference:
        return "-"
    return f"{_median_ratio(mine, reference, metric):.2f}x"


def _table(results, models, configurations, markdown):
    header = [
        "model (tensors)",
        "configuration",
        "first step / keras adam",
        "first step / keras acc",
        "step / keras adam",
        "step / keras acc",
        "state / keras adam",
        "state MiB",
        "peak RSS / keras adam",
    ]
    rows = []
    for name in models:
        for configuration in configurations:
            mine = results[name][configuration]
            base = results[name].get(KERAS_ADAM)
            # Only K=4 configurations compare to Keras's accumulation.
            acc = None
            if "K=4" in configuration:
                acc = results[name].get(KERAS_ACCUMULATION)
            rows.append(
                [
                    f"{name} ({mine[0]['trainable_tensors']})",
                    configuration,
                    _ratio(mine, base, "first_step_s"),
                    _ratio(mine, acc, "first_step_s"),
                    _ratio(mine, base, "step_s"),
                    _ratio(mine, acc, "step_s"),
                    _ratio(mine, base, "state_bytes"),
                    f"{mine[0]['state_bytes'] / 2**20:.2f}",
                    _ratio(mine, base, "max_rss_bytes"),
                ]
            )
    return report.format_table(header, rows, markdown)


def _sweep(results):
    """The MLP rows of `results`, ordered by tensor count."""
    names = [n for n in results if n.startswith("mlp")]
    return sorted(names, key=lambda n: int(n[3:]))


def plot(results, path):
    """Draws the MLP sweep of `results` to `path`: time to the first step
    against the trainable-tensor count (log-log) for every configuration,
    and each one's ratio to Keras's Adam (K=1) or Keras's accumulation
    (K=4), medians over rounds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = _sweep(results)
    if len(names) < 2:
        raise ValueError(
            f"--plot needs at least two MLP tensor counts, got {names}"
        )
    tensors = [int(n[3:]) for n in names]
    figure, (times, ratios) = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for number, configuration in enumerate(results[names[0]]):
        color = colors[number % len(colors)]
        seconds = [
            statistics.median(
                r["first_step_s"] for r in results[n][configuration]
            )
            for n in names
        ]
        style = "--" if configuration.startswith(("keras", "optax")) else "-"
        times.plot(
            tensors,
            seconds,
            style,
            color=color,
            marker="o",
            label=configuration,
        )
        reference = KERAS_ACCUMULATION if "K=4" in configuration else KERAS_ADAM
        if configuration in (KERAS_ADAM, KERAS_ACCUMULATION):
            continue
        if reference not in results[names[0]]:
            continue
        ratios.plot(
            tensors,
            [
                _median_ratio(
                    results[n][configuration],
                    results[n][reference],
                    "first_step_s",
                )
                for n in names
            ],
            style,
            color=color,
            marker="o",
            label=f"{configuration} / {reference}",
        )
    times.set(
        xscale="log",
        yscale="log",
        xlabel="trainable tensors (MLP of Dense(16))",
        ylabel="time to the first fit step (s)",
    )
    ratios.axhline(1.0, color="grey", linewidth=0.8)
    ratios.set(
        xscale="log",
        xlabel="trainable tensors",
        ylabel="first step, ratio to Keras's",
    )
    times.legend(fontsize=7)
    ratios.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="benchmarks/real_models.py",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    parser.add_argument(
        "--models",
        default=",".join(DEFAULT_MODELS),
        help="comma-separated: " + ", ".join(DEFAULT_MODELS) + " (or none)",
    )
    parser.add_argument(
        "--tensors",
        default=",".join(map(str, DEFAULT_TENSORS)),
        help="trainable-tensor counts of the MLP sweep (empty: none)",
    )
    parser.add_argument(
        "--configurations",
        default=None,
        help="comma-separated (default: all; optax's on JAX only)",
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--windows",
        type=int,
        default=5,
        help=f"steady windows of {WINDOW} micro-batches",
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--json", default=None, metavar="PATH")
    parser.add_argument(
        "--plot",
        default=None,
        metavar="PNG",
        help="draw the MLP sweep (needs two tensor counts or more)",
    )
    parser.add_argument(
        "--from-json",
        default=None,
        metavar="PATH",
        help="report a saved --json run instead of measuring",
    )
    args = parser.parse_args(argv)
    if args.one:
        name, configuration = args.one.split(":", 1)
        run_one(name, configuration, args.windows)
        return 0
    if args.from_json:
        return _report_saved(args)
    # Keras is imported by the children only (the backend and version
    # come from their results): the parent's import would cost seconds.
    models = [m for m in args.models.split(",") if m and m != "none"]
    tensors = [int(t) for t in args.tensors.split(",") if t]
    if args.quick:
        models, tensors, args.rounds, args.windows = [], [50], 1, 1
    unknown = set(models) - set(DEFAULT_MODELS)
    if unknown:
        parser.error(f"unknown models: {sorted(unknown)}")
    if args.configurations is None:
        configurations = list(CONFIGURATIONS)
        if os.environ.get("KERAS_BACKEND") != "jax":
            configurations.remove(OPTAX)
    else:
        configurations = args.configurations.split(",")
    unknown = set(configurations) - set(CONFIGURATIONS)
    if unknown:
        parser.error(f"unknown configurations: {sorted(unknown)}")
    skipped = [m for m in models if m in KERAS_HUB_MODELS]
    if skipped and not keras_hub_available():
        print(f"keras_hub not installed: skipped ({', '.join(skipped)})")
        models = [m for m in models if m not in KERAS_HUB_MODELS]
    models += [f"mlp{t}" for t in tensors]
    if not models:
        parser.error("no model to measure")
    results = {m: {c: [] for c in configurations} for m in models}
    for _ in range(args.rounds):
        for name in models:
            for configuration in configurations:
                results[name][configuration].append(
                    measure(name, configuration, args.windows)
                )
    first = results[models[0]][configurations[0]][0]
    print(
        f"backend: {first['backend']}; keras {first['keras']}; "
        f"{machine.cpu_model()}, {machine.cpu_count()} cores; "
        f"micro-batch {BATCH}; {args.rounds} round(s), {args.windows} "
        f"steady window(s) of {WINDOW}"
    )
    print("ratios measured side by side in this run (median over rounds);")
    print("keras acc = Keras Adam(gradient_accumulation_steps=4)")
    print(_table(results, models, configurations, args.markdown))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "backend": first["backend"],
                    "keras": first["keras"],
                    "cpu": machine.cpu_model(),
                    "cores": machine.cpu_count(),
                    "micro_batch": BATCH,
                    "rounds": args.rounds,
                    "windows": args.windows,
                    "date": time.strftime("%Y-%m-%d"),
                    "results": results,
                },
                f,
                indent=1,
            )
        print(f"wrote {args.json}")
    if args.plot:
        plot(results, args.plot)
        print(f"wrote {args.plot}")
    print("benchmark: ok")
    return 0


def _report_saved(args):
    with open(args.from_json) as f:
        saved = json.load(f)
    results = saved["results"]
    models = list(results)
    configurations = list(results[models[0]])
    print(
        f"backend: {saved['backend']}; keras {saved['keras']}; "
        f"{saved['cpu']}, {saved['cores']} cores; micro-batch "
        f"{saved['micro_batch']}; {saved['rounds']} round(s), "
        f"{saved['windows']} steady window(s) of {WINDOW}; measured "
        f"{saved['date']} (from {args.from_json})"
    )
    print(_table(results, models, configurations, args.markdown))
    if args.plot:
        plot(results, args.plot)
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
