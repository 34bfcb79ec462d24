"""The narrow interface between the pipeline and its update rule.

The pipeline (`pipeline.py`) holds no optimizer. It is given an object of
the `UpdateRuleHooks` shape, which the optimizer classes implement
(`optimizers/base.py`), and asks nothing else of them:

    make_state(name, ...)        create one variable of the pipeline's state
    apply_rule(grads, variables, variances, placement)
                                 weight decay -> the rule -> moving average
                                 -> constraints, written through `placement`
    gated(gate, fn)              run `fn`'s writes only where `gate` holds
    assign(variable, value)      a write that obeys the gate
    iterations                   the update counter (a variable)
    variable_index(variable)     a model variable's index in that order
    overwrites_with_gradient(v)  Keras's float8 scales: written, not updated
    state_variables()            everything an update may read or write
    learning_rate_owner()        the Keras optimizer whose learning rate the
                                 rule reads (the wrapper's inner optimizer)
    reads_micro_variance         whether the rule reads the within-update
                                 variance (Adam's "micro" second moment)
    strategy                     the `tf.distribute` strategy, or `None`

A placement says where the rule writes: `LOCAL` (the variables
themselves: one device, or JAX arrays sharded by `keras.distribution`), or
every replica's copy under `tf.distribute` (`backends/tf_distribute.py`).
"""

from typing import Any
from typing import Protocol


class UpdateRuleHooks(Protocol):
    """What the pipeline may ask of the optimizer that owns it (see the
    module's docstring)."""

    iterations: Any
    reads_micro_variance: bool
    strategy: Any

    def make_state(self, name: str, **options: Any) -> Any: ...

    def apply_rule(self, grads, variables, variances, placement) -> None: ...

    def gated(self, gate, fn) -> None: ...

    def assign(self, variable, value) -> None: ...

    def variable_index(self, variable) -> int: ...

    def overwrites_with_gradient(self, variable) -> bool: ...

    def state_variables(self) -> list: ...

    def learning_rate_owner(self) -> Any: ...


class LocalPlacement:
    """Writes the rule's updates to the variables themselves."""

    def update(self, variable, fn, args=()):
        """Calls `fn(variable, *args)`, which writes `variable`."""
        fn(variable, *args)

    def apply_inner(self, apply, grads, variables):
        """Calls a wrapped Keras optimizer's `apply(grads, variables)`."""
        apply(grads, variables)


LOCAL = LocalPlacement()
