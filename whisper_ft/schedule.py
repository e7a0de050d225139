"""Learning rate as a pure function of the optimizer step.

Pure, so it holds no state to save, cannot drift between processes (DESIGN: scheduler stepped per process: a scheduler
stepped by every process shortens warmup by the number of GPUs) and is identical after a resume.
"""

from __future__ import annotations

import math


def lr_at(step: int, *, peak: float, warmup_steps: int, max_steps: int, kind: str = "linear") -> float:
    """LR for optimizer step `step` (0-based: the LR used by the step-th update)."""
    if warmup_steps > 0 and step < warmup_steps:
        return peak * step / warmup_steps  # as transformers' linear schedule: step 0 uses 0
    if kind == "constant_with_warmup":
        return peak
    decay_steps = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    if kind == "cosine":
        return peak * 0.5 * (1.0 + math.cos(math.pi * progress))
    return peak * (1.0 - progress)  # linear


def set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
