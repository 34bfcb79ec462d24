"""`exact_accumulation` under `keras.distribution.DataParallel` over 2
forced CPU devices (JAX): the loss of a micro-batch is global there (one
count for both devices), and micro-batches of 12 and 44 valid tokens
update as one device does on the big batch. Prints one `RESULT {json}`
line per K.

    python jax_exact_runs.py
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["KERAS_BACKEND"] = "jax"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from helpers import padded_tagger  # noqa: E402
from helpers import padded_tagging_data  # noqa: E402

import keras_gradtools as kg  # noqa: E402


def max_difference(a, b):
    return max(float(np.max(np.abs(u - v))) for u, v in zip(a, b))


if __name__ == "__main__":
    x, y = padded_tagging_data(np.repeat([1, 2, 6, 5], 4), seed=7)
    for k in (1, 2):
        keras.distribution.set_distribution(None)
        big = padded_tagger(keras.optimizers.SGD(0.5))
        big.fit(x, y, batch_size=8 * k, shuffle=False, verbose=0)
        found = {}
        for exact in (True, False):
            keras.distribution.set_distribution(
                keras.distribution.DataParallel()
            )
            model = padded_tagger(kg.SGD(0.5, accumulation_steps=k))
            if exact:
                kg.exact_accumulation(model)
            model.fit(x, y, batch_size=8, shuffle=False, verbose=0)
            found[exact] = max_difference(
                model.get_weights(), big.get_weights()
            )
        print(
            "RESULT "
            + json.dumps(
                {
                    "k": k,
                    "max_abs_difference": found[True],
                    "without_exact": found[False],
                }
            ),
            flush=True,
        )
