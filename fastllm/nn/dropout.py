"""fastllm.nn.Dropout: a drop-in for torch.nn.Dropout (same `p`, no state) on the fused counter-hash op.

Invariants:
- Training mode with p > 0: fastllm.ops.dropout(x, p) with a seed drawn from torch's default generator per call
  (torch.manual_seed reproduces it); the backward regenerates the mask from that seed, so nothing of the size
  of x is saved. Eval mode or p == 0: the identity.
- The backend is chosen at build time (KernelChoice) and on device moves, never inside forward().
"""
from __future__ import annotations

import torch

from fastllm.nn._kernels import KernelChoice
from fastllm.ops.dropout import dropout


class Dropout(KernelChoice):
    OPS = ("dropout",)

    def __init__(self, p: float = 0.5, kernels: str = "auto"):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"Dropout: p must be in [0, 1), got {p}")
        self.p = float(p)
        self._init_kernels(kernels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        return dropout(x, self.p, backend=self.backend["dropout"])  # (same shape as x)

    def extra_repr(self) -> str:
        return f"p={self.p}, backend={self.backend['dropout']}"
