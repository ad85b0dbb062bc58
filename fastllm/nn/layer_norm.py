"""fastllm.nn.LayerNorm: a drop-in for torch.nn.LayerNorm (same arguments, same state_dict keys) on the fused op.

Invariants:
- The backend is chosen when the module is built and again only when it moves to another device type
  (`_apply`), never inside forward().
- forward(x) returns LN(x); forward(x, residual) returns (LN(x + residual), x + residual) in one fused pass.
- A multi-dim normalized_shape is handled by flattening the normalized dims.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from fastllm.ops import backends
from fastllm.ops.layer_norm import layer_norm


class LayerNorm(nn.Module):
    def __init__(self, normalized_shape, eps: float = 1e-5, elementwise_affine: bool = True, bias: bool = True,
                 device=None, dtype=None, backend: str = "auto"):
        super().__init__()
        shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
        if not shape or any(int(s) <= 0 for s in shape):
            raise ValueError(f"LayerNorm: normalized_shape must be positive sizes, got {normalized_shape!r}")
        if not eps > 0:
            raise ValueError(f"LayerNorm: eps must be > 0, got {eps}")
        self.normalized_shape, self.eps, self.elementwise_affine = shape, float(eps), elementwise_affine
        kw = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.ones(shape, **kw)) if elementwise_affine else None
        self.bias = nn.Parameter(torch.zeros(shape, **kw)) if elementwise_affine and bias else None
        self.requested_backend = backend
        self.backend = backends.select("layer_norm", torch.device(device or "cpu"), backend)

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        if self.weight is not None:
            self.backend = backends.select("layer_norm", self.weight.device, self.requested_backend)
        return out

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        k = len(self.normalized_shape)
        if tuple(x.shape[-k:]) != self.normalized_shape:
            raise ValueError(f"LayerNorm: input shape {tuple(x.shape)} does not end in {self.normalized_shape}")
        n = math.prod(self.normalized_shape)
        flat = (lambda t: None if t is None else t.reshape(*t.shape[: t.dim() - k], n))
        out = layer_norm(flat(x), flat(self.weight), flat(self.bias), self.eps, flat(residual), self.backend)
        if residual is None:
            return out.view(x.shape)
        return out[0].view(x.shape), out[1].view(x.shape)

    def extra_repr(self) -> str:
        return (f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}, "
                f"backend={self.backend}")
