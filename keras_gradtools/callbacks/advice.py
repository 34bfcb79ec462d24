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
range; with fewer than 4, their full range) is the uncertainty it states,
and the confidence counts the measurements as well as their spread. Where
the signal was not resolved (the noise exceeded it at the measured batch), a
measurement is only a lower bound, and the advice says so instead of
guessing a value.

The advice never points beyond what the user has: an effective batch above
one epoch of data (K above the micro-batches per epoch) only repeats the
same samples, so full-batch accumulation is the most it proposes, and a K
above the optimizer's `max_accumulation_steps` is proposed only with a
sentence saying what it takes.
"""

import dataclasses
import math

import numpy as np

# Within this factor of B_simple, an effective batch counts as close.
CLOSE_FACTOR = 2.0
# Confidence: (at least this many measurements, within this factor).
HIGH_CONFIDENCE = (5, 2.0)
MODERATE_CONFIDENCE = (3, 4.0)


@dataclasses.dataclass(frozen=True)
class BatchSizeAdvice:
    """What the measurements say about the effective batch size.

    Attributes:
        text: One paragraph for the user.
        noise_scale: The median B_simple (samples) of the measurements used,
            or their largest lower bound when the signal was not resolved.
        low: The lower quartile of those measurements (samples); their
            smallest with fewer than 4.
        high: The upper quartile (their largest with fewer than 4).
        lower_bound_only: Whether the signal was mostly not resolved, so
            `noise_scale` is a lower bound.
        recommended_effective_batch: The effective batch the advice points
            to (samples), at most one epoch of data when that is known, or
            `None` when only a lower bound is known.
        recommended_accumulation_steps: K for that batch at the current
            micro-batch size, or `None`.
        confidence: `"high"`, `"moderate"` or `"low"`.
        measurements: How many measurements the advice is based on.
        limited_by_data: Whether B_simple exceeds one epoch of data, so the
            recommendation is full-batch accumulation rather than B_simple.
        above_max_accumulation_steps: Whether the recommended K exceeds the
            optimizer's `max_accumulation_steps` (the text says so).
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
    limited_by_data: bool = False
    above_max_accumulation_steps: bool = False


def _plural(count: int, noun: str) -> str:
    if count == 1:
        return f"1 {noun}"
    return f"{count} {noun}" + ("es" if noun.endswith("ch") else "s")


def _confidence(count: int, spread: float) -> tuple[str, str]:
    """The confidence, and (unless high) why it is not higher."""
    if count >= HIGH_CONFIDENCE[0] and spread <= HIGH_CONFIDENCE[1]:
        return "high", ""
    if count >= MODERATE_CONFIDENCE[0] and spread <= MODERATE_CONFIDENCE[1]:
        name = "moderate"
    else:
        name = "low"
    reasons = []
    if count < HIGH_CONFIDENCE[0]:
        reasons.append(
            f"only {_plural(count, 'measurement')}; train longer or measure "
            "more often with update_freq=N batches"
        )
    if spread > HIGH_CONFIDENCE[1]:
        reasons.append(
            "the measurements spread over a factor "
            + ("> 1000" if spread > 1000 else f"{spread:.1f}")
        )
    return name, "; ".join(reasons)


def _limits(
    steps,
    accumulation_steps,
    micro_batch,
    steps_per_epoch,
    max_accumulation_steps,
):
    """Caps `steps` at one epoch of data. Returns `(steps, limited by the
    data, sentence about max_accumulation_steps or "")`."""
    limited = steps_per_epoch is not None and steps > steps_per_epoch
    if limited:
        steps = steps_per_epoch
    note = ""
    if (
        max_accumulation_steps is not None
        and steps > max_accumulation_steps
        and steps != accumulation_steps
    ):
        note = (
            f" (accumulation_steps = {steps} is above this optimizer's "
            f"max_accumulation_steps = {max_accumulation_steps}: create it "
            f"with max_accumulation_steps={steps}.)"
        )
    return steps, limited, note


def batch_size_advice(
    noise_scales,
    resolved,
    micro_batch: int,
    accumulation_steps: int,
    steps_per_epoch: int | None = None,
    max_accumulation_steps: int | None = None,
) -> BatchSizeAdvice | None:
    """Compares measured noise scales with the effective batch.

    Args:
        noise_scales: B_simple of each measurement in samples, in order
            (lower bounds where not `resolved`; 0 where no gradient noise
            was measured).
        resolved: Whether each measurement resolved the signal.
        micro_batch: M, samples per micro-batch (global).
        accumulation_steps: K.
        steps_per_epoch: Optional int, micro-batches per epoch of training
            data (`fit`'s steps per epoch). With it, the advice proposes no
            effective batch above `steps_per_epoch * micro_batch` samples,
            about one epoch of data (the last batch may be smaller).
        max_accumulation_steps: Optional int, the optimizer's
            `max_accumulation_steps`. A K above it is proposed only with a
            sentence saying so.

    Returns:
        A `BatchSizeAdvice`, or `None` without measurements.

    Example:

    >>> advice = batch_size_advice([900.0] * 6, [True] * 6, 32, 8, 45)
    >>> advice.recommended_accumulation_steps
    28
    """
    pairs = [
        (float(b), bool(r))
        for b, r in zip(noise_scales, resolved)
        if math.isfinite(float(b)) and float(b) >= 0
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
    epoch = (
        f"~{steps_per_epoch * micro_batch} training samples per epoch "
        f"({_plural(steps_per_epoch, 'batch')} of {micro_batch})"
        if steps_per_epoch is not None
        else None
    )
    values = np.array([b for b, r in recent if r])
    if len(values) * 2 < len(recent):
        return _lower_bound_advice(
            recent,
            basis,
            accumulation_steps,
            micro_batch,
            steps_per_epoch,
            max_accumulation_steps,
            epoch,
        )
    count = len(values)
    median = float(np.median(values))
    if count >= 4:
        low, high = (float(q) for q in np.percentile(values, [25, 75]))
        spread_text = (
            f"middle half of {count} measurements: {low:.0f}-{high:.0f}"
        )
    else:
        low, high = float(values.min()), float(values.max())
        spread_text = (
            f"{count} measurements: {low:.0f}-{high:.0f}"
            if count > 1 and f"{low:.0f}" != f"{high:.0f}"
            else f"{_plural(count, 'measurement')}"
        )
    if median == 0:
        spread = 1.0 if high == 0 else math.inf
    else:
        spread = high / max(low, 1e-30)
    confidence, why = _confidence(count, spread)
    start_text = f"; {start:.0f} at the start" if len(pairs) > 1 else ""
    history = (
        f"Gradient noise scale B_simple ~ {median:.0f} samples over the "
        f"second half of training ({spread_text}{start_text})."
    )
    limited, note = False, ""
    if median == 0:
        steps = 1
        verdict = (
            "No gradient noise was measured (the micro-batches' gradients "
            "agreed to float32 precision): accumulation averages nothing "
            "out here, so accumulation_steps = 1 is enough."
        )
    else:
        steps = max(1, round(median / micro_batch))
        ratio = effective / median
        if ratio < 1 / CLOSE_FACTOR:
            steps, limited, note = _limits(
                steps,
                accumulation_steps,
                micro_batch,
                steps_per_epoch,
                max_accumulation_steps,
            )
            if limited and steps <= accumulation_steps:
                verdict = (
                    f"It exceeds your {epoch}, and your {basis} already "
                    "covers a full epoch: a larger batch would only repeat "
                    "samples."
                )
            elif limited:
                verdict = (
                    f"Your {basis} is far below it, but B_simple exceeds "
                    f"your {epoch}: full-batch accumulation "
                    f"(accumulation_steps = {steps}, one update per epoch) "
                    "is the most that helps, training with fewer updates at "
                    "little extra cost in samples."
                )
            else:
                verdict = (
                    f"Your {basis} is far below it: larger effective "
                    f"batches, ~{steps * micro_batch} samples "
                    f"(accumulation_steps = {steps}), would train with "
                    "fewer updates at little extra cost in samples."
                )
        elif ratio > CLOSE_FACTOR:
            verdict = (
                f"Your {basis} is well above it: ~{steps * micro_batch} "
                f"samples (accumulation_steps = {steps}"
                + (
                    ", or a smaller micro-batch"
                    if steps == 1 and micro_batch > median
                    else ""
                )
                + ") would use samples more efficiently."
            )
        else:
            steps = accumulation_steps
            verdict = (
                f"Your {basis} is within a factor of {CLOSE_FACTOR:.0f} of "
                "it: a good trade-off between updates and samples."
            )
    reason = f" ({why})" if why else ""
    text = f"{history} {verdict}{note} Confidence: {confidence}{reason}."
    return BatchSizeAdvice(
        text,
        median,
        low,
        high,
        False,
        steps * micro_batch,
        steps,
        confidence,
        count,
        limited,
        bool(note),
    )


def _lower_bound_advice(
    recent,
    basis,
    accumulation_steps,
    micro_batch,
    steps_per_epoch,
    max_accumulation_steps,
    epoch,
):
    bound = max(b for b, _ in recent)
    text = (
        "The gradient signal was not resolved above the noise in most "
        "measurements of the second half of training, so only a lower "
        f"bound is known: B_simple > {bound:.0f} samples at an {basis}."
    )
    steps, limited, note = _limits(
        2 * accumulation_steps,
        accumulation_steps,
        micro_batch,
        steps_per_epoch,
        max_accumulation_steps,
    )
    if steps <= accumulation_steps:
        text += (
            f" Your {basis} already covers your {epoch}: the noise is "
            "larger than one epoch of data averages out."
        )
        note = ""
    else:
        text += (
            f" Larger effective batches (e.g. accumulation_steps = {steps}"
            + (", a full epoch" if limited else "")
            + ") would average the noise out and measure it."
        )
    text += note + " Confidence: low (a lower bound only)."
    return BatchSizeAdvice(
        text,
        bound,
        bound,
        bound,
        True,
        None,
        None,
        "low",
        len(recent),
        limited,
        bool(note),
    )
