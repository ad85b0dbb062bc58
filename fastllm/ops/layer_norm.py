"""Fused LayerNorm with an optional residual add: `layer_norm(x, weight, bias, eps, residual, backend)`.

Invariants:
- Normalizes over the last dim. With `residual`, returns (y, h) where h = x + residual and y = LN(h),
  computed in one pass; without, returns y. Statistics are fp32 for every input dtype.
- Backends (fastllm.ops.backends): reference (fastllm.ops.reference), cpu/cuda (torch.ops.fastllm.layer_norm_fwd,
  implemented in csrc/layer_norm/), triton (fastllm.kernels.layer_norm). All give the same gradients
  (dx, dresidual = dx, dweight, dbias); double backward is not supported by the fused backends.
- The dispatcher ops have fake (meta) kernels and autograd formulas registered here, so they work under
  torch.compile(fullgraph=True) and pass torch.library.opcheck.
- Non-contiguous inputs are made contiguous (a copy); bad shapes, dtypes, devices, empty inputs and eps <= 0
  raise errors that name the argument.
"""
from __future__ import annotations

import torch

from fastllm import _ext
from fastllm.ops import backends, reference
from fastllm.ops._checks import check_float, check_like

__all__ = ["layer_norm"]


def _fwd_fake(x, weight, bias, residual, eps):
    rows = x.numel() // x.shape[-1]
    h = torch.empty_like(x) if residual is not None else x.new_empty(0)
    stats = x.new_empty(rows, dtype=torch.float32)
    return torch.empty_like(x), h, stats, stats.clone()


def _bwd_fake(dy, dh, h, weight, mean, rstd, has_bias):
    n = h.shape[-1]
    return torch.empty_like(h), h.new_empty(n if weight is not None else 0), h.new_empty(n if has_bias else 0)


def _setup_context(ctx, inputs, output):
    x, weight, bias, residual, _ = inputs
    _, h, mean, rstd = output
    ctx.has_residual, ctx.has_bias = residual is not None, bias is not None
    ctx.save_for_backward(h if residual is not None else x, weight, mean, rstd)
    ctx.set_materialize_grads(False)  # an unused h (post-LN) or stats output costs no zero-filled gradient


def _make_backward(bwd_op):
    def backward(ctx, dy, dh, _dmean, _drstd):
        h, weight, mean, rstd = ctx.saved_tensors
        dy = torch.zeros_like(h) if dy is None else dy.contiguous()
        dh = dh.contiguous() if ctx.has_residual and dh is not None else None
        dx, dw, db = bwd_op(dy, dh, h, weight, mean, rstd, ctx.has_bias)
        dw = dw if weight is not None else None
        db = db if ctx.has_bias else None
        return dx, dw, db, (dx if ctx.has_residual else None), None

    return backward


def register(fwd_name: str, bwd_name: str, bwd_op) -> None:
    """Registers fake kernels and the autograd formula for a (fwd, bwd) pair of dispatcher ops."""
    torch.library.register_fake(fwd_name)(_fwd_fake)
    torch.library.register_fake(bwd_name)(_bwd_fake)
    torch.library.register_autograd(fwd_name, _make_backward(bwd_op), setup_context=_setup_context)


if _ext.load().loaded:
    register("fastllm::layer_norm_fwd", "fastllm::layer_norm_bwd", torch.ops.fastllm.layer_norm_bwd)


def _check_args(x, weight, bias, eps, residual) -> None:
    check_float("x", x)
    if x.dim() == 0 or x.numel() == 0:
        raise ValueError(f"layer_norm: x must be a non-empty tensor with at least one dim, got {tuple(x.shape)}")
    n = x.shape[-1]
    check_like("weight", weight, x, (n,))
    check_like("bias", bias, x, (n,))
    check_like("residual", residual, x, tuple(x.shape))
    if not eps > 0:
        raise ValueError(f"layer_norm: eps must be > 0, got {eps}")


def _run_dispatcher(fwd_op, x, weight, bias, eps, residual):
    cont = (lambda t: None if t is None else t.contiguous())
    y, h, _, _ = fwd_op(x.contiguous(), cont(weight), cont(bias), cont(residual), float(eps))
    return y if residual is None else (y, h)


def _native(x, weight, bias, eps, residual):
    return _run_dispatcher(torch.ops.fastllm.layer_norm_fwd, x, weight, bias, eps, residual)


def _triton(x, weight, bias, eps, residual):
    from fastllm.kernels import layer_norm as kernel  # lazy: triton is optional

    return _run_dispatcher(kernel.layer_norm_fwd_op(), x, weight, bias, eps, residual)


_IMPLS = {"reference": reference.layer_norm, "cpu": _native, "cuda": _native, "triton": _triton}


def layer_norm(x: torch.Tensor, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
               eps: float = 1e-5, residual: torch.Tensor | None = None, backend: str = "auto"):
    """LayerNorm of x (or of h = x + residual, returning (y, h)) over the last dim."""
    _check_args(x, weight, bias, eps, residual)
    name = backends.select("layer_norm", x.device, backend)
    if x.dtype == torch.float64 and backend == "auto":
        name = "reference"  # the only backend with float64; the fused kernels take fp32/bf16/fp16
    if name != "reference" and x.dtype == torch.float64:
        raise TypeError(f"layer_norm: the {name} backend supports float32/bfloat16/float16, not float64")
    return _IMPLS[name](x, weight, bias, eps, residual)
