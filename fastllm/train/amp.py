"""Mixed precision: autocast contexts and a dynamic loss scaler for fp16.

Invariants:
- bf16 and fp16 run the forward under torch.autocast; parameters, gradients and optimizer state stay fp32.
- LossScaler (fp16 only; disabled it is the identity): the loss is multiplied by `scale`; before the optimizer
  step the gradients are unscaled and checked. Any inf/NaN: the step is skipped (gradients zeroed, weights and
  optimizer untouched), the scale is multiplied by backoff and `skipped` counts it. After `growth_interval`
  clean steps in a row the scale is multiplied by growth. Its state is plain floats/ints (checkpointable).
"""
from __future__ import annotations

import contextlib

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(precision: str, device: torch.device):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[precision])


class LossScaler:
    def __init__(self, enabled: bool, init_scale: float = 2.0 ** 16, growth_interval: int = 200,
                 backoff: float = 0.5, growth: float = 2.0):
        self.enabled, self.scale, self.growth_interval = enabled, float(init_scale) if enabled else 1.0, \
            growth_interval
        self.backoff, self.growth, self.clean, self.skipped = backoff, growth, 0, 0

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.scale if self.enabled else loss

    def unscale_and_check(self, params) -> bool:
        """Divides gradients by the scale; True when all are finite (always checked, also in fp32/bf16)."""
        grads = [p.grad for p in params if p.grad is not None]
        if self.enabled:
            inv = 1.0 / self.scale
            for g in grads:
                g.mul_(inv)
        return bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()) if grads else True

    def update(self, finite: bool) -> None:
        if not finite:
            self.skipped += 1
            self.clean = 0
            if self.enabled:
                self.scale *= self.backoff
            return
        self.clean += 1
        if self.enabled and self.clean >= self.growth_interval:
            self.scale *= self.growth
            self.clean = 0

    def state_dict(self) -> dict:
        return {"scale": self.scale, "clean": self.clean, "skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        self.scale, self.clean, self.skipped = float(state["scale"]), int(state["clean"]), int(state["skipped"])
