"""Saving and restoring the optimizer's state, checked against its layout.

Keras only warns, and silently drops all optimizer state, when a saved
state does not fit the optimizer it is loaded into. `SavedState` (a mixin
of `GradientPipelineOptimizer`) saves a description of the layout (which
slots exist, for which variables, `layout.py`) beside the arrays and
refuses what does not fit, naming the difference. It adapts to the
gradient statistics, which callbacks switch on at the start of `fit`.
"""

import functools
from collections.abc import Sequence

import keras
from keras import ops

from keras_gradtools.backends import common
from keras_gradtools.backends import private_api
from keras_gradtools.optimizers import layout


class SavedState:
    """Mixin of `GradientPipelineOptimizer`: its variables in their one
    order, `get_weights`/`set_weights`, `save_own_variables`,
    `load_own_variables` and the layout they check.

    It owns each variable's role in the saved layout (`variable_role`,
    recorded when the variable is made) and the state loaded before `build`
    until `build` applies it, and asks the optimizer for its `pipeline`.
    """

    def __init__(self, *args, **kwargs):
        # (saved layout, arrays) loaded before `build`, or `None`. Set
        # before Keras's `__init__`, as a plain attribute (not tracked).
        object.__setattr__(self, "_pending_state", None)
        # id(variable) -> its role in the saved layout (`layout.ROLE_ORDER`).
        object.__setattr__(self, "_roles", {})
        super().__init__(*args, **kwargs)

    def variable_role(self, variable: keras.Variable) -> str | None:
        """The role of one of this optimizer's variables in the saved
        layout (`layout.ROLE_ORDER`), which orders `variables`.

        Args:
            variable: One of `optimizer.variables`.

        Returns:
            The role it was made with by the `make_state` hook (the
            pipeline's state, e.g. `"accumulator"`, or a rule's, e.g. Adam's
            `"beta_1_transfer"`), or `None` for Keras's own variables and
            the rule's slots.
        """
        return self._roles.get(id(variable))

    def record_variable_role(self, variable: keras.Variable, role: str) -> None:
        """Gives one of this optimizer's variables its role in the saved
        layout (`layout.ROLE_ORDER`), which places it in `variables`.
        The `make_state` hook records the role of every variable it makes.

        Args:
            variable: A variable this optimizer created.
            role: Its role, e.g. `"gradient_sum"`.
        """
        self._roles[id(variable)] = role

    @property
    def variables(self) -> list[keras.Variable]:
        """All optimizer variables: Keras's and the rule's in creation order,
        then the pipeline's in a fixed order of roles. This one order is
        used by `get_weights`, `set_weights`, saving and `stateless_apply`,
        whenever each part was created."""
        order = sorted(
            enumerate(private_api.tracked_variables(self)),
            key=lambda item: (
                layout.role_rank(self.variable_role(item[1])),
                item[0],
            ),
        )
        return [variable for _, variable in order]

    def get_weights(self) -> list:
        """The values of `variables`, as NumPy arrays."""
        return [ops.convert_to_numpy(v) for v in self.variables]

    def set_weights(self, weights: Sequence) -> None:
        """Sets `variables` from a list of arrays in the same order.

        Raises:
            ValueError: if the optimizer is not built, or the number or
                shapes of the arrays do not match `variables`.
        """
        if not self.built:
            raise ValueError(
                "`set_weights()` needs a built optimizer: call "
                "`optimizer.build(trainable_variables)` first."
            )
        variables = self.variables
        weights = list(weights)
        if len(weights) != len(variables):
            raise ValueError(
                f"`set_weights()` received {len(weights)} arrays; this "
                f"optimizer has {len(variables)} variables (see "
                "`optimizer.variables` for their order)."
            )
        for variable, weight in zip(variables, weights):
            shape = tuple(getattr(weight, "shape", ()))
            if tuple(variable.shape) != shape:
                raise ValueError(
                    f"Optimizer variable {common.variable_path(variable)} has "
                    "shape "
                    f"{tuple(variable.shape)}, not compatible with the "
                    f"provided weight of shape {shape}."
                )
        for variable, weight in zip(variables, weights):
            variable.assign(weight)

    def save_own_variables(self, store):
        """Saves every optimizer variable, plus a description of the layout
        so that loading into a different configuration fails clearly."""
        for i, variable in enumerate(self.variables):
            store[str(i)] = ops.convert_to_numpy(variable)
        store[layout.LAYOUT_KEY] = layout.encode(self._layout())

    def load_own_variables(self, store):
        """Restores every optimizer variable from `store`.

        State saved before the optimizer was built (a model compiled and
        saved before training) restores the counters it has and leaves the
        rest fresh. State restored into an optimizer not built yet (a
        pickled or deep-copied optimizer) is kept and applied by `build`.

        Raises:
            ValueError: if the saved state was written by a different
                optimizer class, a configuration with a different set of
                slots, or for different variables. Keras itself only warns
                and silently drops all optimizer state in that case.
        """
        saved = layout.saved_layout(store)
        arrays = layout.saved_arrays(store)
        if saved is not None and not saved.get("built", True):
            self._load_unbuilt_state(saved, arrays)
            return
        if not self.built:
            object.__setattr__(self, "_pending_state", (saved, arrays))
            return
        self._restore(saved, arrays)

    def _restore(self, saved, arrays):
        """Restores saved state, adapting to whether statistics were on.

        Statistics are switched on by callbacks (the monitor, adaptive
        accumulation) at the start of `fit`, which may be after a callback
        such as `BackupAndRestore` has restored state written with them on:
        they are switched on here first. State saved without them restores
        everything else; they start fresh (from the next cycle, if the
        state is mid-cycle).
        """
        settings = (saved or {}).get("settings", {})
        if saved is not None and saved.get("format") == layout.FORMAT:
            if (
                settings.get("statistics")
                and not self.track_gradient_statistics
            ):
                self.enable_gradient_statistics(
                    per_coordinate=bool(settings.get("sum_of_squares"))
                )
            elif (
                settings.get("sum_of_squares")
                and not self.pipeline.keeps_square_sums
            ):
                self.enable_gradient_statistics(per_coordinate=True)
        variables = self._variables_in(settings) if saved else self.variables
        expected = self._layout()
        expected["settings"] = dict(
            expected["settings"],
            statistics=settings.get(
                "statistics", self.track_gradient_statistics
            ),
            sum_of_squares=settings.get(
                "sum_of_squares", self.pipeline.keeps_square_sums
            ),
        )
        if "hyperparameter_transfer" in expected["settings"]:
            # Files written before the switches existed hold none: they
            # keep their neutral values (off, factor 1).
            expected["settings"]["hyperparameter_transfer"] = settings.get(
                "hyperparameter_transfer"
            )
        expected["variables"] = layout.describe("", True, {}, variables)[
            "variables"
        ]
        layout.check(saved, arrays, expected)
        for variable, array in zip(variables, arrays):
            variable.assign(array)
        self.pipeline.check_restored_cycle()
        accumulator = self.pipeline.accumulator
        role = self.variable_role
        missing = {role(v) for v in self.variables} - {
            role(v) for v in variables
        }
        missing -= {
            "beta_1_transfer",
            "beta_2_transfer",
            "weight_decay_transfer",
        }
        if missing and accumulator.accumulates:
            # Statistics on here but not in the saved state.
            accumulator.complete_square_norm_sums()

    def _variables_in(self, settings):
        """This optimizer's variables that state saved with `settings`
        holds: without statistics there, not theirs (nor the sums that
        only they need)."""
        dropped = set()
        if not settings.get("statistics"):
            dropped |= {"statistic", "running_statistic", "square_norm_sum"}
        if not settings.get("sum_of_squares"):
            dropped.add("square_sum")
        if not (settings.get("statistics") or settings.get("sum_of_squares")):
            dropped.add("cycle_samples")
        if not settings.get("hyperparameter_transfer"):
            dropped |= {
                "beta_1_transfer",
                "beta_2_transfer",
                "weight_decay_transfer",
            }
        return [
            v for v in self.variables if self.variable_role(v) not in dropped
        ]

    def _load_unbuilt_state(self, saved, arrays):
        """The state of an optimizer saved before it was built: Keras's own
        variables (the update counter, the learning rate)."""
        variables = self._keras_variables()
        expected = layout.describe(
            self._layout()["class"], False, self._layout_settings(), variables
        )
        layout.check(saved, arrays, expected)
        for variable, array in zip(variables, arrays):
            variable.assign(array)

    def _keras_variables(self):
        """The variables that exist before `build` (Keras's own)."""
        return private_api.keras_variables(self)

    def _apply_pending_state(self):
        """Restores state loaded before `build`. Keras may build the
        optimizer while it traces the first training step: the restore
        runs outside that trace, so that it takes effect at once."""
        pending = self._pending_state
        if pending is not None:
            object.__setattr__(self, "_pending_state", None)
            with common.outside_trace():
                self._restore(*pending)

    def _layout_settings(self):
        """The settings that decide which variables exist and what they
        mean. Subclasses with slots of their own add theirs."""
        return {
            "max_accumulation_steps": self.max_accumulation_steps,
            "sum_of_squares": self.pipeline.keeps_square_sums,
            "noise": self.noise_eta > 0,
            "use_ema": bool(self.use_ema),
            "statistics": self.track_gradient_statistics,
            **({"weighted": True} if self.weighted_accumulation else {}),
        }

    def _layout(self):
        return layout.describe(
            type(self).__name__,
            self.built,
            self._layout_settings(),
            self.variables,
        )


def restoring_pending_state(build):
    """`build`, followed (in its outermost call: a subclass's `build` calls
    its parent's first) by the restore of state loaded before `build`
    (a pickled or deep-copied optimizer), once every slot exists."""

    @functools.wraps(build)
    def build_then_restore(self, variables):
        depth = getattr(self, "_build_depth", 0)
        object.__setattr__(self, "_build_depth", depth + 1)
        try:
            build(self, variables)
        finally:
            object.__setattr__(self, "_build_depth", depth)
        if depth == 0:
            self._apply_pending_state()

    return build_then_restore
