"""Mixed precision: autocast contexts and a dynamic loss scaler for fp16.

Invariants:
- bf16 and fp16 run the forward under torch.autocast; parameters, gradients and optimizer state stay fp32.
- LossScaler (fp16 only; disabled its scale is 1): the parallel engine multiplies each micro-batch loss by
  `scale`, unscales the gradients it holds after the reduction, and checks them for inf/NaN with one all-reduce
  over the whole world, so every rank (dp, tp and pp alike) takes the same decision. Any inf/NaN: the step is
  skipped on every rank (gradients zeroed, weights and optimizer untouched), the scale is multiplied by backoff
  and `skipped` counts it. After `growth_interval`
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
