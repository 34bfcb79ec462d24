"""Batch-size advice from measured gradient noise scales.

McCandlish et al. (2018): the noise scale B_simple estimates the critical
batch size. An effective batch far below it spends many updates on noise;
far above it, many samples for little progress. The advice compares it with
the effective batch, K micro-batches of M samples (the global batch under
distribution), always in samples, so that runs of one problem with
different K are judged against the same quantity.

B_simple grows as the loss falls, so the advice uses the measurements of
the second half of training (what matters for continuing or re-running)
and reports their spread: the middle half of the measurements (interquartile
range) is the uncertainty it states. Where the signal was not resolved
(the noise exceeded it at the measured batch), a measurement is only a lower
bound, and the advice says so instead of guessing a value.
"""

import dataclasses
import math

import numpy as np

# Within this factor of B_simple, an effective batch counts as close.
CLOSE_FACTOR = 2.0


@dataclasses.dataclass(frozen=True)
class BatchSizeAdvice:
    """What the measurements say about the effective batch size.

    Attributes:
        text: One paragraph for the user.
        noise_scale: The median B_simple (samples) of the measurements used,
            or their largest lower bound when the signal was not resolved.
        low, high: The interquartile range of those measurements (samples).
        lower_bound_only: Whether the signal was mostly not resolved, so
            `noise_scale` is a lower bound.
        recommended_effective_batch: The effective batch the advice points
            to (samples), or `None` when only a lower bound is known.
        recommended_accumulation_steps: K for that batch at the current
            micro-batch size, or `None`.
        confidence: `"high"`, `"moderate"` or `"low"`.
        measurements: How many measurements the advice is based on.
    """

    text: str
    noise_scale: float
    low: float
    high: float
    lower_bound_only: bool
    recommended_effective_batch: int | None
    recommended_accumulation_steps: int | None
    confidence: str
    measurements: int


def batch_size_advice(noise_scales, resolved, micro_batch, accumulation_steps):
    """Compares measured noise scales with the effective batch.

    Args:
        noise_scales: B_simple of each measurement in samples, in order
            (lower bounds where not `resolved`).
        resolved: Whether each measurement resolved the signal.
        micro_batch: M, samples per micro-batch (global).
        accumulation_steps: K.

    Returns:
        A `BatchSizeAdvice`, or `None` without measurements.
    """
    pairs = [
        (float(b), bool(r))
        for b, r in zip(noise_scales, resolved)
        if math.isfinite(float(b)) and float(b) > 0
    ]
    if not pairs:
        return None
    start = pairs[0][0]
    recent = pairs[len(pairs) // 2 :]
    effective = micro_batch * accumulation_steps
    basis = f"effective batch {effective}" + (
        f" ({accumulation_steps} x {micro_batch})"
        if accumulation_steps > 1
        else ""
    )
    values = np.array([b for b, r in recent if r])
    if len(values) * 2 < len(recent):
        bound = max(b for b, _ in recent)
        text = (
            f"The gradient signal was not resolved above the noise in most "
            f"measurements of the second half of training, so only a lower "
            f"bound is known: B_simple > {bound:.0f} samples at an "
            f"{basis}. Larger effective batches (e.g. accumulation_steps = "
            f"{2 * accumulation_steps}) would average the noise out and "
            "measure it."
        )
        return BatchSizeAdvice(
            text, bound, bound, bound, True, None, None, "low", len(recent)
        )
    median = float(np.median(values))
    low, high = (float(q) for q in np.percentile(values, [25, 75]))
    spread = high / max(low, 1e-30)
    if len(values) >= 5 and spread <= 2:
        confidence = "high"
    elif spread <= 4:
        confidence = "moderate"
    else:
        confidence = "low"
    steps = max(1, round(median / micro_batch))
    history = (
        f"Gradient noise scale B_simple ~ {median:.0f} samples over the "
        f"second half of training (middle half of {len(values)} "
        f"measurements: {low:.0f}-{high:.0f}; {start:.0f} at the start)."
    )
    ratio = effective / median
    if ratio < 1 / CLOSE_FACTOR:
        verdict = (
            f"Your {basis} is far below it: larger effective batches, "
            f"~{steps * micro_batch} samples (accumulation_steps = {steps}), "
            "would train with fewer updates at little extra cost in samples."
        )
    elif ratio > CLOSE_FACTOR:
        verdict = (
            f"Your {basis} is well above it: ~{steps * micro_batch} samples "
            f"(accumulation_steps = {steps}"
            + (
                ", or a smaller micro-batch"
                if steps == 1 and micro_batch > median
                else ""
            )
            + ") would use samples more efficiently."
        )
    else:
        verdict = (
            f"Your {basis} is within a factor of {CLOSE_FACTOR:.0f} of it: a "
            "good trade-off between updates and samples."
        )
    text = f"{history} {verdict} Confidence: {confidence}."
    return BatchSizeAdvice(
        text,
        median,
        low,
        high,
        False,
        steps * micro_batch,
        steps,
        confidence,
        len(values),
    )
