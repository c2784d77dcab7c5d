"""Temperature / alpha schedules produce the configured values."""

import math

import pytest

from hfx.lens.schedules import Schedule


def test_schedules_hit_their_configured_values():
    linear = Schedule("linear", start=0.0, end=1.0, steps=100, warmup_steps=10)
    assert [linear(s) for s in (0, 10, 60, 110, 500)] == [0.0, 0.0, 0.5, 1.0, 1.0]
    cosine = Schedule("cosine", start=2.0, end=0.5, steps=10)
    assert cosine(0) == 2.0 and cosine(10) == 0.5 and math.isclose(cosine(5), 1.25)
    exponential = Schedule("exponential", start=1.0, end=0.01, steps=4)
    assert [round(exponential(s), 6) for s in (0, 2, 4, 8)] == [1.0, 0.1, 0.01, 0.01]
    assert Schedule("constant", start=0.3)(1234) == 0.3


def test_bad_schedules_are_rejected():
    with pytest.raises(ValueError, match="kind must be one of"):
        Schedule("step")
    with pytest.raises(ValueError, match="exponential schedule needs start and end > 0"):
        Schedule("exponential", start=0.0, end=1.0)
    with pytest.raises(ValueError, match="steps >= 1"):
        Schedule("linear", steps=0)
