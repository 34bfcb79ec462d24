"""Trains a small digits model under keras.callbacks.BackupAndRestore.

Run twice with the same arguments after a SIGKILL, it must end with the same
weights, accumulation steps and learning-rate factor (AdaptiveAccumulation
changes both during training) as a run that was never interrupted. With
`--kill-marker PATH`, the first run that finds no file at PATH creates it
and kills itself with SIGKILL in the middle of epoch 2 (a real, uncatchable
kill).

    python train_with_backup.py BACKUP_DIR OUTPUT.npz [--kill-marker PATH]
"""

import argparse
import os
import signal
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from helpers import digits  # noqa: E402
from helpers import tiny_classifier  # noqa: E402

import keras_gradtools as kg  # noqa: E402

KILL_EPOCH, KILL_BATCH = 2, 5


class KillOnce(keras.callbacks.Callback):
    def __init__(self, marker):
        super().__init__()
        self.marker = marker
        self.epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if (self.epoch, batch) == (KILL_EPOCH, KILL_BATCH):
            if not os.path.exists(self.marker):
                open(self.marker, "w").close()
                os.kill(os.getpid(), signal.SIGKILL)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("backup_dir")
    parser.add_argument("output")
    parser.add_argument("--kill-marker")
    args = parser.parse_args()
    keras.utils.set_random_seed(0)
    x, y = digits(320)
    model = tiny_classifier()
    optimizer = kg.Adam(
        1e-2,
        accumulation_steps=3,  # 10 batches per epoch: cycles span epochs
        max_accumulation_steps=16,
        noise_eta=1e-3,
        noise_seed=4,
        global_clipnorm=1.0,
    )
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    # K and the learning-rate factor change during training (every 4
    # batches) and must resume as they were.
    adaptive = kg.AdaptiveAccumulation(16, update_freq=4)
    callbacks = [keras.callbacks.BackupAndRestore(args.backup_dir), adaptive]
    if args.kill_marker:
        callbacks.append(KillOnce(args.kill_marker))
    model.fit(
        x, y, batch_size=32, epochs=4, shuffle=False, verbose=0,
        callbacks=callbacks,
    )  # fmt: skip
    np.savez(
        args.output,
        *model.get_weights(),
        adaptive=np.array(
            [optimizer.accumulation_steps, optimizer.learning_rate_factor]
        ),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
