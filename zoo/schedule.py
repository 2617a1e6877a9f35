"""Learning-rate schedules of a DP-SGD run: the factor applied to the recipe's ``lr`` at each step.

A schedule is a function of the step number and the run's planned steps only, both public, so it costs no
privacy and a resumed run continues it exactly. ``constant`` (the recipe default) keeps ``lr``; ``cosine`` decays
it to 0 over the planned steps, as ``torch.optim.lr_scheduler.CosineAnnealingLR`` with ``T_max = steps`` and timm's
``CosineLRScheduler`` without warm-up or restarts: ``lr * (1 + cos(pi * t / steps)) / 2`` at step ``t = 0 ..
steps - 1``.
"""
from __future__ import annotations

import math

LR_SCHEDULES = ("constant", "cosine")
"""The values of a recipe's ``lr_schedule`` (``None`` in a card means ``constant``)."""


def lr_factor(schedule: str | None, step: int, steps: int) -> float:
    """The factor of the recipe's lr at ``step`` (0-based) of a run of ``steps`` planned steps."""
    if schedule in (None, "constant"):
        return 1.0
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(step, steps) / max(steps, 1)))
    raise ValueError(f"unknown lr_schedule {schedule!r}; use one of {', '.join(LR_SCHEDULES)}")
