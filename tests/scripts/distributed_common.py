"""The model, data, optimizers and training loop shared by the distributed
tests' scripts and by the tests themselves (for single-device references).

Importing this configures nothing: the scripts set up their devices or
cluster first."""

import json

import keras
import numpy as np
import tensorflow as tf

import keras_gradtools as kg

FEATURES, OUTPUTS = 5, 2
COMMON = dict(noise_eta=0.01, noise_seed=7, global_clipnorm=0.5)


def report(**fields):
    print("RESULT " + json.dumps(fields), flush=True)


def data(global_batch, steps, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(global_batch * steps, FEATURES)).astype("float32")
    w = rng.normal(size=(FEATURES, OUTPUTS))
    noise = 0.3 * rng.normal(size=(len(x), OUTPUTS))
    return x, (x @ w + noise).astype("float32")


def make_model():
    keras.utils.set_random_seed(1)
    return keras.Sequential(
        [
            keras.Input((FEATURES,)),
            keras.layers.Dense(4, activation="tanh"),
            keras.layers.Dense(OUTPUTS),
        ]
    )


def make_optimizer(kind, k, **overrides):
    common = dict(COMMON, accumulation_steps=k, jit_compile=False)
    common.update(overrides)
    if kind == "sgd":
        return kg.SGD(0.05, momentum=0.9, **common)
    if kind == "adam_macro":
        return kg.Adam(0.05, second_moment="macro", **common)
    if kind == "adam_micro":
        return kg.Adam(0.05, second_moment="micro", **common)
    if kind == "adam_micro_clip_each":
        return kg.Adam(
            0.05, second_moment="micro", clip_micro_batches=True, **common
        )
    if kind == "adam_micro_sync":
        return kg.Adam(
            0.05,
            second_moment="micro",
            sync_micro_batches=True,
            track_gradient_statistics=True,
            **common,
        )
    if kind == "adamw":
        return kg.AdamW(0.05, weight_decay=0.1, second_moment="macro", **common)
    if kind == "adam_statistics":
        return kg.Adam(
            0.05,
            second_moment="macro",
            track_gradient_statistics=True,
            **common,
        )
    if kind == "wrap_rmsprop":
        return kg.wrap(keras.optimizers.RMSprop(0.01), **common)
    raise ValueError(kind)


GLOBAL_BATCH = 8

# The 2-replica equality matrix: every configuration with K = 4 through
# both the custom loop and fit; K = 1 (the same replica/cross-replica
# halves, updating every micro-batch) through fit for one configuration
# per update rule.
EQUALITY2_KINDS = (
    "sgd",
    "adam_macro",
    "adam_micro",
    "adamw",
    "wrap_rmsprop",
    "adam_statistics",
    "adam_micro_clip_each",
    "adam_micro_sync",
)
EQUALITY2_CASES = tuple(
    (kind, 4, mode) for kind in EQUALITY2_KINDS for mode in ("loop", "fit")
) + tuple((kind, 1, "fit") for kind in ("sgd", "adam_macro", "wrap_rmsprop"))
# Multi-worker runs: name -> (optimizer kind, accumulation steps).
MULTI_WORKER_CONFIGS = {
    "adam_macro_k4": ("adam_macro", 4),
    "adam_micro_sync_k4": ("adam_micro_sync", 4),
    "sgd_k1": ("sgd", 1),
    "wrap_rmsprop_k4": ("wrap_rmsprop", 4),
}


class LoopRun:
    """What `custom_loop` leaves behind: the per-replica gradients of every
    step ([step][local replica][variable], float64), the traced step
    function and its first input (to inspect the graph)."""

    def __init__(self, grads, traced, example):
        self.grads = grads
        self.traced = traced
        self.example = example


def custom_loop(strategy, model, optimizer, x, y, global_batch):
    """Trains one epoch with `strategy.run` inside `tf.function`."""
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(global_batch)

    def replica_step(xb, yb):
        with tf.GradientTape() as tape:
            error = model(xb, training=True) - yb
            loss = tf.reduce_sum(tf.square(error)) / (global_batch * 2.0)
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply(grads, model.trainable_variables)
        return grads

    @tf.function
    def step(xb, yb):
        return strategy.run(replica_step, args=(xb, yb))

    recorded, example = [], None
    for xb, yb in strategy.experimental_distribute_dataset(dataset):
        example = example or (xb, yb)
        grads = step(xb, yb)
        recorded.append(
            [
                [np.asarray(g, np.float64) for g in replica]
                for replica in zip(
                    *[strategy.experimental_local_results(g) for g in grads]
                )
            ]
        )
    return LoopRun(recorded, step, example)
