"""Running the pipeline on TensorFlow: under a `tf.distribute` strategy
through the halves of `tf_distribute.py`; eagerly with `jit_compile=True`
as one XLA-compiled `tf.function`; otherwise traced (or run) in place,
inside `fit`'s step or a user's `tf.function`. The operations the stages
use are in `tensorflow.py`.
"""

import tensorflow as tf

from keras_gradtools.backends import private_api


def apply(pipeline, grads, indices, weight=None, state_variables=None):
    """Runs one micro-batch (of count `weight`, or `None`) through
    `pipeline`: the gradients `grads` of the variables `indices` (in build
    order). `state_variables` is for the JAX backend's branches, and not
    called: TensorFlow's branches write variables in place.

    Under a `tf.distribute` strategy, in replica or cross-replica context,
    the halves of `tf_distribute` run it; eagerly with `jit_compile=True`,
    one XLA-compiled function; otherwise it is traced (or run) in place.
    """
    del state_variables
    if tf.distribute.has_strategy():
        from keras_gradtools.backends import tf_distribute

        tf_distribute.apply(pipeline, grads, indices, weight)
        return
    if pipeline.settings.jit_compile and tf.executing_eagerly():
        # A callable learning rate is called now, as Keras calls it on
        # every apply, and its value passed in: traced, it would be frozen.
        learning_rate = private_api.callable_learning_rate_value(
            pipeline.hooks.learning_rate_owner()
        )
        _compiled_pipeline(pipeline)(
            tuple(grads), tuple(indices), learning_rate, weight
        )
        return
    pipeline.run(grads, indices, weight)


def _compiled_pipeline(pipeline):
    compiled = pipeline.compiled.get("eager")
    if compiled is None:
        hooks = pipeline.hooks

        def run(grads, indices, learning_rate, weight):
            with private_api.feeding_learning_rate(
                hooks.learning_rate_owner(), learning_rate
            ):
                pipeline.run(list(grads), list(indices), weight)

        # No AutoGraph: the pipeline has no Python control flow on tensors
        # (see `not_for_autograph`), and converting it warned about
        # `importlib`'s `_gcd_import`.
        compiled = tf.function(run, jit_compile=True, autograph=False)
        pipeline.compiled["eager"] = compiled
    return compiled
