import sys; sys.path.insert(0, "/tmp/distribute_lab/scripts")
from common import *
import numpy as np, keras, keras_gradtools
GB=8; x, y = data(n=GB*8)
model = make_model(); opt = keras_gradtools.Adam(0.05, accumulation_steps=4, second_moment="macro", noise_eta=0.01, noise_seed=7, global_clipnorm=0.5, jit_compile=False)
model.compile(optimizer=opt, loss="mse", jit_compile=False)
model.fit(x, y, batch_size=GB, epochs=1, verbose=0, shuffle=False)
w = np.concatenate([np.ravel(v) for v in model.get_weights()])
for f in ("loop", "fit"):
    try:
        ws = [np.load(f"/tmp/distribute_lab/mwms_w{i}_{f}.npy") for i in (0, 1)]
        print(f, "max|dw| vs single device", float(np.max(np.abs(ws[0] - w))), "workers bitwise equal", ws[0].tobytes() == ws[1].tobytes())
    except Exception as e: print(f, e)
