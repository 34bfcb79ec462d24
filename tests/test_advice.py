"""The batch-size advice as text and numbers: it respects the training set
and the optimizer's max_accumulation_steps, its confidence counts the
measurements, its grammar holds; and the monitor hands it what fit knows."""

import pytest

import keras_gradtools as kg
from keras_gradtools.callbacks.advice import batch_size_advice

# The demo's K = 8 run, as the README quotes it: B_simple ~ 2172 samples,
# micro-batches of 32, 1437 training samples (45 batches per epoch).
DEMO_SCALES = [70.0] + [1286.0, 2172.0, 4566.0, 2172.0] * 3
DEMO = dict(micro_batch=32, accumulation_steps=8, steps_per_epoch=45)


def test_advice_never_proposes_more_than_one_epoch_of_data():
    advice = batch_size_advice(DEMO_SCALES, [True] * 13, **DEMO)
    assert advice.noise_scale > 45 * 32  # B_simple exceeds the data
    assert advice.limited_by_data
    assert advice.recommended_accumulation_steps == 45
    assert advice.recommended_effective_batch == 45 * 32
    assert "full-batch accumulation (accumulation_steps = 45" in advice.text
    assert "~1440 training samples per epoch (45 batches of 32)" in advice.text
    # Without the data's size, it would have asked for 68 micro-batches.
    unlimited = batch_size_advice(
        DEMO_SCALES, [True] * 13, micro_batch=32, accumulation_steps=8
    )
    assert unlimited.recommended_accumulation_steps == 68
    assert not unlimited.limited_by_data


def test_a_k_above_max_accumulation_steps_is_said():
    advice = batch_size_advice(
        DEMO_SCALES, [True] * 13, max_accumulation_steps=8, **DEMO
    )
    assert advice.above_max_accumulation_steps
    assert "above this optimizer's max_accumulation_steps = 8" in advice.text
    assert "max_accumulation_steps=45" in advice.text
    roomy = batch_size_advice(
        DEMO_SCALES, [True] * 13, max_accumulation_steps=64, **DEMO
    )
    assert not roomy.above_max_accumulation_steps
    assert "max_accumulation_steps" not in roomy.text


def test_a_full_epoch_already_accumulated_is_not_told_to_grow():
    advice = batch_size_advice(
        [3000.0] * 6, [True] * 6, 32, 45, steps_per_epoch=45
    )
    assert advice.recommended_accumulation_steps == 45
    assert "already covers a full epoch" in advice.text


def test_a_lower_bound_is_capped_by_the_data_too():
    advice = batch_size_advice(
        [500.0] * 6, [False] * 6, 32, 32, steps_per_epoch=45
    )
    assert advice.lower_bound_only and advice.confidence == "low"
    assert "accumulation_steps = 45, a full epoch" in advice.text
    assert "accumulation_steps = 64" not in advice.text


@pytest.mark.parametrize(
    "scales, confidence",
    [
        ([85.0, 85.0], "low"),  # one measurement in the second half
        ([85.0] * 4, "low"),  # two
        ([85.0] * 6, "moderate"),  # three, identical: still not high
        ([85.0] * 10, "high"),  # five within a factor 2
        ([10.0, 100.0] * 5, "low"),  # five, spread over a factor 10
    ],
)
def test_confidence_counts_the_measurements(scales, confidence):
    advice = batch_size_advice(scales, [True] * len(scales), 32, 1)
    assert advice.confidence == confidence
    assert f"Confidence: {confidence}" in advice.text


def test_one_measurement_reads_right():
    advice = batch_size_advice([64.0, 85.0], [True, True], 32, 8)
    assert advice.measurements == 1
    assert "1 measurement;" in advice.text
    assert "1 measurements" not in advice.text
    assert "85-85" not in advice.text
    assert "only 1 measurement" in advice.text
    alone = batch_size_advice([85.0], [True], 32, 8)
    assert "at the start" not in alone.text  # the start is that one point
    four = batch_size_advice(
        [70.0] * 4 + [80.0, 90.0, 100.0, 110.0], [1] * 8, 32, 8
    )
    assert "middle half of 4 measurements" in four.text


def test_no_noise_recommends_no_accumulation():
    advice = batch_size_advice([0.0] * 6, [True] * 6, 32, 8)
    assert advice.recommended_accumulation_steps == 1
    assert "No gradient noise was measured" in advice.text


def test_the_monitor_passes_the_epoch_and_max_accumulation_steps():
    monitor = kg.GradientVarianceMonitor(verbose=0)
    monitor.set_params({"epochs": 30, "steps": 45, "verbose": 0})
    monitor._optimizer = kg.Adam(accumulation_steps=8)
    monitor.records = [
        {
            "grad_noise_scale": scale,
            "grad_signal_resolved": 1.0,
            "batch_size": 32,
            "accumulation_steps": 8,
        }
        for scale in DEMO_SCALES
    ]
    advice = monitor._advice()
    assert advice.recommended_accumulation_steps == 45
    assert "max_accumulation_steps = 8" in advice.text
