"""The update-rule sequence, written once: weight decay -> the rule ->
the weights' moving average -> constraints (Keras's order), and the gated
writes that let the pipeline skip an update without a branch.

`UpdateRuleSequence` is the part of `GradientPipelineOptimizer` that the
pipeline reaches through its one `apply_rule` hook, with a `RuleUpdate`
(`pipeline/hooks.py`) that carries everything the rule reads of the
pipeline. Every write goes through the update's placement: the variables
themselves, or every replica's copy under `tf.distribute`.
"""

from keras import ops

from keras_gradtools.backends import private_api


class UpdateRuleSequence:
    """Mixin of `GradientPipelineOptimizer`: the rule sequence and the gate.

    A subclass implements `update_step` as for any Keras optimizer, writing
    through `self.assign*`; it may ask for scalars computed once per update
    (not once per variable) with `once_per_update`, and read the update's
    counters from `current_update`.
    """

    def _apply_rule(self, update):
        """Weight decay and the update rule for each variable, the weights'
        moving average, then the variables' constraints: one `RuleUpdate`,
        whose writes take effect only where its gate holds."""
        learning_rate = self._scaled_learning_rate(update)
        object.__setattr__(self, "_current_update", update)
        object.__setattr__(self, "_update_gate", update.gate)
        object.__setattr__(self, "_update_scalars", {})
        placement = update.placement
        try:
            for grad, variable, variance in zip(
                update.gradients, update.variables, update.variances
            ):
                placement.update(
                    variable,
                    lambda v, g, w: self._rule_step(g, v, learning_rate, w),
                    (grad, variance),
                )
            if self.use_ema:
                self._update_moving_averages()
            for variable in update.variables:
                constraint = getattr(variable, "constraint", None)
                if constraint is not None:
                    placement.update(
                        variable,
                        lambda v, c=constraint: self.assign(v, c(v)),
                    )
        finally:
            object.__setattr__(self, "_update_scalars", None)
            object.__setattr__(self, "_update_gate", None)
            object.__setattr__(self, "_current_update", None)

    @property
    def current_update(self):
        """The `RuleUpdate` being applied (`pipeline/hooks.py`), for
        `update_step`: the update counter, the cycle's K and the
        micro-batches seen, as the pipeline hands them over. `None` outside
        an update."""
        return getattr(self, "_current_update", None)

    def _scaled_learning_rate(self, update):
        """The learning rate of this update: the rate (or its schedule's
        value at `iterations`) times the update's `learning_rate_factor`."""
        learning_rate = self.learning_rate
        if update.learning_rate_factor is not None:
            factor = ops.convert_to_tensor(update.learning_rate_factor)
            learning_rate = ops.multiply(
                ops.cast(learning_rate, "float32"), factor
            )
        return learning_rate

    def _rule_step(self, grad, variable, learning_rate, variance):
        self._decay_weight(variable, learning_rate)
        self.update_step(
            grad, variable, learning_rate, micro_batch_variance=variance
        )

    def once_per_update(self, key, compute):
        """`compute()`, computed once per update for all the variables that
        ask with the same `key` (a rule's scalars: its step size, its
        decays), not once per variable: a model with hundreds of tensors
        would otherwise trace and compile hundreds of copies.

        For `update_step`; outside an update it computes every time.

        Args:
            key: A hashable that names the scalars, e.g. `("adam", dtype)`.
            compute: A function of no arguments that returns them.

        Returns:
            What `compute()` returned for `key` in this update.
        """
        scalars = getattr(self, "_update_scalars", None)
        if scalars is None:
            return compute()
        if key not in scalars:
            scalars[key] = compute()
        return scalars[key]

    def _decay_weight(self, variable, learning_rate):
        if self.weight_decay and private_api.uses_weight_decay(self, variable):
            wd, lr = self.once_per_update(
                ("weight_decay", str(variable.dtype)),
                lambda: self._weight_decay_scalars(
                    learning_rate, variable.dtype
                ),
            )
            self.assign(variable, variable - variable * wd * lr)

    def _weight_decay_scalars(self, learning_rate, dtype):
        """`(weight_decay, learning_rate)` of this update in `dtype`."""
        lr = ops.cast(learning_rate, dtype)
        wd = ops.cast(self.weight_decay, dtype)
        factor = self._weight_decay_factor_variable()
        if factor is not None:
            # Moved with K by a batch-size policy (Adam, AdamW; 1 until
            # then, which leaves `wd` as it is).
            factor = ops.convert_to_tensor(factor)
            wd = ops.where(
                ops.equal(factor, 1.0),
                wd,
                ops.cast(ops.multiply(float(self.weight_decay), factor), dtype),
            )
        return wd, lr

    def _weight_decay_factor_variable(self):
        """The variable that moves the weight decay with K (a rule's state,
        e.g. Adam's `weight_decay_factor`), or `None`: the decay is then
        `weight_decay` as it is."""
        return None

    def update_step(
        self, gradient, variable, learning_rate, micro_batch_variance=None
    ):
        """Applies the update rule to one variable.

        Args:
            gradient: The clipped, noised mean gradient (float32).
            variable: The variable to update.
            learning_rate: The learning rate of this update.
            micro_batch_variance: For rules that read it (Adam's "micro"
                second moment), `c**2 * W`, the elementwise variance of the
                cycle's micro-batch gradients scaled by the clip factor;
                `None` when there is no accumulation.
        """
        raise NotImplementedError

    def _update_moving_averages(self):
        iterations = self.current_update.iterations
        not_first = ops.not_equal(iterations, 0)
        pairs = [
            (variable, average)
            for variable, average in zip(
                private_api.trainable_variables(self),
                private_api.weights_moving_average(self),
            )
            if average is not None
        ]
        for variable, average in pairs:
            momentum = ops.multiply(
                ops.cast(not_first, variable.dtype), self.ema_momentum
            )
            self.assign(average, momentum * average + (1 - momentum) * variable)
        if self.ema_overwrite_frequency:
            overwrite = ops.equal(
                ops.mod(iterations + 1, self.ema_overwrite_frequency), 0
            )
            for variable, average in pairs:
                self.assign(
                    variable,
                    ops.where(
                        overwrite,
                        ops.convert_to_tensor(average),
                        ops.convert_to_tensor(variable),
                    ),
                )

    # ------------------------------------------------------------------
    # Gated writes: a skipped update leaves every variable unchanged. Our
    # own rules write through `self.assign*`, so a select per write
    # suffices: it fuses into the update and moves no extra bytes.

    def assign(self, variable, value):
        gate = getattr(self, "_update_gate", None)
        if gate is not None:
            value = ops.where(
                gate,
                ops.cast(value, variable.dtype),
                ops.convert_to_tensor(variable),
            )
        super().assign(variable, value)

    def assign_add(self, variable, value):
        if getattr(self, "_update_gate", None) is not None:
            self.assign(
                variable, ops.add(ops.convert_to_tensor(variable), value)
            )
        else:
            super().assign_add(variable, value)

    def assign_sub(self, variable, value):
        if getattr(self, "_update_gate", None) is not None:
            self.assign(
                variable, ops.subtract(ops.convert_to_tensor(variable), value)
            )
        else:
            super().assign_sub(variable, value)
