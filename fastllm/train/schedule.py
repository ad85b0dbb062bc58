"""Learning-rate schedule: linear warm-up, then linear, cosine or constant decay to min_lr_ratio x peak.

Invariants: `lr_factor(step)` is a pure function; the scheduler's only state is the step count, so a resumed run
gets exactly the learning rates of an uninterrupted one.
"""
from __future__ import annotations

import math


def lr_factor(step: int, warmup: int, total: int, kind: str, min_ratio: float) -> float:
    """Multiplier of the peak LR for optimizer step `step` (0-based)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if kind == "constant" or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    decay = 1.0 - progress if kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_ratio + (1.0 - min_ratio) * decay


class WarmupDecay:
    def __init__(self, optimizer, peak_lr: float, warmup: int, total: int, kind: str = "linear",
                 min_ratio: float = 0.0):
        self.opt, self.peak, self.warmup, self.total = optimizer, peak_lr, warmup, total
        self.kind, self.min_ratio, self.step_count = kind, min_ratio, 0
        self._apply()

    @property
    def lr(self) -> float:
        return self.peak * lr_factor(self.step_count, self.warmup, self.total, self.kind, self.min_ratio)

    def _apply(self) -> None:
        for g in self.opt.param_groups:
            g["lr"] = self.lr

    def step(self) -> None:
        self.step_count += 1
        self._apply()

    def state_dict(self) -> dict:
        return {"step_count": self.step_count}

    def load_state_dict(self, state: dict) -> None:
        self.step_count = int(state["step_count"])
        self._apply()
