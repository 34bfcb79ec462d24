"""Every public argument is documented in its docstring's `Args:`
(issue: `max_accumulation_steps` and `sync_micro_batches` had none)."""

import inspect

import pytest

import keras_gradtools as kg

PUBLIC = [
    kg.SGD,
    kg.Adam,
    kg.AdamW,
    kg.GradientPipelineWrapper,
    kg.GradientVarianceMonitor,
    kg.AdaptiveAccumulation,
    kg.BatchSizeSchedule,
    kg.Seesaw,
]
# Documented once, on the base class's shared block, for every optimizer.
INHERITED = {"kwargs", "self"}


@pytest.mark.parametrize("public", PUBLIC, ids=lambda c: c.__name__)
def test_every_argument_has_an_entry_in_args(public):
    doc = inspect.getdoc(public) or ""
    assert "Args:" in doc
    names = [
        n
        for n in inspect.signature(public.__init__).parameters
        if n not in INHERITED
    ]
    missing = [
        n
        for n in names
        if f"{n}:" not in doc
        and f"{n}," not in doc  # "beta_1, beta_2, ...: As for Adam"
    ]
    assert not missing, f"{public.__name__} documents no {missing}"
