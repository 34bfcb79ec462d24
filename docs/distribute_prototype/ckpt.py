"""Where do reductions happen, and do mid-cycle checkpoints survive R changes?"""
import sys, os, shutil
sys.path.insert(0, "/tmp/distribute_lab/scripts")
from common import *
setup_devices(3)
import numpy as np, keras, keras_gradtools
from tensorflow.python.framework import ops as tf_ops

# 1. Log every cross-device reduction at trace time with the graph it lands in.
from tensorflow.python.distribute import cross_device_ops as cdo
for name in ("reduce", "batch_reduce"):
    orig = getattr(cdo.CrossDeviceOps, name)
    def wrapped(self, *a, _orig=orig, _name=name, **k):
        print(f"   [trace] CrossDeviceOps.{_name} in graph {getattr(tf_ops.get_default_graph(), 'name', 'eager-or-outer')!r}")
        return _orig(self, *a, **k)
    setattr(cdo.CrossDeviceOps, name, wrapped)

GB = 12
x, y = data(n=GB * 8)
K = 4
def strat(r):
    return tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(r)]) if r > 1 else tf.distribute.get_strategy()

def setup(r, k=K, **kw):
    s = strat(r)
    with s.scope():
        model = make_model()
        if os.environ.get("OPT") == "sgd":
            opt = keras_gradtools.SGD(0.05, accumulation_steps=k, noise_eta=0.01, noise_seed=7, jit_compile=False, **kw)
        else:
            opt = keras_gradtools.Adam(0.05, accumulation_steps=k, second_moment="macro", noise_eta=0.01, noise_seed=7, global_clipnorm=0.5, jit_compile=False, **kw)
        opt.build(model.trainable_variables)
    def replica_fn(xb, yb):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(tf.square(model(xb, training=True) - yb)) / (GB * 2.0)
        opt.apply(tape.gradient(loss, model.trainable_variables), model.trainable_variables)
    @tf.function
    def step(xb, yb):
        s.run(replica_fn, args=(xb, yb))
    def run(i0, i1):
        ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(GB).skip(i0).take(i1 - i0)
        for xb, yb in s.experimental_distribute_dataset(ds): step(xb, yb)
    return s, model, opt, run, step

print("== trace of K=4 step, R=2")
s, model, opt, run, step = setup(2)
run(0, 1)
print("== trace of K=1 step, R=2")
s1, m1, o1, run1, _ = setup(2, k=1)
run1(0, 1)

# 2. checkpoint mid-cycle (after 6 micro-batches: 1 update + 2 micro of the next)
ref = setup(1)
ref[3](0, 8)
ref_w = ref[1].get_weights()
d = "/tmp/distribute_lab/ckpt"; shutil.rmtree(d, ignore_errors=True)
for r_save in (2,):
    s, model, opt, run, _ = setup(r_save)
    run(0, 6)
    print("saved at micro_steps", int(opt.micro_steps.numpy()),
          "local G parts", [float(np.asarray(t).sum()) for t in s.experimental_local_results(opt._gradient_sums[0].value)],
          "sum read", float(np.asarray(opt._gradient_sums[0].numpy()).sum()))
    path = tf.train.Checkpoint(model=model, optimizer=opt).save(d + "/c")
    for r_load in (1, 2, 3):
        s2, m2, o2, run2, _ = setup(r_load)
        tf.train.Checkpoint(model=m2, optimizer=o2).restore(path).assert_consumed()
        parts = [float(np.asarray(t).sum()) for t in s2.experimental_local_results(o2._gradient_sums[0].value)] if r_load > 1 else None
        run2(6, 8)
        diff = max(float(np.max(np.abs(a - b))) for a, b in zip(ref_w, m2.get_weights()))
        print(f"tf.train.Checkpoint save R={r_save} -> restore R={r_load}: restored local G parts {parts}; after finishing: max|dw| vs uninterrupted 1-device = {diff:.2e}, iterations {int(o2.iterations.numpy())}")
    # .keras saving
    with s.scope():
        model.compile(optimizer=opt, loss="mse")
    try:
        model.save("/tmp/distribute_lab/m.keras")
        for r_load in (1, 2):
            with strat(r_load).scope():
                m3 = keras.saving.load_model("/tmp/distribute_lab/m.keras")
            o3 = m3.optimizer
            print(f".keras save R=2 -> load R={r_load}: micro_steps {int(o3.micro_steps.numpy())} G sum {float(np.asarray(o3._gradient_sums[0].numpy()).sum())}")
    except Exception as e:
        print(".keras FAIL", type(e).__name__, str(e)[:800])
