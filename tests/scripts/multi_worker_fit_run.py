"""`model.fit` under MultiWorkerMirroredStrategy with
`keras_gradtools.distribute.enable_multi_worker_fit`: one worker of a
2-process job on 127.0.0.1, or the single-process reference.

    python multi_worker_fit_run.py OUT_DIR single
    python multi_worker_fit_run.py OUT_DIR INDEX PORT_0 PORT_1 PHASE

PHASE "interrupted": worker 1 prints PAUSED at epoch 3, batch 4, and
waits to be killed (the test SIGKILLs it; worker 0 then fails in the next
collective). PHASE "resumed": both workers start again with the same
`BackupAndRestore` directories and finish the job. Each finished process
saves its final weights to OUT_DIR/<who>.npz and prints a RESULT line.

The job: kg.Adam with accumulation, noise and clipping, validation data,
TensorBoard and GradientVarianceMonitor on the chief only, BackupAndRestore
per worker.
"""

import json
import os
import sys
import time

out_dir, who = sys.argv[1], sys.argv[2]
if who != "single":
    index = int(who)
    ports, phase = sys.argv[3:5], sys.argv[5]
    os.environ["TF_CONFIG"] = json.dumps(
        {
            "cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
            "task": {"type": "worker", "index": index},
        }
    )
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ["KERAS_BACKEND"] = "tensorflow"

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

tf.config.threading.set_inter_op_parallelism_threads(1)
tf.config.threading.set_intra_op_parallelism_threads(1)

import keras  # noqa: E402

import keras_gradtools as kg  # noqa: E402
from keras_gradtools import distribute  # noqa: E402

EPOCHS, BATCH = 4, 8


def data():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(5, 2)).astype("float32")
    x = rng.normal(size=(64, 5)).astype("float32")
    y = np.tanh(x @ w) + 0.1 * rng.normal(size=(64, 2))
    xv = rng.normal(size=(24, 5)).astype("float32")
    return x, y.astype("float32"), xv, np.tanh(xv @ w).astype("float32")


def make_model():
    rng = np.random.default_rng(1)
    model = keras.Sequential(
        [
            keras.Input((5,)),
            keras.layers.Dense(4, activation="tanh"),
            keras.layers.Dense(2),
        ]
    )
    model.set_weights(
        [0.5 * rng.normal(size=w.shape) for w in model.get_weights()]
    )
    model.compile(
        optimizer=kg.Adam(
            0.02,
            # "macro": the "micro" default's variance would take each
            # worker's gradient as a sample (an estimate, not one process).
            second_moment="macro",
            accumulation_steps=2,
            noise_eta=1e-3,
            noise_seed=5,
            global_clipnorm=1.0,
        ),
        loss="mse",
        metrics=["mae"],
        jit_compile=False,
    )
    return model


class PauseWorker1(keras.callbacks.Callback):
    """Worker 1 stops here and waits to be killed."""

    def on_train_batch_begin(self, batch, logs=None):
        if self._epoch == 2 and batch == 3:
            print("PAUSED", flush=True)
            time.sleep(600)  # Killed by the test long before.

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch


def main():
    x, y, xv, yv = data()
    if who == "single":
        model = make_model()
        history = model.fit(
            x, y, batch_size=BATCH, epochs=EPOCHS, shuffle=False, verbose=0,
            validation_data=(xv, yv),
        )  # fmt: skip
        np.savez(os.path.join(out_dir, "single.npz"), *model.get_weights())
        print("RESULT " + json.dumps({"who": who, "loss": history.history}))
        return 0
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    broken = distribute.keras_fit_fails_under_multi_worker(strategy)
    with strategy.scope():
        model = make_model()
    distribute.enable_multi_worker_fit(model)
    callbacks = [
        keras.callbacks.BackupAndRestore(
            distribute.worker_path(os.path.join(out_dir, "backup"), strategy)
        ),
        kg.GradientVarianceMonitor(
            log_dir=os.path.join(out_dir, "logs"), verbose=0
        ),
    ]
    if distribute.is_chief(strategy):
        callbacks.append(
            keras.callbacks.TensorBoard(os.path.join(out_dir, "logs"))
        )
    if phase == "interrupted" and index == 1:
        callbacks.append(PauseWorker1())
    history = model.fit(
        x, y, batch_size=BATCH, epochs=EPOCHS, shuffle=False, verbose=0,
        validation_data=(xv, yv), callbacks=callbacks,
    )  # fmt: skip
    np.savez(os.path.join(out_dir, f"worker{index}.npz"), *model.get_weights())
    print(
        "RESULT "
        + json.dumps(
            {
                "who": index,
                "phase": phase,
                "keras_fit_fails": broken,
                "epochs_run": len(history.history["loss"]),
                "history_keys": sorted(history.history),
                "iterations": int(model.optimizer.iterations.numpy()),
            }
        ),
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
