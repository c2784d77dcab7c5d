"""Intervals for figures computed from a few hundred questions: how far a score could move by chance.

* :func:`wilson_interval`: the 95% Wilson score interval of an accuracy (``scipy.stats.binomtest``), which stays
  inside [0, 1] and is honest at 0 or n correct, where the normal approximation is not.
* :func:`gap_share`: the share of the gap between a lower and an upper condition that a third one closes (a
  cartridge between no context and the document in context, ICL), with a percentile bootstrap interval over
  questions (``scipy.stats.bootstrap``, paired: a resample draws whole questions, with every condition's answer to
  each), seeded so that the same scores give the same interval.
* :func:`paired_difference`: the difference of two conditions' accuracies on the same questions, with the same paired
  bootstrap interval (tighter than two separate intervals: each question's difficulty cancels).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

#: Resamples of a bootstrap interval: enough that a rerun with another seed moves its ends by well under a point.
BOOTSTRAP_RESAMPLES = 10_000


@dataclass(frozen=True)
class Interval:
    low: float
    high: float
    confidence: float = 0.95

    def to_dict(self) -> dict:
        return asdict(self)


def wilson_interval(correct: int, total: int, confidence: float = 0.95) -> Interval:
    """The Wilson score interval of ``correct`` successes in ``total`` trials."""
    from scipy.stats import binomtest

    if total < 1 or not 0 <= correct <= total:
        raise ValueError(f"need 0 <= correct <= total and total >= 1, got correct={correct}, total={total}.")
    ci = binomtest(int(correct), int(total)).proportion_ci(confidence_level=confidence, method="wilson")
    return Interval(float(ci.low), float(ci.high), confidence)


@dataclass(frozen=True)
class GapShare:
    """``(middle - lower) / (upper - lower)`` of per-question scores, with its bootstrap interval (None where the
    gap is not positive, in the data or in too many resamples for an interval to mean anything)."""

    share: float | None
    interval: Interval | None
    questions: int

    def to_dict(self) -> dict:
        return {
            "share": self.share,
            "interval": self.interval.to_dict() if self.interval is not None else None,
            "questions": self.questions,
        }


def gap_share(
    lower: Sequence[float],
    upper: Sequence[float],
    middle: Sequence[float],
    confidence: float = 0.95,
    n_resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
) -> GapShare:
    """The share of the lower -> upper gap that ``middle`` closes, from per-question scores (1/0 for correct, or
    any per-question number), and its paired percentile bootstrap interval over questions."""
    scores = [np.asarray(x, dtype=float) for x in (lower, upper, middle)]
    n = len(scores[0])
    if n < 2 or any(len(x) != n for x in scores):
        raise ValueError(
            f"need the same number (>= 2) of per-question scores, got {[len(x) for x in scores]}."
        )

    def share(low, up, mid, axis=-1):
        gap = np.mean(up, axis=axis) - np.mean(low, axis=axis)
        closed = np.mean(mid, axis=axis) - np.mean(low, axis=axis)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(gap > 0, closed / np.where(gap > 0, gap, 1.0), np.nan)

    point = float(share(*scores))
    if not np.isfinite(point):
        return GapShare(None, None, n)
    low, high = _paired_bootstrap(scores, share, confidence, n_resamples, seed)
    interval = Interval(low, high, confidence) if np.isfinite(low) and np.isfinite(high) else None
    return GapShare(point, interval, n)


def paired_difference(
    first: Sequence[float],
    second: Sequence[float],
    confidence: float = 0.95,
    n_resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
) -> tuple[float, Interval]:
    """``mean(first) - mean(second)`` over the same questions (per-question 1/0 or any number), and its paired
    percentile bootstrap interval (``scipy.stats.bootstrap``, seeded)."""
    a, b = np.asarray(first, dtype=float), np.asarray(second, dtype=float)
    if len(a) < 2 or len(a) != len(b):
        raise ValueError(f"need the same number (>= 2) of per-question scores, got {len(a)} and {len(b)}.")
    low, high = _paired_bootstrap(
        (a, b),
        lambda x, y, axis=-1: np.mean(x, axis=axis) - np.mean(y, axis=axis),
        confidence,
        n_resamples,
        seed,
    )
    interval = Interval(low, high, confidence)
    return float(a.mean() - b.mean()), interval


def _paired_bootstrap(
    samples, statistic, confidence: float, n_resamples: int, seed: int
) -> tuple[float, float]:
    """The percentile interval of ``statistic`` over ``samples`` resampled by whole questions (paired), seeded."""
    from scipy.stats import bootstrap

    result = bootstrap(
        samples,
        statistic,
        paired=True,
        vectorized=True,
        n_resamples=n_resamples,
        confidence_level=confidence,
        method="percentile",
        rng=np.random.default_rng(seed),
    )
    return float(result.confidence_interval.low), float(result.confidence_interval.high)
