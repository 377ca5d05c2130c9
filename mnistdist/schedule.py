"""Learning-rate schedule as a pure function of the global step.

Being a function of the step alone, the schedule needs no state of its own: restoring the
step restores the schedule exactly.

``DeviceSchedule`` holds the same schedule on the training device, for a step that must not
wait for the host (a CUDA graph that reads its own learning rate): a table of ``lr_at`` values,
read at a step counter kept on the device, bitwise equal to ``lr_at``.
"""

from __future__ import annotations

import math

import torch


def lr_at(step: int, total_steps: int, base_lr: float, kind: str, warmup_steps: int = 0) -> float:
    """Learning rate for optimizer step ``step`` (0-based) of ``total_steps``.

    ``constant``: ``base_lr``. ``cosine``: linear warm-up over ``warmup_steps`` (from
    base_lr/warmup_steps up to base_lr), then half a cosine from base_lr down to 0 at
    ``total_steps``.
    """
    if kind == "constant":
        return base_lr
    if kind != "cosine":
        raise ValueError(f"unknown lr schedule {kind!r}")
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_table(total_steps: int, base_lr: float, kind: str, warmup_steps: int = 0,
             device: torch.device | str = "cpu") -> torch.Tensor:
    """``lr_at(s, ...)`` for s = 0 .. total_steps - 1 as a float64 tensor on ``device``.

    A table of the host's values rather than the formula in tensor ops: ``torch.cos`` and the C
    library's ``cos`` (which ``math.cos`` calls) differ in the last bit for a few arguments
    (measured on CPU in float64: 44 of 100,000 cosine steps, 8 of 12,345), so a tensor formula
    would not be bitwise ``lr_at``. 8 bytes a step (3,000 steps for the default 10 epochs).
    """
    values = [lr_at(s, total_steps, base_lr, kind, warmup_steps) for s in range(total_steps)]
    return torch.tensor(values, dtype=torch.float64, device=device)


class DeviceSchedule:
    """The learning-rate schedule on the device: ``lr_into(buffer)`` writes the rate of the
    current step, ``advance()`` moves to the next step; neither reads anything back to the host,
    so both can be captured in a CUDA graph. Bitwise equal to ``lr_at`` (in float64), and to
    ``buffer.fill_(lr_at(...))`` in the buffer's dtype (the same round-to-nearest conversion).
    """

    def __init__(self, total_steps: int, base_lr: float, kind: str, warmup_steps: int = 0,
                 device: torch.device | str = "cpu", step: int = 0) -> None:
        if not 0 <= step <= total_steps:
            raise ValueError(f"step {step} outside the schedule's 0..{total_steps}")
        self.total_steps = total_steps
        self.table = lr_table(total_steps, base_lr, kind, warmup_steps, device)
        self.step = torch.tensor([step], dtype=torch.long, device=device)
        """The 0-based step whose rate ``lr_into`` writes (a 1-element device tensor)."""

    def lr_into(self, buffer: torch.Tensor) -> torch.Tensor:
        """Write the current step's rate into the 0-d tensor ``buffer``; return it. The step must
        be below ``total_steps`` (a step past the end has no rate; training never takes one)."""
        return buffer.copy_(self.table.index_select(0, self.step).reshape(()))

    def advance(self) -> None:
        self.step.add_(1)

    def set_step(self, step: int) -> None:
        """Jump to ``step`` (a resumed run): a host write, outside any graph."""
        self.step.fill_(step)
