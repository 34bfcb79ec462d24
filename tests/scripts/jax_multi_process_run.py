"""`model.fit` under `keras.distribution.DataParallel` over two JAX
processes on 127.0.0.1 (one CPU device each, gloo collectives), or the
single-process reference.

    python jax_multi_process_run.py OUT_DIR single
    python jax_multi_process_run.py OUT_DIR PROCESS_ID PORT

Every global batch of 16 is split between the processes (each feeds its own
8 rows, `auto_shard_dataset=False`). Each process saves its final weights
to OUT_DIR/<who>.npz and prints a RESULT line; the monitor's TensorBoard
files are written by process 0 only.
"""

import json
import os
import sys

out_dir, who = sys.argv[1], sys.argv[2]
os.environ["KERAS_BACKEND"] = "jax"
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_gradtools as kg  # noqa: E402

GLOBAL_BATCH, PROCESSES = 16, 2


def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(128, 8)).astype("float32")
    y = np.tanh(x @ rng.normal(size=(8, 2))) + 0.1 * rng.normal(size=(128, 2))
    return x, y.astype("float32")


def make_model():
    rng = np.random.default_rng(1)
    model = keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(16, activation="tanh"),
            keras.layers.Dense(2),
        ]
    )
    model.set_weights(
        [0.3 * rng.normal(size=w.shape) for w in model.get_weights()]
    )
    model.compile(
        optimizer=kg.Adam(
            0.05,
            accumulation_steps=4,
            noise_eta=0.01,
            noise_seed=7,
            global_clipnorm=0.5,
        ),
        loss="mse",
    )
    return model


def main():
    x, y = data()
    log_dir = os.path.join(out_dir, "logs")
    if who == "single":
        model = make_model()
        model.fit(
            x, y, batch_size=GLOBAL_BATCH, epochs=2, shuffle=False, verbose=0
        )
        np.savez(os.path.join(out_dir, "single.npz"), *model.get_weights())
        return 0
    process, port = int(who), sys.argv[3]
    keras.distribution.initialize(
        job_addresses=f"127.0.0.1:{port}",
        num_processes=PROCESSES,
        process_id=process,
    )
    keras.distribution.set_distribution(
        keras.distribution.DataParallel(auto_shard_dataset=False)
    )
    per_process = GLOBAL_BATCH // PROCESSES
    rows = np.concatenate(
        [
            np.arange(
                start + process * per_process,
                start + (process + 1) * per_process,
            )
            for start in range(0, len(x), GLOBAL_BATCH)
        ]
    )
    model = make_model()
    monitor = kg.GradientVarianceMonitor(log_dir=log_dir, verbose=0)
    history = model.fit(
        x[rows], y[rows], batch_size=per_process, epochs=2, shuffle=False,
        verbose=0, callbacks=[monitor],
    )  # fmt: skip
    weights = [
        np.asarray(v.value.addressable_data(0))
        for v in model.trainable_variables
    ]
    np.savez(os.path.join(out_dir, f"process{process}.npz"), *weights)
    print(
        "RESULT "
        + json.dumps(
            {
                "process": process,
                "devices": len(jax.devices()),
                "iterations": int(np.asarray(model.optimizer.iterations)),
                "batch_size_seen": monitor.records[-1]["batch_size"],
                "noise_scale_logged": "grad_noise_scale" in history.history,
            }
        ),
        flush=True,
    )
    jax.distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
