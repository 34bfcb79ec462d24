"""Compare strategy runs with a single-device run on the same global batch."""
import sys, json, time
sys.path.insert(0, "/tmp/distribute_lab/scripts")
from common import *
R = int(sys.argv[1]) if len(sys.argv) > 1 else 2
setup_devices(max(R, 1))
import numpy as np, keras, keras_gradtools
print(keras_gradtools.__file__)
GB = 12 if R == 3 else 8
x, y = data(n=GB * 8)

def make_opt(kind, k):
    common = dict(accumulation_steps=k, noise_eta=0.01, noise_seed=7, global_clipnorm=0.5, jit_compile=False)
    if kind == "adam_micro": return keras_gradtools.Adam(0.05, **common)
    if kind == "adam_macro": return keras_gradtools.Adam(0.05, second_moment="macro", **common)
    if kind == "adam_stats": return keras_gradtools.Adam(0.05, second_moment="macro", track_gradient_statistics=True, **common)
    if kind == "sgd": return keras_gradtools.SGD(0.05, momentum=0.9, **common)
    if kind == "adamw": return keras_gradtools.AdamW(0.05, weight_decay=0.1, second_moment="macro", **common)
    if kind == "wrap": return keras_gradtools.wrap(keras.optimizers.RMSprop(0.01), **common)
    raise ValueError(kind)

def train(strategy, kind, k, mode, epochs=1):
    ctx = strategy.scope() if strategy else None
    if ctx: ctx.__enter__()
    model = make_model()
    opt = make_opt(kind, k)
    if mode == "fit":
        model.compile(optimizer=opt, loss="mse", jit_compile=False)
        model.fit(x, y, batch_size=GB, epochs=epochs, verbose=0, shuffle=False)
    else:
        opt.build(model.trainable_variables)
        ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(GB)
        def replica_fn(xb, yb):
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(tf.square(model(xb, training=True) - yb)) / (GB * 2.0)
            grads = tape.gradient(loss, model.trainable_variables)
            opt.apply(grads, model.trainable_variables)
        if strategy:
            dist = strategy.experimental_distribute_dataset(ds)
            @tf.function
            def step(xb, yb): strategy.run(replica_fn, args=(xb, yb))
            for _ in range(epochs):
                for xb, yb in dist: step(xb, yb)
        else:
            step = tf.function(replica_fn)
            for _ in range(epochs):
                for xb, yb in ds: step(xb, yb)
    if ctx: ctx.__exit__(None, None, None)
    return model, opt

def replica_check(strategy, model, opt):
    worst = 0.0; bad = []
    for v in list(model.variables) + list(opt.variables):
        tv = v.value
        if "SyncOnRead" in type(tv).__name__:  # local partial sums by design
            continue
        vals = [np.asarray(t) for t in strategy.experimental_local_results(tv)]
        for o in vals[1:]:
            if o.tobytes() != vals[0].tobytes():
                bad.append(v.path)
    return bad

results = []
strategy = tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(R)])
configs = [(kind, k, mode) for mode in ("loop", "fit") for kind in ("adam_macro", "adam_micro", "sgd", "adamw", "wrap", "adam_stats") for k in (1, 4)]
if len(sys.argv) > 2: configs = [c for c in configs if c[0] in sys.argv[2].split(",")]
for kind, k, mode in configs:
    t = time.time()
    try:
        ref_m, ref_o = train(None, kind, k, mode)
        m, o = train(strategy, kind, k, mode)
        diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in zip(ref_m.get_weights(), m.get_weights()))
        scale = max(float(np.max(np.abs(np.asarray(a)))) for a in ref_m.get_weights())
        bad = replica_check(strategy, m, o)
        it = (int(ref_o.iterations.numpy()), int(o.iterations.numpy()))
        extra = ""
        if kind == "adam_stats" and k > 1:
            rs = {n: float(v) for n, v in ref_o.gradient_statistics().items()}
            ds_ = {n: float(v) for n, v in o.gradient_statistics().items()}
            extra = f" stats ref={rs} dist={ds_}"
        print(f"R={R} {mode:4s} {kind:10s} K={k}: max|dw|={diff:.2e} (|w|max {scale:.2f}) iterations {it} replicas_identical={not bad} {bad[:3]} {time.time()-t:.1f}s{extra}", flush=True)
    except Exception as e:
        import traceback
        print(f"R={R} {mode} {kind} K={k}: FAIL {type(e).__name__}: {str(e)[:600]}", flush=True)
        for fr in traceback.extract_tb(e.__traceback__)[-6:]: print("   ", fr.filename.split("site-packages/")[-1], fr.lineno, fr.name)
