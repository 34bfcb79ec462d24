"""`exact_accumulation` under MultiWorkerMirroredStrategy: one worker of a
2-process job on 127.0.0.1, whose shards of each global batch hold unequal
valid tokens. Each worker also trains Keras's SGD on the big batches on
its own (one device) and prints one `RESULT {json}` line: the largest
weight difference at K = 1 and K = 2.

    python multi_worker_exact_run.py INDEX PORT_0 PORT_1
"""

import json
import os
import sys

index = int(sys.argv[1])
os.environ["TF_CONFIG"] = json.dumps(
    {
        "cluster": {"worker": [f"127.0.0.1:{p}" for p in sys.argv[2:4]]},
        "task": {"type": "worker", "index": index},
    }
)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ["KERAS_BACKEND"] = "tensorflow"

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from helpers import padded_tagger  # noqa: E402
from helpers import padded_tagging_data  # noqa: E402

import keras_gradtools as kg  # noqa: E402


def max_difference(a, b):
    return max(float(np.max(np.abs(u - v))) for u, v in zip(a, b))


if __name__ == "__main__":
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    x, y = padded_tagging_data(seed=7)
    found = {}
    for k in (1, 2):
        big = padded_tagger(keras.optimizers.SGD(0.5), jit_compile=False)
        big.fit(x, y, batch_size=8 * k, shuffle=False, verbose=0)
        with strategy.scope():
            model = padded_tagger(
                kg.SGD(0.5, accumulation_steps=k), jit_compile=False
            )
        kg.distribute.enable_multi_worker_fit(model)
        kg.exact_accumulation(model)
        # Global batches of 8: each worker computes 4 sequences of them.
        model.fit(x, y, batch_size=8, shuffle=False, verbose=0)
        found[k] = max_difference(model.get_weights(), big.get_weights())
    print("RESULT " + json.dumps({"worker": index, "differences": found}))
