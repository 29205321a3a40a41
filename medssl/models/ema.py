"""Exponential-moving-average teacher (BYOL / DINO style) and its momentum schedule."""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn


class EMATeacher(nn.Module):
    """A frozen copy of a student whose weights follow the student's by EMA.

    `teacher(x)` runs the copy without gradients. `update(student, m)` sets every parameter to
    `m * teacher + (1 - m) * student`; buffers (e.g. norm running statistics) are copied from the
    student. Being a submodule, its weights are saved with the model's state dict (for --resume).
    """

    def __init__(self, student: nn.Module) -> None:
        super().__init__()
        self.module = copy.deepcopy(student)
        self.module.requires_grad_(False)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with torch.no_grad():
            return self.module(*args, **kwargs)

    @torch.no_grad()
    def update(self, student: nn.Module, momentum: float) -> None:
        """EMA step towards `student` (the same architecture, e.g. the module this was copied from)."""
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum {momentum} is outside [0, 1]")
        for own, new in zip(self.module.parameters(), student.parameters(), strict=True):
            own.lerp_(new.detach(), 1.0 - momentum)
        for own, new in zip(self.module.buffers(), student.buffers(), strict=True):
            own.copy_(new)


def ema_momentum(step: int, total: int, base: float = 0.996) -> float:
    """Cosine schedule from `base` at step 0 to 1 at step `total` (held at 1 afterwards)."""
    if total <= 0:
        raise ValueError(f"total steps {total} must be positive")
    progress = min(max(step, 0), total) / total
    return 1.0 - (1.0 - base) * (math.cos(math.pi * progress) + 1.0) / 2.0
