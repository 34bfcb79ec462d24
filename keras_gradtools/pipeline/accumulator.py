"""The accumulator: the state of an accumulation cycle and the arithmetic
on it (docs/design.md §1).

A cycle consumes K micro-batch gradients at fixed weights. The accumulator
keeps, per model variable, the sum `G = sum g_i` (or, for variables that
Keras overwrites with their gradient, the cycle's maximum), where read the
sum of squares `S = sum g_i**2`, and for the statistics the per-variable
scalars `Q = sum |g_i|**2`. The first micro-batch of a cycle overwrites the
sums instead of adding to them, so the update never zeroes them.

With `weighted=True` (`weighted_accumulation`), each micro-batch weighs by
its count w_i, what its loss was averaged over (valid tokens, samples, the
sum of sample weights): the sums become `G = sum w_i h_i`, `S = sum w_i
h_i**2`, `Q = sum w_i |h_i|**2` and `W = sum w_i`, where `h_i` is the mean
gradient of the samples behind the count (the micro-batch gradient, or
under a strategy a replica's, R times its share), so that `G / W` is the
gradient of one big batch when the micro-batches differ (docs/design.md
§7). The count of micro-batches then counts those of positive weight.

K itself is state (`accumulation_steps`, an int32 variable): it may change
between cycles without retracing the step, up to `max_steps`, which is
fixed at construction and decides whether the sums exist at all. A change
takes effect at the next cycle boundary: the cycle's own K is latched when
it starts (`cycle_steps`).

Under a `tf.distribute` strategy the sums, the count of finite micro-batches
and the count of skipped ones are per-replica (SyncOnRead, SUM) variables:
each replica adds its own gradient without communication, and reading them
in cross-replica context (once per update) is the all-reduce. Each of R
replicas counts 1/R of a micro-batch, so the count means the same on any
number of replicas (exact for R a power of two, else to float32 rounding).
"""

from typing import Any
from typing import NamedTuple

from keras import ops

from keras_gradtools import transforms
from keras_gradtools.transforms import sparse


class CycleSums(NamedTuple):
    """What a finished cycle holds, as the update reads it: the count of
    finite micro-batches, the mean gradients, the gradient samples per
    micro-batch and whether the cycle's micro-batches agreed on it, the
    per-variable Σ|g|² (or `None`) and the per-coordinate mean squares (or
    `None`); and, where a mean is finite exactly when its sum is, the sums
    themselves (else `None`), for the finite check."""

    count: Any
    means: list
    samples: Any
    valid: Any
    norm_sums: Any
    mean_squares: list | None
    sums: list | None = None


class GradientAccumulator:
    """ΣG, Σg², Σ|g|² and the cycle counters of one optimizer.

    Args:
        make_state: `make_state(name, **options)`, the update rule's hook
            that creates a variable of the pipeline's state (tracked, saved
            and, under a strategy, per-replica where `local=True`).
        variables: The model variables, in build order.
        overwritten: Per variable, whether Keras overwrites it with its
            gradient (float8 scales): the cycle keeps its maximum.
        backend: The backend module (`keras_gradtools.backends.current()`).
        max_steps: The largest K this optimizer accepts; sums exist only
            when it is above 1.
        steps: The K of the first cycle.
        square_sums: Whether to keep the per-coordinate Σg² (Adam "micro",
            per-coordinate statistics).
        square_norm_sums: Whether to keep the per-variable Σ|g|² (gradient
            statistics).
        weighted: Whether micro-batches weigh by their counts (`W` kept).
    """

    def __init__(
        self,
        make_state,
        variables,
        overwritten,
        backend,
        max_steps,
        steps,
        square_sums,
        square_norm_sums,
        weighted=False,
    ):
        self._make_state = make_state
        self.overwritten = list(overwritten)
        self._backend = backend
        make = make_state
        self.max_steps = max_steps
        self.weighted = weighted
        self.weight = None
        self.micro_steps = make("micro_steps", dtype="int")
        self.skipped_micro_batches = make(
            "skipped_micro_batches", dtype="int", local=True
        )
        self.gradient_sums = []
        self.square_sums = []
        self.square_norm_sums = None
        self.cycle_samples = None
        if not self.accumulates:
            return
        self.steps = make("accumulation_steps", dtype="int32", initial=steps)
        # What the update multiplies the learning rate by: set with K (by
        # AdaptiveAccumulation) when the effective batch changes.
        self.learning_rate_factor = make("learning_rate_factor", initial=1.0)
        self.cycle_steps = make("cycle_steps", dtype="int32", initial=steps)
        self.position = make("cycle_position", dtype="int32")
        self.count = make("cycle_micro_batches", local=True)
        if weighted:
            self.weight = make("cycle_weight", role="cycle_weight", local=True)
        self.gradient_sums = [
            make(
                "gradient_maximum" if overwrites else "gradient_sum",
                role="gradient_sum",
                local=True,
                reference=v,
                keep_dtype=overwrites,
            )
            for v, overwrites in zip(variables, self.overwritten)
        ]
        if square_sums:
            self.add_square_sums(variables)
        if square_norm_sums:
            self.add_square_norm_sums(len(variables))

    @property
    def accumulates(self) -> bool:
        """Whether micro-batches are accumulated (max K above 1)."""
        return self.max_steps > 1

    def add_square_sums(self, variables):
        """Creates the per-coordinate Σg²."""
        self.square_sums = [
            None
            if overwrites
            else self._make_state("square_sum", local=True, reference=v)
            for v, overwrites in zip(variables, self.overwritten)
        ]
        self._add_cycle_samples()

    def add_square_norm_sums(self, count):
        """Creates the per-variable Σ|g|² (switching statistics on)."""
        self.square_norm_sums = self._make_state(
            "square_norm_sum", shape=(count,), local=True
        )
        self._add_cycle_samples()

    def complete_square_norm_sums(self):
        """Σ|g|² for a cycle begun without it (statistics switched on, or
        state restored without them, mid-cycle): the per-variable sums of
        Σg² when kept, exactly; else the statistics skip this cycle."""
        if not int(ops.convert_to_numpy(self.position)):
            return
        if self.square_sums:
            self.square_norm_sums.assign(
                ops.stack(
                    [
                        ops.zeros((), "float32")
                        if s is None
                        else transforms.flat_sum(s)
                        for s in self.square_sums
                    ]
                )
            )
        else:
            self.cycle_samples.assign(-1)

    def _add_cycle_samples(self):
        """The gradient samples per micro-batch of the current cycle (R when
        each of R replicas' gradients is a sample, else 1), or -1 once two
        micro-batches of a cycle disagree: sums of squares taken at two batch
        sizes form no variance."""
        if self.cycle_samples is None:
            self.cycle_samples = self._make_state(
                "cycle_samples", dtype="int32", initial=1
            )

    # ------------------------------------------------------------------
    # Where in the cycle we are.

    def cycle_flags(self):
        """Returns `(first, last, steps)`: whether this micro-batch starts
        and ends its cycle, and the cycle's K (scalar tensors)."""
        position = ops.convert_to_tensor(self.position)
        first = ops.equal(position, 0)
        steps = ops.where(
            first,
            ops.convert_to_tensor(self.steps),
            ops.convert_to_tensor(self.cycle_steps),
        )
        last = ops.greater_equal(position + 1, steps)
        return first, last, steps

    def current_cycle_steps(self):
        """The K of the cycle in progress (scalar int32 tensor)."""
        return self.cycle_flags()[2]

    def advance(self, first, last, steps):
        """Moves the counters on by one micro-batch."""
        self.cycle_steps.assign(
            ops.where(first, steps, ops.convert_to_tensor(self.cycle_steps))
        )
        self.position.assign(ops.where(last, 0, ops.add(self.position, 1)))

    def count_micro_step(self):
        self.micro_steps.assign_add(ops.ones((), self.micro_steps.dtype))

    def count_skipped(self, finite, counted=None):
        """Counts a non-finite micro-batch (only where `counted` holds)."""
        skipped = ops.logical_not(finite)
        if counted is not None:
            skipped = ops.logical_and(skipped, counted)
        self.skipped_micro_batches.assign_add(
            ops.cast(skipped, self.skipped_micro_batches.dtype)
        )

    # ------------------------------------------------------------------
    # Adding a micro-batch (local: no communication under a strategy).

    def add(
        self,
        grads,
        indices,
        first,
        finite=None,
        norms=None,
        count=1.0,
        weight=None,
    ):
        """Adds one micro-batch to the sums.

        Args:
            grads: float32 gradients (dense, or `IndexedSlices`
                on TensorFlow).
            indices: Their variables' indices in build order.
            first: Whether this micro-batch starts the cycle (it overwrites
                the sums).
            finite: `None`, or a scalar: a non-finite micro-batch adds
                nothing (and does not count).
            norms: The gradients' squared norms, when the statistics keep
                their sums.
            count: What this micro-batch adds to the count (1/R on each of
                R replicas).
            weight: With `weighted`, this micro-batch's count w (a float32
                scalar, finite and >= 0: the caller checks): the sums take
                `w * grads / count` (the samples' mean gradient, weighted).

        The sums of variables without a gradient here restart with the
        cycle all the same.
        """
        backend = self._backend
        scale = square_scale = None
        if self.weighted:
            unit = ops.full((), count, "float32")
            scale = ops.divide(weight, unit)
            square_scale = ops.divide(scale, unit)
            if norms is not None:
                norms = [ops.multiply(n, square_scale) for n in norms]
        for grad, i in zip(grads, indices):
            if sparse.is_sparse(grad):
                backend.restart_or_scatter_add(
                    self.gradient_sums[i],
                    self._weighted(grad.values, scale),
                    grad.indices,
                    first,
                    finite,
                )
                if self.square_sums:
                    backend.restart_or_scatter_add(
                        self.square_sums[i],
                        self._weighted(ops.square(grad.values), square_scale),
                        grad.indices,
                        first,
                        finite,
                    )
                continue
            self._write(
                self.gradient_sums[i],
                transforms.restart_or_add(
                    self.gradient_sums[i],
                    self._weighted(grad, scale),
                    first,
                    finite,
                ),
            )
            if self.square_sums:
                self._write(
                    self.square_sums[i],
                    transforms.restart_or_add(
                        self.square_sums[i],
                        self._weighted(ops.square(grad), square_scale),
                        first,
                        finite,
                    ),
                )
        if self.square_norm_sums is not None and norms is not None:
            self._add_norms(norms, indices, first, finite)
        counted = ops.full((), count, "float32")
        if self.weighted:
            counted = ops.where(ops.greater(weight, 0), counted, 0.0)
            self._write(
                self.weight,
                transforms.restart_or_add(self.weight, weight, first, finite),
            )
        self._write(
            self.count,
            transforms.restart_or_add(self.count, counted, first, finite),
        )
        present = set(indices)
        flags = self.overwritten
        absent = [
            accumulator
            for i, accumulator in enumerate(self.gradient_sums)
            if i not in present and not flags[i]
        ] + [
            accumulator
            for i, accumulator in enumerate(self.square_sums)
            if accumulator is not None and i not in present
        ]
        if absent:
            # A variable without a gradient here (None, or frozen for this
            # fit) must still start the cycle from zero, or stale sums would
            # return when it gets gradients again.
            backend.zero_if(first, absent)

    @staticmethod
    def _weighted(value, scale):
        """`value`, times `scale` when micro-batches are weighted (`w /
        count` for a gradient, `w / count**2` for its square)."""
        return value if scale is None else ops.multiply(value, scale)

    def add_maxima(self, grads, indices, first):
        """Keeps the cycle's maximum of the gradients of variables that Keras
        overwrites with their gradient (float8 scales), as Keras does."""
        for grad, i in zip(grads, indices):
            self._write(
                self.gradient_sums[i],
                transforms.restart_or_maximum(
                    self.gradient_sums[i], grad, first
                ),
            )

    def record_samples(self, first, samples):
        """Notes the gradient samples per micro-batch of this micro-batch
        (mirrored state: cross-replica context under a strategy)."""
        if self.cycle_samples is None:
            return
        recorded = ops.convert_to_tensor(self.cycle_samples)
        # Typed: from the Python int, JAX makes a weakly typed value, and a
        # state whose type changes makes the next `fit` compile again.
        samples = ops.convert_to_tensor(samples, "int32")
        agreed = ops.where(ops.equal(recorded, samples), samples, -1)
        self.cycle_samples.assign(ops.where(first, samples, agreed))

    def _add_norms(self, norms, indices, first, finite):
        """Σ|g|² per variable; entries of absent variables restart too."""
        size = self.square_norm_sums.shape[0]
        positions = {i: p for p, i in enumerate(indices)}
        vector = ops.stack(
            [
                norms[positions[i]]
                if i in positions
                else ops.zeros((), "float32")
                for i in range(size)
            ]
        )
        self._write(
            self.square_norm_sums,
            transforms.restart_or_add(
                self.square_norm_sums, vector, first, finite
            ),
        )

    def _write(self, accumulator, value):
        accumulator.assign(value)

    # ------------------------------------------------------------------
    # Reading a finished cycle (cross-replica under a strategy: the sums).

    def read_cycle(self, indices, mean_squares=False, whole_count=True):
        """Everything the update reads of a finished cycle, in one call.

        Args:
            indices: The variables' indices.
            mean_squares: Whether to read the per-coordinate mean squares
                (for a rule that reads the within-update variance).
            whole_count: Whether the count is a whole number of
                micro-batches (one device; under a strategy each replica
                counts 1/R). Unweighted, a mean `G / n` with `n >= 1` is
                then finite exactly when `G` is, and `sums` holds the `G`.

        Returns:
            A `CycleSums`.
        """
        count = self.total_count()
        samples, valid = self.cycle_samples_and_validity()
        return CycleSums(
            sums=(
                [self.gradient_sums[i] for i in indices]
                if whole_count and not self.weighted
                else None
            ),
            count=count,
            means=self.means(indices, count),
            samples=samples,
            valid=valid,
            norm_sums=self.norm_sums(indices, count, samples),
            mean_squares=(
                self.mean_squares(indices, count, samples)
                if mean_squares
                else None
            ),
        )

    def total_count(self):
        """The finite micro-batches of the cycle, in global micro-batches."""
        return ops.convert_to_tensor(self.count)

    def total_weight(self, count):
        """What the means divide by: `W` when weighted (a cycle of zero
        weight divides by 1: its update is gated off), else `count`."""
        if not self.weighted:
            return count
        weight = ops.convert_to_tensor(self.weight)
        return ops.where(ops.greater(weight, 0), weight, 1.0)

    def means(self, indices, count):
        """`G / count` for each variable, `G / W` when weighted (by a
        reciprocal: XLA then fuses the mean into each reader instead of
        writing it once and reading it back, which it does for a
        division)."""
        reciprocal = ops.divide(1.0, self.total_weight(count))
        return [
            ops.multiply(self.gradient_sums[i], reciprocal) for i in indices
        ]

    def cycle_samples_and_validity(self):
        """Returns `(samples, valid)`: the cycle's gradient samples per
        micro-batch and whether its micro-batches agreed on it."""
        if self.cycle_samples is None:
            return 1, True
        recorded = ops.convert_to_tensor(self.cycle_samples)
        return ops.maximum(recorded, 1), ops.greater(recorded, 0)

    def norm_sums(self, indices, count=None, samples=1):
        """Σ|g|² of the variables `indices`, as one vector in their order,
        or `None` when not kept.

        Weighted, `Q = sum w |h|**2` is returned as `Q * count / (samples *
        W)`: the sum of equal-weight samples with the same weighted mean
        square, which the statistics then read as they read unweighted sums
        (docs/design.md §7)."""
        if self.square_norm_sums is None:
            return None
        sums = ops.convert_to_tensor(self.square_norm_sums)
        if self.weighted:
            scale = ops.divide(
                count,
                ops.multiply(
                    ops.cast(samples, "float32"), self.total_weight(count)
                ),
            )
            sums = ops.multiply(sums, scale)
        if list(indices) == list(range(self.square_norm_sums.shape[0])):
            return sums
        # One gather, not a constant-index slice per variable (each would
        # be a kernel of its own for XLA to compile).
        return ops.take(sums, list(indices))

    def maxima(self, index):
        """The cycle maximum of a variable overwritten with its gradient."""
        return self.gradient_sums[index]

    def mean_squares(self, indices, count, samples):
        """The mean square of the gradient samples per coordinate:
        `samples * S / count` (S summed over replicas), or `None`."""
        if not self.square_sums:
            return None
        if self.weighted:
            # S = sum w h**2: its weighted mean over the samples.
            scale = ops.divide(1.0, self.total_weight(count))
        else:
            scale = ops.divide(ops.cast(samples, "float32"), count)
        return [ops.multiply(self.square_sums[i], scale) for i in indices]

    def finish(self):
        """Ends the cycle: the count restarts (also keeping the update's
        reads loop-variant, so XLA cannot hoist them out of `run_if`)."""
        self.count.assign(ops.zeros((), "float32"))
        if self.weighted:
            self.weight.assign(ops.zeros((), "float32"))
