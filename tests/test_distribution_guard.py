"""Until tf.distribute is supported, more than one replica is refused with a
clear error instead of replicas that silently drift apart."""

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import os
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2
    )
    import keras
    import numpy as np
    import keras_gradtools as kg

    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
        model.compile(optimizer=kg.Adam(jit_compile=False), loss="mse")
    x = np.ones((8, 3), "float32")
    try:
        model.fit(x, x[:, :1], batch_size=4, verbose=0)
    except NotImplementedError as error:
        print("REFUSED:", error)
    """
)


def test_mirrored_strategy_is_refused_clearly():
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "REFUSED:" in result.stdout, result.stderr[-3000:]
    assert "more than one replica" in result.stdout
    assert "has 2" in result.stdout
