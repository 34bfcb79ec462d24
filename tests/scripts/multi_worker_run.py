"""One worker of a 2-process MultiWorkerMirroredStrategy run on 127.0.0.1.

    python multi_worker_run.py INDEX PORT_0 PORT_1 OUT_DIR

Trains with a custom loop (`strategy.run` inside `tf.function`) for every
configuration in `CONFIGS`, saves the final weights to
OUT_DIR/worker{INDEX}_{name}.npy, and reports the collective ops of the
traced step. Then tries `model.fit`, which Keras 3.15 cannot run under this
strategy, and reports the error it raises.
"""

import json
import os
import sys

index, port_0, port_1, out_dir = sys.argv[1:5]
os.environ["TF_CONFIG"] = json.dumps(
    {
        "cluster": {"worker": [f"127.0.0.1:{port_0}", f"127.0.0.1:{port_1}"]},
        "task": {"type": "worker", "index": int(index)},
    }
)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

tf.config.threading.set_inter_op_parallelism_threads(1)
tf.config.threading.set_intra_op_parallelism_threads(1)
strategy = tf.distribute.MultiWorkerMirroredStrategy()

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from scripts.distributed_common import GLOBAL_BATCH  # noqa: E402
from scripts.distributed_common import MULTI_WORKER_CONFIGS  # noqa: E402
from scripts.distributed_common import custom_loop  # noqa: E402
from scripts.distributed_common import data  # noqa: E402
from scripts.distributed_common import make_model  # noqa: E402
from scripts.distributed_common import make_optimizer  # noqa: E402
from scripts.distributed_common import report  # noqa: E402


def collective_ops(step_function, *args):
    """Collective ops of the traced step: at top level (run on every
    micro-batch) and inside functions (e.g. the update's loop body)."""
    graph = step_function.get_concrete_function(*args).graph.as_graph_def()
    top = sorted(n.op for n in graph.node if "Collective" in n.op)
    nested = {
        f.signature.name: [n.op for n in f.node_def if "Collective" in n.op]
        for f in graph.library.function
    }
    return top, {name: ops for name, ops in nested.items() if ops}


x, y = data(GLOBAL_BATCH, 8)
for name, (kind, k) in MULTI_WORKER_CONFIGS.items():
    with strategy.scope():
        model = make_model()
        optimizer = make_optimizer(kind, k)
        optimizer.build(model.trainable_variables)
    step = custom_loop(strategy, model, optimizer, x, y, GLOBAL_BATCH)
    top, nested = collective_ops(step.traced, *step.example)
    weights = np.concatenate([np.ravel(w) for w in model.get_weights()])
    np.save(os.path.join(out_dir, f"worker{index}_{name}.npy"), weights)
    report(
        check="multi_worker_loop",
        worker=int(index),
        config=name,
        iterations=int(optimizer.iterations.numpy()),
        micro_steps=int(optimizer.micro_steps.numpy()),
        top_level_collectives=top,
        nested_collectives=nested,
    )

with strategy.scope():
    model = make_model()
    model.compile(optimizer=make_optimizer("adam_macro", 4), loss="mse")
try:
    model.fit(x, y, batch_size=GLOBAL_BATCH, epochs=1, verbose=0)
    report(check="multi_worker_fit", worker=int(index), error=None)
except Exception as error:  # reported: the README documents this failure
    report(
        check="multi_worker_fit",
        worker=int(index),
        error_type=type(error).__name__,
        error=str(error)[-400:],
    )
