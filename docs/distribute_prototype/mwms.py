import sys, os, json
idx, p0, p1, mode = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
os.environ["TF_CONFIG"] = json.dumps({"cluster": {"worker": [f"127.0.0.1:{p0}", f"127.0.0.1:{p1}"]}, "task": {"type": "worker", "index": idx}})
sys.path.insert(0, "/tmp/distribute_lab/scripts")
from common import *
tf.config.threading.set_inter_op_parallelism_threads(1); tf.config.threading.set_intra_op_parallelism_threads(1)
import numpy as np, keras, keras_gradtools
keras.config.disable_traceback_filtering()
strategy = tf.distribute.MultiWorkerMirroredStrategy()
GB = 8
x, y = data(n=GB * 8)
K = int(os.environ.get("K", "4"))
def opt_():
    return keras_gradtools.Adam(0.05, accumulation_steps=K, second_moment="macro", noise_eta=0.01, noise_seed=7, global_clipnorm=0.5, jit_compile=False)
with strategy.scope():
    model = make_model(); opt = opt_()
    if mode == "loop":
        opt.build(model.trainable_variables)
ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(GB)
try:
    if mode == "loop":
        def replica_fn(xb, yb):
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(tf.square(model(xb, training=True) - yb)) / (GB * 2.0)
            opt.apply(tape.gradient(loss, model.trainable_variables), model.trainable_variables)
        @tf.function
        def step(xb, yb): strategy.run(replica_fn, args=(xb, yb))
        for xb, yb in strategy.experimental_distribute_dataset(ds): step(xb, yb)
        g = step.get_concrete_function(*next(iter(strategy.experimental_distribute_dataset(ds)))).graph.as_graph_def()
        top = [n.op for n in g.node if "Collective" in n.op]
        fn = {f.signature.name: [n.op for n in f.node_def if "Collective" in n.op] for f in g.library.function}
        print(f"[w{idx}] collective ops top-level: {top}; in functions: { {k: v for k, v in fn.items() if v} }")
    else:
        with strategy.scope():
            model.compile(optimizer=opt, loss="mse", jit_compile=False)
        src = os.environ.get("SRC", "numpy")
        if os.environ.get("PATCH"):
            # Work around Keras's eager strategy.reduce("MEAN", PerReplica)
            # in _maybe_symbolic_build (fails under MWMS): build ourselves.
            with strategy.scope():
                model._symbolic_build(data_batch=(tf.constant(x[:GB]), tf.constant(y[:GB])))
            model._maybe_symbolic_build = lambda *a, **k: None
            # Keras bug 2: reduce_per_replica does strategy.reduce("MEAN", v,
            # axis=0) on scalar logs under MWMS ("Invalid reduction dimension
            # 0 for input with 0 dimensions"). Reduce with axis=None instead.
            from keras.src.backend.tensorflow import trainer as T
            orig = T.reduce_per_replica
            def reduce_per_replica(values, strategy, reduction):
                if reduction in ("auto", "mean") and T._collective_all_reduce_multi_worker(strategy):
                    return tf.nest.map_structure(lambda v: strategy.reduce("MEAN", v, axis=None), values)
                return orig(values, strategy, reduction)
            T.reduce_per_replica = reduce_per_replica
        if src == "numpy":
            model.fit(x, y, batch_size=GB, epochs=1, verbose=0, shuffle=False)
        elif src == "dataset":
            opts = tf.data.Options(); opts.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
            model.fit(ds.with_options(opts), epochs=1, verbose=0)
        elif src == "distributed":
            model.fit(strategy.experimental_distribute_dataset(ds), epochs=1, verbose=0)
    w = np.concatenate([np.ravel(v) for v in model.get_weights()])
    np.save(f"/tmp/distribute_lab/mwms_w{idx}_{mode}.npy", w)
    print(f"[w{idx}] {mode} OK iterations {int(opt.iterations.numpy())} micro {int(opt.micro_steps.numpy())} w[:3] {w[:3]}", flush=True)
except Exception as e:
    import traceback
    print(f"[w{idx}] {mode} FAIL {type(e).__name__}: {str(e)[:150] + ' ... ' + str(e)[-300:]}", flush=True)
    for fr in [f for f in traceback.extract_tb(e.__traceback__) if "keras/" in f.filename or "tensorflow/" in f.filename][-45:-8]: print("   ", fr.filename.split("site-packages/")[-1], fr.lineno, fr.name)
