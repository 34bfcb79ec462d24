"""Argument documentation shared by every optimizer's docstring."""

pipeline_keyword_args = """accumulation_steps: Int >= 1, defaults to 1. The
            number of micro-batches (calls to `apply`) per update. The
            weights move only on every `accumulation_steps`-th call, by the
            mean gradient of the cycle. At most 2**31 - 1.
        gradient_accumulation_steps: Keras's name for
            `accumulation_steps`, accepted as an alias (pass one of them).
        max_accumulation_steps: Int in [accumulation_steps, 2**31 - 1],
            defaults to `accumulation_steps`. The largest K the optimizer
            will take: K is state (`optimizer.accumulation_steps`, set by
            `BatchSizeSchedule`, `Seesaw` and `AdaptiveAccumulation`) and
            may change during training up to it without retracing. The
            gradient sums exist from `build` when it is above 1.
        noise_eta: Float >= 0, defaults to 0 (no noise). Variance `eta` of
            the Gaussian noise added to the mean gradient at the first
            update; update `t` (counting from 0) uses
            `sigma_t**2 = eta / (1 + t)**gamma` (Neelakantan et al., 2015).
        noise_gamma: Float >= 0, defaults to 0.55. The annealing exponent.
        noise_seed: Int in [0, 2**31 - 1] or `None`. Seed of the stateless
            noise stream; `None` draws one from Python's `random` module
            (seeded by `keras.utils.set_random_seed`).
        clip_micro_batches: Boolean, defaults to `False`. If `True`, the
            clipping set by `clipnorm`, `clipvalue` or `global_clipnorm` is
            applied to each micro-batch gradient before it is accumulated
            instead of to the mean gradient at update time.
        sync_micro_batches: Boolean, defaults to `False`. Under a
            `tf.distribute` strategy, sum each micro-batch's gradient over
            the replicas before accumulating it (K all-reduces per update
            instead of 1), so that Adam's "micro" second moment and the
            gradient statistics equal one device's exactly. By default each
            replica accumulates its own gradients, and the update reads
            their sums across replicas once. On JAX the gradients are
            global already and this has no effect.
        weighted_accumulation: Boolean, defaults to `False`. If `True`,
            each micro-batch weighs in the update by its count, what its
            loss was averaged over (valid tokens under a mask, samples, or
            the sum of sample weights), passed as `apply(..., count=n)` or,
            in `model.fit`, by `keras_gradtools.exact_accumulation(model)`
            (which sets this): K micro-batches of unequal counts then give
            the update of one big batch, where equal weights (Keras's
            accumulation) give a mean of means. The gradient statistics
            stay in micro-batches of the mean count.
        on_nonfinite: `"skip"` (default), `"raise"` or `"apply"`. With
            `"skip"`, a micro-batch whose gradient holds a NaN or an
            infinity is left out of the accumulators (and counted in
            `skipped_micro_batches`); an update whose micro-batches were all
            non-finite is skipped. `"raise"` raises before anything is
            written (a `FloatingPointError` naming the micro-batch and the
            variables when `apply` runs eagerly; a failed assertion in a
            graph; not possible inside an XLA-compiled step, which is
            refused when traced). `"apply"` is Keras's behaviour.
        track_gradient_statistics: Boolean, defaults to `False`. If `True`,
            measure `gradient_statistics()` inside every update (a few
            scalar reductions over the mean gradient) and keep the sum of
            squared gradients where the update rule does not already need
            it, so that the variance and noise scale can be reported.
            `GradientVarianceMonitor` switches this on.
        jit_compile: Boolean, defaults to `True`. When `apply` is called
            eagerly, run the whole update as one XLA-compiled function.
            Inside a `tf.function` or `model.fit` the update is traced into
            the caller's graph (and its XLA cluster, if it has one).
        name: Optional string, the optimizer's name (Keras's automatic
            naming when `None`: `adam`, `adam_1`, ...)."""
