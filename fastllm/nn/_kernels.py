"""Kernel-backend choice shared by fastllm.nn modules: resolved once at build time and on device moves.

Invariants:
- `kernels` is "auto", one backend name for every op, or "op=backend,op=backend" (ops not named use "auto").
- KernelChoice.backend maps each op in OPS to the backend fastllm.ops.backends.select() chose; it is recomputed
  only in `_apply` (module.to(device)), never inside forward().
"""
from __future__ import annotations

import torch
from torch import nn

from fastllm.ops import backends


def requested_backend(op: str, kernels: str) -> str:
    """The backend `kernels` asks for `op` ('auto' when a per-op spec does not name it)."""
    if "=" not in kernels:
        return kernels.strip() or "auto"
    for item in kernels.split(","):
        name, _, backend = item.partition("=")
        if name.strip() == op:
            return backend.strip()
    return "auto"


def choose(ops: tuple[str, ...], device, kernels: str) -> dict[str, str]:
    """{op: backend} for `device`; raises BackendUnavailable for an explicit unavailable choice."""
    return {op: backends.select(op, torch.device(device), requested_backend(op, kernels)) for op in ops}


class KernelChoice(nn.Module):
    """Base for modules that call fastllm.ops directly: sets self.backend = {op: backend} at build time."""

    OPS: tuple[str, ...] = ()

    def _init_kernels(self, kernels: str, device=None) -> None:
        self.kernels = kernels
        self.backend = choose(self.OPS, device or "cpu", kernels)

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        probe = fn(torch.empty(0))  # where .to()/.cuda() sends tensors (works for modules without parameters)
        self.backend = choose(self.OPS, probe.device, self.kernels)
        return out


def make_layer_norm(size: int, eps: float, kernels: str):
    """A fastllm.nn.LayerNorm whose backend follows the `kernels` spec."""
    from fastllm.nn.layer_norm import LayerNorm

    return LayerNorm(size, eps=eps, backend=requested_backend("layer_norm", kernels))


def apply_norm(ln, x: torch.Tensor, residual: torch.Tensor | None = None):
    """ln(x) or ln(x, residual) -> (y, x + residual), with inputs cast to the weight's dtype first.

    Under autocast the weight stays fp32 while linear outputs are bf16; torch's autocast runs layer_norm in
    fp32 too, so this matches its numerics (and the fused op requires one dtype for x, residual and weight)."""
    dtype = ln.weight.dtype
    x = x if x.dtype == dtype else x.to(dtype)
    if residual is None:
        return ln(x)
    return ln(x, residual if residual.dtype == dtype else residual.to(dtype))
