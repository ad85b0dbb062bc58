"""Pure-PyTorch reference implementations of every fastllm op: the test oracle and the last-resort fallback.

Invariants: written for readability, not speed; built only from differentiable torch primitives so that
autograd gives the gradients; computed in the input dtype (tests call them on float64 inputs to get the
oracle, and on the kernel's dtype to measure what plain PyTorch achieves).
"""
from __future__ import annotations

import torch


def layer_norm(x: torch.Tensor, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
               eps: float = 1e-5, residual: torch.Tensor | None = None):
    """LayerNorm over the last dim; with `residual`, returns (LN(x + residual), x + residual)."""
    h = x if residual is None else x + residual  # (..., N)
    mean = h.mean(dim=-1, keepdim=True)  # (..., 1)
    var = ((h - mean) ** 2).mean(dim=-1, keepdim=True)  # (..., 1), biased as in torch.nn.LayerNorm
    y = (h - mean) * torch.rsqrt(var + eps)  # (..., N)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y if residual is None else (y, h)
