"""TensorBoard event files, written and read without TensorFlow.

The records are TensorBoard's own: its `RecordWriter` frames each
serialized `Event` protocol buffer (length, masked CRC32C, data, masked
CRC32C, the TFRecord format) and its scalar and histogram plugins make the
`Summary` protos (`scalar_pb`, `histogram_pb`), the same ones
`tf.summary.scalar` writes. Only the file handling is ours, so writing
works on the JAX backend without importing TensorFlow, and the files sit
beside those of `keras.callbacks.TensorBoard`.
"""

import os
import socket
import struct
import time

import numpy as np


class SummaryWriter:
    """Appends scalar and histogram summaries to one event file.

    Args:
        log_dir: The directory of the event file (created if missing).

    Example:

    >>> writer = SummaryWriter("logs/run1/gradients")
    >>> writer.scalar("grad_noise_scale", 120.0, step=10)
    >>> writer.close()
    """

    def __init__(self, log_dir):
        from tensorboard.compat.proto import event_pb2
        from tensorboard.summary.writer.record_writer import RecordWriter

        os.makedirs(log_dir, exist_ok=True)
        self._event_pb2 = event_pb2
        name = (
            f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}"
            f".{os.getpid()}.keras_gradtools"
        )
        self.path = os.path.join(log_dir, name)
        self._records = RecordWriter(open(self.path, "ab"))
        self._write(file_version="brain.Event:2")

    def _write(self, step=0, **fields):
        event = self._event_pb2.Event(wall_time=time.time(), step=int(step))
        if "summary" in fields:
            event.summary.CopyFrom(fields["summary"])
        if "file_version" in fields:
            event.file_version = fields["file_version"]
        self._records.write(event.SerializeToString())

    def scalar(self, tag, value, step):
        """Writes a scalar (read by TensorBoard's Scalars dashboard)."""
        from tensorboard.plugins.scalar.summary_v2 import scalar_pb

        self._write(step, summary=scalar_pb(tag, np.float32(value)))

    def histogram(self, tag, values, step):
        """Writes a histogram of `values` (Histograms dashboard)."""
        from tensorboard.plugins.histogram.summary_v2 import histogram_pb

        values = np.asarray(values, np.float64).ravel()
        self._write(step, summary=histogram_pb(tag, values))

    def flush(self):
        self._records.flush()

    def close(self):
        if not self._records.closed:
            self._records.close()


def read_events(log_dir):
    """Reads every summary value under `log_dir` (recursively).

    Args:
        log_dir: A directory of event files, e.g. a monitor's `log_dir`.

    Returns:
        A dict mapping each run directory (relative to `log_dir`, "." for
        the top) to a dict mapping tags to lists of `(step, value)` pairs,
        where `value` is a NumPy array (a scalar for scalar summaries).
    """
    from tensorboard.compat.proto import event_pb2
    from tensorboard.util import tensor_util

    runs = {}
    for root, _, files in os.walk(log_dir):
        for name in sorted(f for f in files if ".tfevents." in f):
            run = os.path.relpath(root, log_dir)
            tags = runs.setdefault(run, {})
            for record in _records(os.path.join(root, name)):
                event = event_pb2.Event.FromString(record)
                for value in event.summary.value:
                    if value.HasField("tensor"):
                        array = tensor_util.make_ndarray(value.tensor)
                    elif value.HasField("simple_value"):
                        array = np.float32(value.simple_value)
                    else:
                        continue
                    tags.setdefault(value.tag, []).append((event.step, array))
    return runs


def _records(path):
    """The records of a TFRecord file (CRCs not checked)."""
    with open(path, "rb") as handle:
        while True:
            header = handle.read(12)
            if len(header) < 12:
                return
            (length,) = struct.unpack("<Q", header[:8])
            data = handle.read(length)
            handle.read(4)
            if len(data) < length:
                return
            yield data
