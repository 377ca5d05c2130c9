"""Learning-rate schedule as a pure function of the global step: restoring the step restores
the schedule exactly."""

from __future__ import annotations

import math


def lr_at(step: int, total_steps: int, base_lr: float, kind: str, warmup_steps: int = 0) -> float:
    """Learning rate for optimizer step ``step`` (0-based) of ``total_steps``: ``constant``
    ``base_lr``, or ``cosine``: a linear warm-up over ``warmup_steps`` (base_lr/warmup_steps up
    to base_lr), then half a cosine from base_lr down to 0 at ``total_steps``."""
    if kind == "constant":
        return base_lr
    if kind != "cosine":
        raise ValueError(f"unknown lr schedule {kind!r}")
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))
