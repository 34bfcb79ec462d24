"""Running the pipeline on JAX: in place inside a stateless scope, or as
one compiled function of the variables' values.

Inside `model.fit` (which calls `optimizer.stateless_apply` in its jitted
step) or a user's own `jax.jit` loop, the pipeline is traced in place: its
writes go to the `keras.StatelessScope`. Called eagerly (outside any
stateless scope), `apply` runs the pipeline as one `jax.jit`-compiled
function of the variables' values (or, with `jit_compile=False`, op by
op) and writes the results back. The operations the stages use are in
`jax.py`.
"""

import jax
import keras

from keras_gradtools.backends import jax as jax_backend
from keras_gradtools.backends import private_api


def apply(pipeline, grads, indices, weight=None, state_variables=list):
    """Runs one micro-batch through `pipeline`: in place inside a stateless
    scope (`fit`, `stateless_apply`), else as a function of the variables'
    values whose results are written back.

    Args:
        pipeline: The optimizer's `Pipeline`.
        grads: The gradients of the variables `indices` (build order).
        indices: The variables' indices.
        weight: The micro-batch's count, or `None`.
        state_variables: Returns every variable the update may read or
            write (the pipeline threads their values through its branches).
    """
    state = list(state_variables())
    if private_api.in_stateless_scope():
        pipeline.run(grads, indices, weight, state)
        return
    function = _stateless_pipeline(pipeline, tuple(indices), state)
    # A callable learning rate is called now, as Keras calls it on every
    # apply, and its value passed in: traced, it would be frozen.
    learning_rate = private_api.callable_learning_rate_value(
        pipeline.hooks.learning_rate_owner()
    )
    new_values = function(
        [v.value for v in state], list(grads), learning_rate, weight
    )
    for variable, value in zip(state, new_values):
        variable.assign(value)


def _stateless_pipeline(pipeline, indices, state):
    """The pipeline as a pure function `(state values, grads) -> new state
    values`, jitted unless `jit_compile=False`; cached per variable set."""
    cache = pipeline.compiled
    if indices not in cache:
        hooks = pipeline.hooks

        def run(values, grads, learning_rate, weight):
            owner = hooks.learning_rate_owner()
            with (
                keras.StatelessScope(
                    state_mapping=list(zip(state, values))
                ) as scope,
                private_api.feeding_learning_rate(owner, learning_rate),
            ):
                pipeline.run(grads, list(indices), weight, state)
            return [
                jax_backend.current_value(scope, variable, value)
                for variable, value in zip(state, values)
            ]

        cache[indices] = jax.jit(run) if pipeline.settings.jit_compile else run
    return cache[indices]
