"""Scalar schedules for training knobs that are not the learning rate: the Gumbel-softmax temperature and the
weight (alpha) of the LM fluency loss. The learning rate itself uses transformers' schedulers.

A `Schedule` goes from `start` to `end` over `steps` optimizer steps after `warmup_steps` steps held at `start`
(then stays at `end`): "constant" (always `start`), "linear", "cosine" (half cosine), "exponential" (geometric
interpolation; both ends must be > 0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

KINDS = ("constant", "linear", "cosine", "exponential")


@dataclass
class Schedule:
    kind: str = "constant"
    start: float = 1.0
    end: float = 1.0
    steps: int = 1000
    warmup_steps: int = 0

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"schedule kind must be one of {KINDS}, got {self.kind!r}.")
        if self.steps < 1 or self.warmup_steps < 0:
            raise ValueError(
                f"schedule needs steps >= 1 and warmup_steps >= 0, got {self.steps}, {self.warmup_steps}."
            )
        if self.kind == "exponential" and (self.start <= 0 or self.end <= 0):
            raise ValueError(
                f"an exponential schedule needs start and end > 0, got {self.start}, {self.end}."
            )

    def __call__(self, step: int) -> float:
        if self.kind == "constant":
            return self.start
        progress = min(1.0, max(0.0, (step - self.warmup_steps) / self.steps))
        if self.kind == "linear":
            return self.start + (self.end - self.start) * progress
        if self.kind == "cosine":
            return self.end + (self.start - self.end) * 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.start * (self.end / self.start) ** progress
