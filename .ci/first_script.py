"""A user's first script, run by CI in a virtual environment holding only
what `pip install ".[cpu]"` (TensorFlow) or `pip install ".[jax]"` (JAX)
installs: no test extras, no scikit-learn, no matplotlib.

Trains with accumulation, noise and the monitor writing TensorBoard, saves
before and after training, loads, continues; checks the TensorBoard files
and that JAX runs never import TensorFlow.
"""

import os
import sys
import tempfile

import keras  # noqa: E402
import numpy as np

import keras_gradtools as kg  # noqa: E402  (before keras: as users do)

directory = tempfile.mkdtemp()
rng = np.random.default_rng(0)
x = rng.normal(size=(512, 8)).astype("float32")
y = (x @ rng.normal(size=(8, 1)) + 0.5 * rng.normal(size=(512, 1))).astype(
    "float32"
)
model = keras.Sequential(
    [keras.Input((8,)), keras.layers.Dense(16, activation="relu"),
     keras.layers.Dense(1)]
)  # fmt: skip
model.compile(
    optimizer=kg.Adam(
        1e-2, accumulation_steps=4, noise_eta=1e-4, global_clipnorm=1.0
    ),
    loss="mse",
)
model.save(os.path.join(directory, "untrained.keras"))
untrained = keras.saving.load_model(os.path.join(directory, "untrained.keras"))
monitor = kg.GradientVarianceMonitor(log_dir=os.path.join(directory, "logs"))
history = model.fit(x, y, batch_size=16, epochs=3, verbose=0, shuffle=False,
                    callbacks=[monitor])  # fmt: skip
assert history.history["loss"][-1] < history.history["loss"][0]
model.save(os.path.join(directory, "trained.keras"))
restored = keras.saving.load_model(os.path.join(directory, "trained.keras"))
for m in (model, restored, untrained):
    m.fit(x, y, batch_size=16, epochs=1, verbose=0, shuffle=False)
for a, b in zip(model.get_weights(), restored.get_weights()):
    np.testing.assert_array_equal(a, b)
events = os.listdir(os.path.join(directory, "logs", "gradients"))
assert any(".tfevents." in name for name in events), events
if keras.backend.backend() == "jax":
    assert "tensorflow" not in sys.modules, "JAX run imported TensorFlow"
print(
    f"first script: ok on {keras.backend.backend()} "
    f"(noise scale {history.history['grad_noise_scale'][-1]:.1f} samples)"
)
