"""Intervals of accuracies and of the share of a gap, against known values and their defining properties."""

from __future__ import annotations

import math

import numpy as np
import pytest

from hfx.statistics import gap_share, wilson_interval


def closed_form_wilson(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    p = k / n
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return center - half, center + half


@pytest.mark.parametrize("k,n", [(0, 10), (10, 10), (81, 263), (18, 36), (29, 36), (63, 100)])
def test_wilson_matches_the_closed_form_and_known_values(k, n):
    interval = wilson_interval(k, n)
    low, high = closed_form_wilson(k, n)
    assert interval.low == pytest.approx(max(low, 0.0), abs=1e-9)
    assert interval.high == pytest.approx(min(high, 1.0), abs=1e-9)
    assert interval.low <= k / n <= interval.high and interval.confidence == 0.95


def test_wilson_published_values():
    # none of 10: [0, 0.278]; the textbook example 81 of 263: [0.255, 0.366]
    assert wilson_interval(0, 10).high == pytest.approx(0.2775, abs=1e-4)
    interval = wilson_interval(81, 263)
    assert (round(interval.low, 3), round(interval.high, 3)) == (0.255, 0.366)
    assert wilson_interval(50, 100, confidence=0.99).high > wilson_interval(50, 100).high
    with pytest.raises(ValueError, match="correct=11, total=10"):
        wilson_interval(11, 10)


def test_gap_share_point_and_interval():
    rng = np.random.default_rng(0)
    n = 120
    lower = (rng.random(n) < 0.3).astype(int)
    upper = np.maximum(lower, rng.random(n) < 0.7).astype(int)
    # the middle condition answers what upper answers on a random 70% of the questions lower gets wrong
    middle = np.where(rng.random(n) < 0.7, upper, lower)
    result = gap_share(lower, upper, middle)
    expected = (middle.mean() - lower.mean()) / (upper.mean() - lower.mean())
    assert result.share == pytest.approx(expected) and result.questions == n
    assert result.interval.low < result.share < result.interval.high
    assert 0.1 < result.interval.high - result.interval.low < 0.5
    assert gap_share(lower, upper, middle) == result  # seeded: the same scores, the same interval
    # four times the questions: about half as wide
    wide = result.interval.high - result.interval.low
    many = gap_share(np.tile(lower, 4), np.tile(upper, 4), np.tile(middle, 4))
    assert 0.35 * wide < many.interval.high - many.interval.low < 0.7 * wide

    # the ends of the scale: closing all of the gap or none of it, on every resample
    assert gap_share(lower, upper, upper).interval.to_dict() == {"low": 1.0, "high": 1.0, "confidence": 0.95}
    assert gap_share(lower, upper, lower).share == 0.0


def test_no_gap_no_share():
    assert gap_share([1, 0, 1], [1, 0, 1], [1, 1, 1]).share is None  # upper no better than lower
    assert gap_share([1, 1, 0], [0, 1, 0], [1, 1, 1]).to_dict() == {
        "share": None,
        "interval": None,
        "questions": 3,
    }
    with pytest.raises(ValueError, match=r"\[3, 3, 2\]"):
        gap_share([1, 0, 1], [1, 1, 1], [1, 0])


def test_paired_difference_is_tighter_than_the_separate_intervals_and_centred_on_the_difference():
    from hfx.statistics import paired_difference

    rng = np.random.default_rng(1)
    hard = rng.random(400) < 0.5  # questions both conditions find hard
    first = (~hard) | (rng.random(400) < 0.15)
    second = (~hard) & (rng.random(400) < 0.9)
    diff, interval = paired_difference(first, second)
    assert diff == pytest.approx(first.mean() - second.mean())
    assert interval.low < diff < interval.high and interval.low > 0  # first is better, and it shows
    a, b = wilson_interval(int(first.sum()), 400), wilson_interval(int(second.sum()), 400)
    assert interval.high - interval.low < (a.high - a.low + b.high - b.low) / 2
    assert paired_difference(first, second) == (diff, interval)  # seeded
    with pytest.raises(ValueError, match="same number"):
        paired_difference(first, second[:-1])
