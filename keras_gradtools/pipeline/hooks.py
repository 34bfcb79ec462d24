"""The narrow interface between the pipeline and its update rule.

The pipeline (`pipeline.py`) holds no optimizer. It is given an object of
the `UpdateRuleHooks` shape, which the optimizer classes implement
(`optimizers/base.py`), and asks nothing else of them:

    make_state(name, ...)        create one variable of the pipeline's state
    apply_rule(update)           weight decay -> the rule -> moving average
                                 -> constraints for one `RuleUpdate`, its
                                 writes gated and made through its placement
    iterations                   the update counter (a variable)
    overwrites_with_gradient(v)  Keras's float8 scales: written, not updated
    learning_rate_owner()        the Keras optimizer whose learning rate the
                                 rule reads (the wrapper's inner optimizer)
    reads_micro_variance         whether the rule reads the within-update
                                 variance (Adam's "micro" second moment)
    strategy                     the `tf.distribute` strategy, or `None`

A placement says where the rule writes: `LOCAL` (the variables
themselves: one device, or JAX arrays sharded by `keras.distribution`), or
every replica's copy under `tf.distribute` (`backends/tf_distribute.py`).

The pipeline calls into the rule once per update (`apply_rule`) and hands
it, in the `RuleUpdate`, everything the rule reads of the pipeline's
state: the rule never calls back into the pipeline.
"""

import dataclasses
from collections.abc import Sequence
from typing import Any
from typing import Protocol


@dataclasses.dataclass(frozen=True)
class RuleUpdate:
    """One update, as the pipeline hands it to the update rule.

    Attributes:
        gradients: The clipped, noised mean gradient per variable (float32).
        variables: The variables to update, in the same order.
        variances: Per variable, `c**2 * W` (the micro-batch variance scaled
            by the clip factor) for a rule that reads it, else `None`.
        gate: `None`, or a scalar boolean: the update's writes take effect
            only where it holds (a skipped update writes nothing).
        placement: Where the rule writes (`LOCAL`, or every replica).
        iterations: The update counter before this update (a variable).
        learning_rate_factor: `None` without accumulation, else the scalar
            the learning rate is multiplied by (moved with K).
        cycle_steps: The cycle's K (scalar int32; 1 without accumulation).
        micro_steps: The micro-batches counted before this one (a variable).
        initial_steps: The K the optimizer was created with (K0).
        state: Every variable the update may read or write (the
            optimizer's and the model's), for a rule that branches on
            `gate`: the JAX backend threads their values through the branch.
    """

    gradients: list
    variables: list
    variances: list
    gate: Any
    placement: Any
    iterations: Any
    learning_rate_factor: Any = None
    cycle_steps: Any = 1
    micro_steps: Any = None
    initial_steps: int = 1
    state: Sequence = ()


class UpdateRuleHooks(Protocol):
    """What the pipeline may ask of the optimizer that owns it (see the
    module's docstring)."""

    iterations: Any
    reads_micro_variance: bool
    strategy: Any

    def make_state(self, name: str, **options: Any) -> Any: ...

    def apply_rule(self, update: RuleUpdate) -> None: ...

    def overwrites_with_gradient(self, variable) -> bool: ...

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
