import sys; sys.path.insert(0, "/tmp/distribute_lab/scripts")
from common import *
import numpy as np, keras, keras_gradtools
x, y = data(n=64)
res = []
for jit in (True, False):
    model = make_model(); opt = keras_gradtools.Adam(0.05, accumulation_steps=4, noise_eta=0.01, noise_seed=7, global_clipnorm=0.5, jit_compile=jit, track_gradient_statistics=True)
    model.compile(optimizer=opt, loss="mse", jit_compile=jit)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False)
    res.append(np.concatenate([np.ravel(v) for v in model.get_weights()]))
    print("jit", jit, "iterations", int(opt.iterations.numpy()), {k: round(float(v), 4) for k, v in opt.gradient_statistics().items()})
print("max|dw| jit vs no-jit", float(np.max(np.abs(res[0] - res[1]))))
