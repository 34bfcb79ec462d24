"""The small stages of the pipeline that are not the accumulator or the
statistics: the finite check, clipping and noise.

Each is a function of explicit inputs (and, for the noise, its own state:
the seed variable), in the manner of optax's transforms; the pipeline
(`pipeline.py`) calls them in its one order. Their maths is in
`keras_gradtools.transforms`.
"""

from keras import ops

from keras_gradtools import transforms
from keras_gradtools.transforms import sparse


def finite_check(grads, partial_sums=None):
    """Whether every entry of `grads` (dense or sparse) is finite, as one
    reduction over all of them (reading their squared norms when given:
    a NaN or inf in a tensor makes its sum of squares NaN or inf)."""
    return transforms.all_finite(
        [sparse.values_of(g) for g in grads], partial_sums=partial_sums
    )


def needs_norms(settings):
    """Whether the clipping of the mean gradient reads its squared norms."""
    return (
        transforms.needs_square_norms(
            settings.clipnorm, settings.global_clipnorm
        )
        and not settings.clip_micro_batches
    )


class Clip:
    """Clipping by value, per-tensor norm or global norm (Keras's
    `clipvalue`, `clipnorm`, `global_clipnorm`)."""

    def __init__(self, settings):
        self.settings = settings

    def __call__(self, grads, square_norms=None):
        """Returns `(clipped, factors)`: the clipped gradients and, per
        tensor, the factor it was scaled by (`None` where not scaled)."""
        settings = self.settings
        return transforms.clip_gradients(
            grads,
            clipvalue=settings.clipvalue,
            clipnorm=settings.clipnorm,
            global_clipnorm=settings.global_clipnorm,
            square_norms=square_norms,
        )


class Noise:
    """Annealed Gaussian gradient noise, sigma_t**2 = eta / (1 + t)**gamma
    (Neelakantan et al., 2015), drawn from a counter-based stream of
    (seed, update, variable): the same draw on every device and backend.

    Args:
        settings: The pipeline's settings (`noise_eta`, `noise_gamma`).
        seed: The int32 seed variable (state, saved with the optimizer).
        shapes: The model variables' shapes, in build order.
    """

    def __init__(self, settings, seed, shapes):
        self.settings = settings
        self.seed = seed
        self.shapes = shapes

    def std_at(self, step):
        """sigma_t at update `step`."""
        settings = self.settings
        return transforms.noise_std(
            settings.noise_eta, settings.noise_gamma, step
        )

    def __call__(self, grads, indices, step, sigma):
        """`grads` (of the variables `indices`) plus `sigma` times the draw
        of update `step`."""
        seed = ops.convert_to_tensor(self.seed)
        step = ops.convert_to_tensor(step)
        noise = transforms.gaussian_noise(
            self.shapes, seed, step, wanted=indices
        )
        return [
            ops.add(grad, ops.multiply(sigma, draw))
            for grad, draw in zip(grads, noise)
        ]
