"""Does Adam's "micro" second moment train better than "macro"? Measured.

Usage:

    python benchmarks/outcomes.py [--quick] [--seeds S] [--tasks T,...]
                                  [--markdown] [--plot PATH] [--exact K,...]

Three tasks that ship offline (nothing is downloaded):

- `digits`: scikit-learn's 8x8 digits, the demo's MLP (64-128-64-10),
  micro-batches of 32 samples;
- `char-lm`: a one-layer causal Transformer language model (about 50k
  parameters, context 64) on the source of Python's standard library,
  training and validation text from different, fixed modules; micro-batches
  of 16 windows; the loss in bits per character;
- `padded-tags`: a token-level task on padded sequences (`mask_zero=True`):
  each token's tag depends on the token and on the sequence's hidden topic,
  which only the whole sequence reveals. Every micro-batch holds sequences
  of one length, drawn log-uniformly from 2 to 64 tokens, so the number of
  real tokens varies up to 32-fold between the micro-batches of an update.

Modes, all Adam, all at the same micro-batch, given the same samples in the
same order for a seed (paired), for the same number of micro-batches:

- `K=1`: `kg.Adam`, one update per micro-batch;
- `K=k keras`: `keras.optimizers.Adam(gradient_accumulation_steps=k)`;
- `K=k macro`, `K=k micro`: `kg.Adam(accumulation_steps=k,
  second_moment=...)`;
- `K=k micro*sqrtK`: "micro" at sqrt(k) times the learning rate. "micro"'s
  second moment holds the variance within an update, so its step is up to
  sqrt(k) times smaller than "macro"'s at one rate; this variant undoes
  that, to give "micro" a fair chance.

Each mode runs over a grid of learning rates (log-spaced, spanning the K=1
optimum and higher) and S seeds (default 3). Reported: the final
validation loss at every rate (median and range over seeds), each mode at
its tuned rate (the lowest median), at the rate tuned for K=1 and at the
highest rate, and paired differences against "macro". With `--plot`, a PNG
of validation loss against learning rate, one panel per task. `--quick` is
a smoke test (one seed, two rates, tiny budgets). Prints `benchmark: ok`
last.

With `--exact K,...` the modes are instead K=1 and, at each K, "macro"
without and with `kg.exact_accumulation` (`K=k macro exact`: each
micro-batch weighs by the count its loss was averaged over, its valid
tokens on padded-tags, so an update is one big batch's). Added: the valid
entries per micro-batch, the paired differences exact - macro at every
rate, and how far the mean of means is from the exact gradient on the
first 8 updates of each seed (one `kg.SGD(1.0)` update each, at the
initial weights). Meant for `--tasks padded-tags`; on the other tasks
every micro-batch has the same count (a control).

A mode is a name, an optimizer factory (learning rate -> optimizer) and a
factory of Keras callbacks, so that a policy that changes K during training
(e.g. `kg.AdaptiveAccumulation`) is one more mode. Each mode's model is
compiled once per task; every run then loads the seed's initial weights and
a fresh optimizer's state (built by the factory at the run's rate) into it,
which is exactly a new run without a new compilation. A factory must
therefore vary only the optimizer's state (learning rate, K, ...) with the
rate, never its configuration.
"""

import argparse
import dataclasses
import math
import os
import shlex
import sys
import time
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import machine  # noqa: E402
import report  # noqa: E402

# The configuration keys a mode's factory may vary with the learning rate.
_STATE_KEYS = ("learning_rate", "noise_seed", "name")


@dataclasses.dataclass(frozen=True)
class Mode:
    """One way to train: a name, an optimizer factory and callbacks.

    Attributes:
        name: The row's label in the tables and the plot's legend.
        optimizer: `learning_rate -> keras.optimizers.Optimizer`.
        callbacks: `() -> list` of fresh Keras callbacks for one run.
        accumulation_steps: K the mode starts with (the report groups the
            modes by it).
        family: `"plain"`, `"keras"`, `"macro"`, `"micro"` or another
            label: the plot's colour.
        prepare: Optional `model -> None`, applied to the mode's model
            after `compile` and before the optimizer is built (e.g.
            `kg.exact_accumulation`); part of the compilation's key.
    """

    name: str
    optimizer: Callable
    callbacks: Callable = list
    accumulation_steps: int = 1
    family: str = "plain"
    prepare: Callable | None = None


def standard_modes(ks, with_keras=True):
    """K=1, then for every K in `ks` Keras's accumulation (unless
    `with_keras` is false), "macro", "micro" and "micro" at sqrt(K) times
    the rate."""
    import keras

    import keras_gradtools as kg

    modes = [Mode("K=1", lambda lr: kg.Adam(lr))]
    for k in ks:
        if with_keras:
            modes.append(
                Mode(
                    f"K={k} keras",
                    lambda lr, k=k: keras.optimizers.Adam(
                        lr, gradient_accumulation_steps=k
                    ),
                    accumulation_steps=k,
                    family="keras",
                )
            )
        modes += [
            Mode(
                f"K={k} macro",
                lambda lr, k=k: kg.Adam(
                    lr, accumulation_steps=k, second_moment="macro"
                ),
                accumulation_steps=k,
                family="macro",
            ),
            Mode(
                f"K={k} micro",
                lambda lr, k=k: kg.Adam(
                    lr, accumulation_steps=k, second_moment="micro"
                ),
                accumulation_steps=k,
                family="micro",
            ),
            Mode(
                f"K={k} micro*sqrtK",
                lambda lr, k=k: kg.Adam(
                    lr * math.sqrt(k),
                    accumulation_steps=k,
                    second_moment="micro",
                ),
                accumulation_steps=k,
                family="micro*sqrtK",
            ),
        ]
    return modes


def exact_modes(ks):
    """K=1, then for every K in `ks` "macro" without and with
    `kg.exact_accumulation` (each micro-batch weighs by the count its loss
    was averaged over, e.g. its valid tokens: one big batch's update)."""
    import keras_gradtools as kg

    modes = [Mode("K=1", lambda lr: kg.Adam(lr))]
    for k in ks:
        modes += [
            Mode(
                f"K={k} macro",
                lambda lr, k=k: kg.Adam(lr, accumulation_steps=k),
                accumulation_steps=k,
                family="macro",
            ),
            Mode(
                f"K={k} macro exact",
                # `exact_accumulation` sets this on the compiled optimizer;
                # the fresh optimizers of later runs must match it.
                lambda lr, k=k: kg.Adam(
                    lr, accumulation_steps=k, weighted_accumulation=True
                ),
                accumulation_steps=k,
                family="exact",
                prepare=kg.exact_accumulation,
            ),
        ]
    return modes


@dataclasses.dataclass
class Task:
    """A training problem.

    Attributes:
        name: Its label.
        model: `seed -> keras.Model` (not compiled), seeded.
        stream: `(seed, micro_batches) -> (x, y)`: the training samples in
            the order they are consumed, `micro_batches * micro_batch` rows.
        validation: `(x_val, y_val)`, evaluated in one batch.
        micro_batch: Samples per micro-batch.
        micro_batches: The budget: micro-batches per run.
        learning_rates: The grid.
        ks: The K values compared.
        with_keras: Whether to run Keras's own accumulation too.
        unit: The loss's unit in the tables.
        scale: Factor from the loss in nats to `unit`.
    """

    name: str
    model: Callable
    stream: Callable
    validation: tuple
    micro_batch: int
    micro_batches: int
    learning_rates: tuple
    ks: tuple
    with_keras: bool = True
    unit: str = "nats"
    scale: float = 1.0


# ---------------------------------------------------------------- digits


def digits_task(quick):
    """The demo's MLP on scikit-learn's digits (1347 training samples)."""
    import numpy as np
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = (data.data / 16.0).astype("float32")
    y = data.target.astype("int32")
    x_train, x_val, y_train, y_val = train_test_split(
        x, y, test_size=0.25, random_state=0, stratify=y
    )

    def model(seed):
        from keras_gradtools.demo import build_model

        return build_model(seed)

    def stream(seed, micro_batches):
        # Epochs of the training set, each in a fresh order of the seed.
        rng = np.random.default_rng(1000 + seed)
        need = micro_batches * 32
        order = []
        while len(order) * len(x_train) < need:
            order.append(rng.permutation(len(x_train)))
        index = np.concatenate(order)[:need]
        return x_train[index], y_train[index]

    return Task(
        name="digits",
        model=model,
        stream=stream,
        validation=(x_val, y_val),
        micro_batch=32,
        micro_batches=64 if quick else 1024,
        learning_rates=(3e-3, 3e-2)
        if quick
        else (3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1),
        ks=(8,) if quick else (8, 32),
    )


# ---------------------------------------------------------------- char LM

CONTEXT = 64
# Fixed lists: training and validation text from different modules.
LM_TRAIN_MODULES = (
    "argparse.py",
    "ast.py",
    "calendar.py",
    "configparser.py",
    "csv.py",
    "dataclasses.py",
    "difflib.py",
    "enum.py",
    "fractions.py",
    "functools.py",
    "inspect.py",
    "logging/__init__.py",
    "optparse.py",
    "pprint.py",
    "random.py",
    "shutil.py",
    "statistics.py",
    "tarfile.py",
    "textwrap.py",
    "threading.py",
    "typing.py",
)
LM_VALIDATION_MODULES = (
    "imaplib.py",
    "mailbox.py",
    "pickletools.py",
    "subprocess.py",
)
LM_VALIDATION_WINDOWS = 512


def stdlib_text(modules):
    """The source of `modules` (paths under the standard library),
    concatenated."""
    import sysconfig

    root = sysconfig.get_paths()["stdlib"]
    parts = []
    for module in modules:
        with open(os.path.join(root, module), encoding="utf-8") as f:
            parts.append(f.read())
    return "\n".join(parts)


def encode(text):
    """Characters as ids: 1 newline, 2..96 printable ASCII, 0 the rest."""
    import numpy as np

    codes = np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype("int32")
    ids = np.where((codes >= 32) & (codes <= 126), codes - 30, 0)
    return np.where(codes == 10, 1, ids).astype("int32")


LM_VOCABULARY = 97


def char_lm_model(seed, layers=1, width=64, heads=4):
    """A causal Transformer language model (pre-norm), seeded."""
    import keras

    class Positions(keras.layers.Layer):
        """Adds a learned position embedding."""

        def build(self, input_shape):
            self.table = self.add_weight(
                shape=(input_shape[1], input_shape[2]),
                initializer=keras.initializers.RandomNormal(stddev=0.02),
                name="positions",
            )

        def call(self, x):
            return x + self.table

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((CONTEXT,), dtype="int32")
    x = keras.layers.Embedding(LM_VOCABULARY, width)(inputs)
    x = Positions()(x)
    for _ in range(layers):
        h = keras.layers.LayerNormalization()(x)
        h = keras.layers.MultiHeadAttention(heads, width // heads)(
            h, h, use_causal_mask=True
        )
        x = keras.layers.Add()([x, h])
        h = keras.layers.LayerNormalization()(x)
        h = keras.layers.Dense(2 * width, activation="gelu")(h)
        h = keras.layers.Dense(width)(h)
        x = keras.layers.Add()([x, h])
    x = keras.layers.LayerNormalization()(x)
    outputs = keras.layers.Dense(LM_VOCABULARY)(x)
    return keras.Model(inputs, outputs, name="char_lm")


def char_lm_task(quick):
    """Next-character prediction on the standard library's source."""
    import numpy as np

    train = encode(stdlib_text(LM_TRAIN_MODULES))
    val = encode(stdlib_text(LM_VALIDATION_MODULES))
    # Fixed validation windows, evenly spaced over the validation text.
    starts = np.linspace(
        0, len(val) - CONTEXT - 2, LM_VALIDATION_WINDOWS
    ).astype(int)
    window = np.arange(CONTEXT + 1)
    val_windows = val[starts[:, None] + window]
    micro_batch = 16

    def stream(seed, micro_batches):
        rng = np.random.default_rng(2000 + seed)
        starts = rng.integers(
            0, len(train) - CONTEXT - 1, micro_batches * micro_batch
        )
        windows = train[starts[:, None] + window]
        return windows[:, :-1], windows[:, 1:]

    return Task(
        name="char-lm",
        model=char_lm_model,
        stream=stream,
        validation=(val_windows[:, :-1], val_windows[:, 1:]),
        micro_batch=micro_batch,
        micro_batches=16 if quick else 768,
        learning_rates=(3e-3, 3e-2) if quick else (3e-4, 1e-3, 3e-3, 1e-2),
        ks=(8,),
        # Keras's accumulation equals "macro" bit for bit on the other two
        # tasks (measured); here it would cost a fifth of the run.
        with_keras=False,
        unit="bits/char",
        scale=1 / math.log(2),
    )


# ------------------------------------------------------- padded sequences

PAD_LENGTH = 64
TAG_VOCABULARY = 32  # token ids 1..31; 0 is padding
TOPICS = 4
TAGS = 4
TAG_NOISE = 0.1


def tagging_model(seed, width=32):
    """Per-token tags from the token and the (masked) mean of its sequence.
    `Embedding(mask_zero=True)` makes the padding mask, which reaches the
    output, so the loss of a micro-batch is the mean over its real tokens
    (as Keras computes a masked loss)."""
    import keras
    from keras import ops

    class AppendContext(keras.layers.Layer):
        """Appends to every position the masked mean over the sequence;
        passes the mask on."""

        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.supports_masking = True

        def call(self, x, mask=None):
            weights = ops.expand_dims(ops.cast(mask, x.dtype), -1)
            total = ops.sum(x * weights, axis=1, keepdims=True)
            count = ops.maximum(ops.sum(weights, axis=1, keepdims=True), 1)
            context = ops.broadcast_to(total / count, ops.shape(x))
            return ops.concatenate([x, context], axis=-1)

        def compute_output_shape(self, input_shape):
            return (*input_shape[:-1], 2 * input_shape[-1])

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((PAD_LENGTH,), dtype="int32")
    h = keras.layers.Embedding(TAG_VOCABULARY, width, mask_zero=True)(inputs)
    h = AppendContext()(h)
    h = keras.layers.Dense(64, activation="relu")(h)
    outputs = keras.layers.Dense(TAGS)(h)
    return keras.Model(inputs, outputs, name="padded_tagger")


def tagging_samples(rng, lengths):
    """Sequences of the given lengths (padded with 0 to PAD_LENGTH) and
    their tags: each sequence draws a topic; its tokens follow the topic's
    distribution; a token's tag is (token + topic) mod TAGS, replaced by a
    random tag with probability TAG_NOISE."""
    import numpy as np

    # The topics' token distributions, fixed (not the seed's).
    fixed = np.random.default_rng(7)
    distributions = fixed.dirichlet(np.full(TAG_VOCABULARY - 1, 0.3), TOPICS)
    n = len(lengths)
    topics = rng.integers(0, TOPICS, n)
    x = np.zeros((n, PAD_LENGTH), "int32")
    y = np.zeros((n, PAD_LENGTH), "int32")
    for i, (topic, length) in enumerate(zip(topics, lengths)):
        tokens = 1 + rng.choice(
            TAG_VOCABULARY - 1, length, p=distributions[topic]
        )
        tags = (tokens + topic) % TAGS
        noisy = rng.random(length) < TAG_NOISE
        tags[noisy] = rng.integers(0, TAGS, noisy.sum())
        x[i, :length] = tokens
        y[i, :length] = tags
    return x, y


def micro_batch_lengths(rng, micro_batches, micro_batch):
    """One length per micro-batch, log-uniform on [2, PAD_LENGTH], for all
    its sequences."""
    import numpy as np

    per_batch = np.exp(
        rng.uniform(math.log(2), math.log(PAD_LENGTH + 1), micro_batches)
    ).astype(int)
    per_batch = np.clip(per_batch, 2, PAD_LENGTH)
    return np.repeat(per_batch, micro_batch)


def padded_tags_task(quick):
    """Token-level tagging of padded sequences whose lengths vary strongly
    between micro-batches."""
    import numpy as np

    micro_batch = 32
    val_rng = np.random.default_rng(3)
    val_lengths = np.clip(
        np.exp(val_rng.uniform(math.log(2), math.log(PAD_LENGTH + 1), 1024)),
        2,
        PAD_LENGTH,
    ).astype(int)
    validation = tagging_samples(val_rng, val_lengths)

    def stream(seed, micro_batches):
        rng = np.random.default_rng(3000 + seed)
        lengths = micro_batch_lengths(rng, micro_batches, micro_batch)
        return tagging_samples(rng, lengths)

    return Task(
        name="padded-tags",
        model=tagging_model,
        stream=stream,
        validation=validation,
        micro_batch=micro_batch,
        micro_batches=64 if quick else 768,
        learning_rates=(3e-3, 3e-2)
        if quick
        else (3e-3, 1e-2, 3e-2, 1e-1, 3e-1),
        ks=(8,) if quick else (8, 32),
    )


TASKS = {
    "digits": digits_task,
    "char-lm": char_lm_task,
    "padded-tags": padded_tags_task,
}


# ------------------------------------------------------------- the runs


def _loss():
    import keras

    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def load_run_state(model, optimizer, fresh, weights):
    """Makes a compiled `model` and its `optimizer` start a new run: the
    seed's initial `weights`, and the state of `fresh`, an optimizer of
    the same configuration (at another learning rate), built here."""
    ours, theirs = _configuration(optimizer), _configuration(fresh)
    if ours != theirs:
        raise ValueError(
            "a mode's factory may vary only the optimizer's state with the "
            f"learning rate: {ours} != {theirs}"
        )
    model.set_weights(weights)
    fresh.build(model.trainable_variables)
    if len(fresh.variables) != len(optimizer.variables):
        raise ValueError("the fresh optimizer's state has another layout")
    for target, source in zip(optimizer.variables, fresh.variables):
        if tuple(target.shape) != tuple(source.shape):
            raise ValueError(f"{target.path}: {target.shape}/{source.shape}")
        target.assign(source.value)


def evaluator(task):
    """A compiled copy of the task's model that measures the validation
    loss of any weights loaded into it: one compilation for all modes."""
    model = task.model(0)
    model.compile(loss=_loss())
    return model


def _configuration(optimizer):
    """What a compiled train step depends on: the class and the
    configuration, less the state a run may set."""
    config = {
        k: v for k, v in optimizer.get_config().items() if k not in _STATE_KEYS
    }
    return type(optimizer).__name__, repr(sorted(config.items()))


def compiled_for(task, mode, compiled):
    """The compiled model and optimizer of `mode` on `task`: from
    `compiled` (a dict keyed by the optimizer's configuration, shared by
    the modes that differ only in state, e.g. "micro" and "micro*sqrtK"),
    compiled and added there on first use."""
    optimizer = mode.optimizer(task.learning_rates[0])
    key = _configuration(optimizer), mode.prepare
    if key not in compiled:
        model = task.model(0)
        model.compile(optimizer=optimizer, loss=_loss())
        if mode.prepare is not None:
            mode.prepare(model)
        optimizer.build(model.trainable_variables)
        compiled[key] = model, optimizer
    return compiled[key]


def fit_run(task, mode, lr, model, weights, stream, evaluations=1, **fit):
    """One run of `mode` at rate `lr` on the compiled `model` (from
    `compiled_for`): the seed's initial `weights` and a fresh optimizer's
    state loaded, then the whole `stream` fed once, in order, in
    `evaluations` epochs of equal length (the last micro-batches that do
    not fill one are left out). `fit`: more arguments of `model.fit`
    (`validation_data`, `callbacks` added to the mode's)."""
    load_run_state(model, model.optimizer, mode.optimizer(lr), weights)
    x, y = stream
    steps = len(x) // task.micro_batch // evaluations
    callbacks = mode.callbacks() + list(fit.pop("callbacks", ()))
    return model.fit(
        x,
        y,
        batch_size=task.micro_batch,
        epochs=evaluations,
        steps_per_epoch=steps if evaluations > 1 else None,
        shuffle=False,
        verbose=0,
        callbacks=callbacks,
        **fit,
    )


def run_mode(task, mode, seeds, streams, initial, judge, compiled, log=None):
    """Final validation losses (in nats) of `mode` on `task`:
    `{learning_rate: [loss per seed]}`, non-finite as `inf`. `judge` is the
    task's `evaluator`; `compiled` maps an optimizer's configuration to a
    compiled model and optimizer, shared by the modes that differ only in
    state (e.g. "micro" and "micro*sqrtK")."""
    import numpy as np

    model, _ = compiled_for(task, mode, compiled)
    x_val, y_val = task.validation
    losses = {}
    for lr in task.learning_rates:
        losses[lr] = []
        for seed in seeds:
            start = time.perf_counter()
            fit_run(task, mode, lr, model, initial[seed], streams[seed])
            judge.set_weights(model.get_weights())
            value = judge.evaluate(
                x_val, y_val, batch_size=len(x_val), verbose=0
            )
            value = float(value)
            losses[lr].append(value if np.isfinite(value) else math.inf)
            if log:
                seconds = time.perf_counter() - start
                log(
                    f"  {task.name} {mode.name} lr={lr:g} seed={seed}: "
                    f"{value:.4f} ({seconds:.1f} s)"
                )
    return losses


# ------------------------------------------------------------ the report


def _fmt(value, scale):
    return "diverged" if not math.isfinite(value) else f"{value * scale:.3f}"


def cell(values, scale):
    """`median (low-high)` of the values over seeds, in the task's unit."""
    low, median, high = report.summary(values)
    if len(values) == 1:
        return _fmt(median, scale)
    return f"{_fmt(median, scale)} ({_fmt(low, scale)}-{_fmt(high, scale)})"


def tuned_rate(losses):
    """The rate with the lowest median loss (the lower rate on a tie)."""
    return min(losses, key=lambda lr: (report.summary(losses[lr])[1], lr))


def paired_cell(first, second, scale):
    """Median (range) over seeds of `first - second`, seed by seed."""
    differences = [a - b for a, b in zip(first, second)]
    if not all(math.isfinite(d) for d in differences):
        finite = [d for d in differences if math.isfinite(d)]
        return f"{len(differences) - len(finite)} diverged"
    low, median, high = report.summary(differences)
    text = f"{median * scale:+.3f}"
    if len(differences) > 1:
        text += f" ({low * scale:+.3f} to {high * scale:+.3f})"
    return text


def task_report(task, modes, results, markdown):
    """The task's tables as text."""
    scale = task.scale
    rates = task.learning_rates
    out = []
    header = ["mode"] + [f"lr {lr:g}" for lr in rates]
    rows = [
        [mode.name] + [cell(results[mode.name][lr], scale) for lr in rates]
        for mode in modes
    ]
    out.append(
        f"{task.name}: final validation loss ({task.unit}) by learning "
        "rate, median (range) over seeds"
    )
    out.append("")
    out.append(report.format_table(header, rows, markdown))
    out.append("")
    k1_rate = tuned_rate(results[modes[0].name])
    top = rates[-1]
    out.append(
        f"{task.name}: each mode at its tuned rate, at the rate tuned for "
        f"K=1 ({k1_rate:g}) and at the highest rate ({top:g})"
    )
    out.append("")
    rows = []
    for mode in modes:
        losses = results[mode.name]
        best = tuned_rate(losses)
        rows.append(
            [
                mode.name,
                f"{best:g}",
                cell(losses[best], scale),
                cell(losses[k1_rate], scale),
                cell(losses[top], scale),
            ]
        )
    out.append(
        report.format_table(
            [
                "mode",
                "tuned lr",
                "at tuned lr",
                f"at K=1's lr {k1_rate:g}",
                f"at lr {top:g}",
            ],
            rows,
            markdown,
        )
    )
    out.append("")
    comparisons = []
    ks = sorted({mode.accumulation_steps for mode in modes} - {1})
    for k in ks:
        macro = results.get(f"K={k} macro")
        if macro is None:
            continue
        macro_best = macro[tuned_rate(macro)]
        for other in (
            f"K={k} micro",
            f"K={k} micro*sqrtK",
            f"K={k} keras",
            f"K={k} macro exact",
        ):
            if other not in results:
                continue
            losses = results[other]
            comparisons.append(
                [
                    f"{other} - macro",
                    paired_cell(losses[tuned_rate(losses)], macro_best, scale),
                    paired_cell(losses[k1_rate], macro[k1_rate], scale),
                    paired_cell(losses[top], macro[top], scale),
                ]
            )
    if comparisons:
        out.append(
            f"{task.name}: paired differences against macro at the same K "
            f"({task.unit}; negative: better than macro), median (range) "
            "over seeds"
        )
        out.append("")
        out.append(
            report.format_table(
                [
                    "difference",
                    "each at its tuned lr",
                    f"at lr {k1_rate:g}",
                    f"at lr {top:g}",
                ],
                comparisons,
                markdown,
            )
        )
        out.append("")
    return "\n".join(out)


STYLES = {
    "plain": ("black", "-"),
    "keras": ("C2", ":"),
    "macro": ("C0", "-"),
    "micro": ("C3", "-"),
    "micro*sqrtK": ("C1", "--"),
    "exact": ("C4", "--"),
}


# ---------------------------------------------- exact accumulation (issue 26)


def micro_batch_counts_of(task, x):
    """Valid (non-zero) entries per micro-batch of the inputs `x`, in the
    order they are consumed: what a masked loss averages over."""
    import numpy as np

    m = task.micro_batch
    real = (np.asarray(x).reshape(len(x), -1) > 0).sum(axis=1)
    return real[: len(real) // m * m].reshape(-1, m).sum(axis=1)


def update_differences(task, k, seeds, streams, initial, updates):
    """How far the mean of means is from the exact (count-weighted)
    gradient on the task's first `updates` updates of K micro-batches,
    each taken at the seed's initial weights: one `kg.SGD(1.0)` update
    without and with `kg.exact_accumulation` gives minus each gradient.
    Returns `(relative, cosine)`: lists over seeds and updates of
    |g_means - g_exact| / |g_exact| and of their cosine."""
    import numpy as np

    import keras_gradtools as kg

    plain = Mode("sgd", lambda lr: kg.SGD(lr, accumulation_steps=k))
    exact = Mode(
        "sgd exact",
        lambda lr: kg.SGD(lr, accumulation_steps=k, weighted_accumulation=True),
        prepare=kg.exact_accumulation,
    )
    compiled = {}
    rows = k * task.micro_batch
    relative, cosine = [], []
    for seed in seeds:
        x, y = streams[seed]
        start = np.concatenate([w.ravel() for w in initial[seed]])
        for u in range(updates):
            window = x[u * rows : (u + 1) * rows], y[u * rows : (u + 1) * rows]
            steps = []
            for mode in (plain, exact):
                model, _ = compiled_for(task, mode, compiled)
                fit_run(task, mode, 1.0, model, initial[seed], window)
                end = np.concatenate([w.ravel() for w in model.get_weights()])
                steps.append((start - end).astype("float64"))
            means, weighted = steps
            relative.append(
                np.linalg.norm(means - weighted) / np.linalg.norm(weighted)
            )
            cosine.append(
                means
                @ weighted
                / (np.linalg.norm(means) * np.linalg.norm(weighted))
            )
    return relative, cosine


def exact_report(task, modes, results, streams, differences, markdown):
    """The exact-accumulation comparison's extra tables as text: the
    micro-batches' counts, the paired differences exact - macro at every
    rate and the gradients' difference on the first updates."""
    import numpy as np

    scale = task.scale
    out = []
    counts = np.concatenate(
        [micro_batch_counts_of(task, x) for x, _ in streams.values()]
    )
    out.append(
        f"{task.name}: valid entries per micro-batch of {task.micro_batch}: "
        f"median {np.median(counts):g}, range {counts.min()}-{counts.max()}"
    )
    for k in sorted({mode.accumulation_steps for mode in modes} - {1}):
        groups = counts[: len(counts) // k * k].reshape(-1, k)
        ratio = groups.max(axis=1) / np.maximum(groups.min(axis=1), 1)
        out.append(
            f"{task.name}: K={k}: largest / smallest count within an "
            f"update: median {np.median(ratio):.1f}, range "
            f"{ratio.min():.1f}-{ratio.max():.1f}"
        )
    out.append("")
    rows = []
    for k in sorted({mode.accumulation_steps for mode in modes} - {1}):
        macro, exact = (
            results.get(f"K={k} macro"),
            results.get(f"K={k} macro exact"),
        )
        if macro is None or exact is None:
            continue
        rows.append(
            [f"K={k} exact - macro"]
            + [
                paired_cell(exact[lr], macro[lr], scale)
                for lr in task.learning_rates
            ]
        )
    if rows:
        out.append(
            f"{task.name}: paired differences exact - macro at every rate "
            f"({task.unit}; negative: exact better), median (range) over "
            "seeds"
        )
        out.append("")
        out.append(
            report.format_table(
                ["difference"] + [f"lr {lr:g}" for lr in task.learning_rates],
                rows,
                markdown,
            )
        )
        out.append("")
    for k, (relative, cosine) in differences.items():
        low, median, high = report.summary(relative)
        c_low, c_median, c_high = report.summary(cosine)
        out.append(
            f"{task.name}: K={k}: the accumulated gradient, mean of means "
            f"against exact, on the first updates at the initial weights "
            f"({len(relative)} updates): |difference| / |exact| median "
            f"{median:.3f} (range {low:.3f}-{high:.3f}); cosine median "
            f"{c_median:.3f} (range {c_low:.3f}-{c_high:.3f})"
        )
    if differences:
        out.append("")
    return "\n".join(out)


def plot(tasks, modes_by_task, results_by_task, path):
    """Validation loss against learning rate, one panel per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    figure, axes = plt.subplots(
        1, len(tasks), figsize=(5.2 * len(tasks), 4.4), squeeze=False,
        constrained_layout=True,
    )  # fmt: skip
    for axis, task in zip(axes[0], tasks):
        results = results_by_task[task.name]
        finite = [
            v * task.scale
            for losses in results.values()
            for values in losses.values()
            for v in values
            if math.isfinite(v)
        ]
        # Diverged and far-off runs are drawn at the ceiling.
        ceiling = min(max(finite), 8 * min(finite)) if finite else 1.0
        for mode in modes_by_task[task.name]:
            colour, style = STYLES.get(mode.family, ("C7", "-"))
            marker = "o" if mode.accumulation_steps <= 8 else "s"
            if mode.accumulation_steps > 8:
                style = "-." if style == "-" else style
            if mode.family == "keras":  # on top of "macro": marks only
                style, marker = "none", "x"
            rates = task.learning_rates
            medians, lows, highs = [], [], []
            for lr in rates:
                low, median, high = report.summary(results[mode.name][lr])
                medians.append(min(median * task.scale, ceiling))
                lows.append(min(low * task.scale, ceiling))
                highs.append(min(high * task.scale, ceiling))
            axis.plot(
                rates, medians, linestyle=style, color=colour,
                marker=marker, label=mode.name,
                markersize=7 if marker == "x" else 4,
            )  # fmt: skip
            axis.fill_between(rates, lows, highs, color=colour, alpha=0.08)
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        axis.yaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
        axis.set_xlabel("learning rate (nominal)")
        axis.set_ylabel(f"final validation loss ({task.unit})")
        axis.set_title(
            f"{task.name} (micro-batch {task.micro_batch}, "
            f"{task.micro_batches} micro-batches)",
            loc="left",
            fontsize=10,
        )
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=7, ncol=2)
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main(argv=None):
    """Runs the benchmark and prints its report."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="benchmarks/outcomes.py",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--plot", default=None)
    parser.add_argument(
        "--verbose", action="store_true", help="print every run's loss"
    )
    parser.add_argument(
        "--exact",
        default=None,
        metavar="K,...",
        help="instead of micro against macro, compare at these K 'macro' "
        "without and with kg.exact_accumulation (beside K=1)",
    )
    args = parser.parse_args(argv)
    seeds = list(range(args.seeds or (1 if args.quick else 3)))
    names = [name.strip() for name in args.tasks.split(",") if name.strip()]
    unknown = sorted(set(names) - set(TASKS))
    if unknown:
        parser.error(f"unknown tasks {unknown}; known: {sorted(TASKS)}")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras

    print(
        "# Training outcomes: "
        + (
            "Adam macro without and with exact accumulation"
            if args.exact
            else "Adam micro vs macro"
        )
        + " at an equal sample budget"
    )
    print()
    print("command: " + shlex.join(["python", "benchmarks/outcomes.py", *argv]))
    print(
        f"backend: {keras.backend.backend()}; keras {keras.__version__}; "
        f"CPU: {machine.cpu_model()} ({machine.cpu_count()} cores); "
        f"seeds: {len(seeds)}"
    )
    print()
    log = (
        (lambda line: print(line, file=sys.stderr, flush=True))
        if (args.verbose)
        else None
    )
    tasks, modes_by_task, results_by_task = [], {}, {}
    for name in names:
        task = TASKS[name](args.quick)
        exact_ks = [int(k) for k in (args.exact or "").split(",") if k]
        if exact_ks:
            modes = exact_modes(exact_ks)
        else:
            modes = standard_modes(task.ks, task.with_keras)
        start = time.perf_counter()
        initial = {seed: task.model(seed).get_weights() for seed in seeds}
        streams = {
            seed: task.stream(seed, task.micro_batches) for seed in seeds
        }
        judge = evaluator(task)
        compiled = {}
        results = {}
        for mode in modes:
            results[mode.name] = run_mode(
                task, mode, seeds, streams, initial, judge, compiled, log
            )
        seconds = time.perf_counter() - start
        x, _ = streams[seeds[0]]
        print(
            f"## {task.name}: {task.micro_batches} micro-batches of "
            f"{task.micro_batch} ({len(x)} samples) per run, "
            f"{task.model(0).count_params()} parameters; "
            f"{len(modes) * len(task.learning_rates) * len(seeds)} runs in "
            f"{seconds:.0f} s"
        )
        print()
        print(task_report(task, modes, results, args.markdown))
        if exact_ks:
            differences = {
                k: update_differences(
                    task, k, seeds, streams, initial, updates=8
                )
                for k in exact_ks
            }
            print(
                exact_report(
                    task, modes, results, streams, differences, args.markdown
                )
            )
        keras.utils.clear_session()
        tasks.append(task)
        modes_by_task[task.name] = modes
        results_by_task[task.name] = results
        sys.stdout.flush()
    if args.plot:
        plot(tasks, modes_by_task, results_by_task, args.plot)
        print(f"picture: {args.plot}")
    print("benchmark: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
