"""Linear layers whose weight gradient is written into a buffer reused across training steps (CPU).

Why: optimizer.zero_grad() (set_to_none=True, torch's default) frees every .grad after a step, so each backward
writes its weight gradients into newly allocated memory (~340 MB for BERT-base's Linear weights). On CPU, memory
that malloc returned to the kernel comes back a page at a time (a page fault per 4 KiB on first touch, ~1 us each).
GradBuffer keeps a weight's last gradient buffer and writes the next gradient into it once nothing else uses it,
the way PyTorch's CUDA caching allocator recycles device memory. Measured: bert-base steps 0.95-0.96x the time
(benchmarks/RESULTS.md); how much of that is page faults is not separated (glibc's heap trimming varies by run).

Invariants:
- linear(module, x, buffer) equals module(x) (the same F.linear forward and the same gradient products);
  gelu_linear(module, u, buffer, approximate) equals module(F.gelu(u)) and saves u only: the backward recomputes
  the activation (one elementwise pass) instead of keeping a tensor of u's size per layer;
  row_split_linear(module, xa, xb, n, buffer) equals the two F.linear calls on W[:n] / W[n:] (BERT's last layer:
  queries on the loss rows, keys and values on all) with one weight gradient written block by block.
- A buffer is reused only when its storage has no other user (the previous .grad was dropped and no tensor shares
  it); otherwise a new one is allocated, so a gradient someone kept is never overwritten. With gradient
  accumulation (.grad still set), AccumulateGrad adds the new gradient into .grad as usual.
- The weight gradient handed to autograd is a new tensor object over the buffer's storage (not a view), which
  AccumulateGrad adopts as .grad without a copy.
- The fast path covers eager fp32 nn.Linear on CPU outside autocast; torch.compile, autocast, other devices and
  other module types (tensor-parallel Linears) call module(x). It has no double backward (once_differentiable).
- Between steps a buffer stays allocated: one weight-sized tensor per Linear, memory every backward needs anyway.
  GradBuffer.release() frees it, release_grad_buffers(model) all of a model's. Not for concurrent backward passes
  of one module from several threads (they could be handed the same free buffer).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable


def _storage_users(t: torch.Tensor) -> int:
    """Tensors (and storage objects) holding t's storage, not counting the one this call creates."""
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata) - 1


class GradBuffer:
    """The reusable weight-gradient buffer of one Linear (see the module doc)."""

    def __init__(self):
        self._buf: torch.Tensor | None = None

    def __getstate__(self) -> dict:
        return {}  # copies and pickles start without a buffer

    def __setstate__(self, state: dict) -> None:
        self.__init__()

    def take(self, weight: torch.Tensor) -> torch.Tensor:
        """A buffer shaped like weight that nothing else uses: the cached one if free, else a new one."""
        buf = self._buf
        if buf is None or buf.shape != weight.shape or buf.dtype != weight.dtype or _storage_users(buf) > 1:
            buf = self._buf = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
        return buf

    def release(self) -> None:
        self._buf = None


def grad_alias(buf: torch.Tensor) -> torch.Tensor:
    """A new tensor object (not a view) over buf's storage: AccumulateGrad can adopt it as .grad."""
    return buf.new_empty(0).set_(buf.untyped_storage(), 0, buf.shape, buf.stride())


def _param_grads(ctx, dy2: torch.Tensor, inputs, weight: torch.Tensor):
    """(d weight into the reused buffer, d bias) of y = inputs() @ weight.T + bias, each None when not needed.
    inputs is called only when d weight is needed (the GELU variant recomputes them)."""
    need, dw = ctx.needs_input_grad, None
    if need[1]:
        buf = ctx.grad_buffer.take(weight)  # (out, in)
        torch.mm(dy2.t(), inputs(), out=buf)  # (out, N) @ (N, in)
        dw = grad_alias(buf)
    db = dy2.sum(0) if ctx.has_bias and need[2] else None  # (out,)
    return dw, db


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, grad_buffer):
        ctx.save_for_backward(x, weight)
        ctx.grad_buffer, ctx.has_bias = grad_buffer, bias is not None
        return F.linear(x, weight, bias)  # (..., out)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1])  # (N, out)
        dw, db = _param_grads(ctx, dy2, lambda: x.reshape(-1, x.shape[-1]), weight)
        dx = dy2.mm(weight).view(x.shape) if ctx.needs_input_grad[0] else None  # (..., in)
        return dx, dw, db, None


class _GeluLinear(torch.autograd.Function):
    """module(gelu(u)) saving u only: the backward recomputes gelu(u) (one elementwise pass) instead of keeping
    the activation, a tensor of u's size per layer (GELU's own node saves u anyway)."""

    @staticmethod
    def forward(ctx, u, weight, bias, grad_buffer, approximate):
        ctx.save_for_backward(u, weight)
        ctx.grad_buffer, ctx.has_bias, ctx.approximate = grad_buffer, bias is not None, approximate
        return F.linear(F.gelu(u, approximate=approximate), weight, bias)  # (..., out)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        u, weight = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1])  # (N, out)
        def recompute():
            return F.gelu(u, approximate=ctx.approximate).reshape(-1, u.shape[-1])  # (N, in)

        dw, db = _param_grads(ctx, dy2, recompute, weight)
        du = None
        if ctx.needs_input_grad[0]:
            da = dy2.mm(weight).view(u.shape)  # (..., in)
            du = torch.ops.aten.gelu_backward(da, u, approximate=ctx.approximate)
        return du, dw, db, None, None


def _split_linear(xa, xb, weight, bias, n: int):
    ba, bb = (None, None) if bias is None else (bias[:n], bias[n:])
    return F.linear(xa, weight[:n], ba), F.linear(xb, weight[n:], bb)  # (..., n), (..., out - n)


class _RowSplitLinear(torch.autograd.Function):
    """(xa @ W[:n].T + b[:n], xb @ W[n:].T + b[n:]): one Linear whose output features split between two inputs.
    Its weight gradient is one buffer whose two row blocks each part's GEMM writes; slicing the weight instead
    makes autograd build a zero-filled weight-sized tensor per slice and add the two."""

    @staticmethod
    def forward(ctx, xa, xb, weight, bias, n, grad_buffer):
        ctx.save_for_backward(xa, xb, weight)
        ctx.n, ctx.grad_buffer, ctx.has_bias = n, grad_buffer, bias is not None
        return _split_linear(xa, xb, weight, bias, n)

    @staticmethod
    @once_differentiable
    def backward(ctx, dya, dyb):
        xa, xb, weight = ctx.saved_tensors
        n, need = ctx.n, ctx.needs_input_grad
        dya2, dyb2 = dya.reshape(-1, n), dyb.reshape(-1, weight.shape[0] - n)  # (Na, n), (Nb, out - n)
        dw = db = None
        if need[2]:
            buf = ctx.grad_buffer.take(weight)  # (out, in); its row blocks are contiguous
            torch.mm(dya2.t(), xa.reshape(-1, xa.shape[-1]), out=buf[:n])
            torch.mm(dyb2.t(), xb.reshape(-1, xb.shape[-1]), out=buf[n:])
            dw = grad_alias(buf)
        if ctx.has_bias and need[3]:
            db = torch.cat([dya2.sum(0), dyb2.sum(0)])  # (out,)
        dxa = dya2.mm(weight[:n]).view(xa.shape) if need[0] else None
        dxb = dyb2.mm(weight[n:]).view(xb.shape) if need[1] else None
        return dxa, dxb, dw, db, None, None


def _fast(module: nn.Module, x: torch.Tensor) -> bool:
    w = module.weight
    return (type(module) is nn.Linear and x.device.type == "cpu" and x.dtype == w.dtype == torch.float32
            and w.requires_grad and torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu")
            and not torch.compiler.is_compiling())


def linear(module: nn.Module, x: torch.Tensor, grad_buffer: GradBuffer) -> torch.Tensor:
    """module(x), with the weight gradient written into grad_buffer when module is a plain Linear (see above)."""
    if not _fast(module, x):
        return module(x)
    return _Linear.apply(x, module.weight, module.bias, grad_buffer)


def gelu_linear(module: nn.Module, u: torch.Tensor, grad_buffer: GradBuffer, approximate: str = "none"):
    """module(F.gelu(u, approximate)); on the fast path the activation is recomputed in the backward, not saved."""
    if not _fast(module, u):
        return module(F.gelu(u, approximate=approximate))
    return _GeluLinear.apply(u, module.weight, module.bias, grad_buffer, approximate)


def row_split_linear(module: nn.Module, xa: torch.Tensor, xb: torch.Tensor, n: int, grad_buffer: GradBuffer):
    """(F.linear(xa, W[:n], b[:n]), F.linear(xb, W[n:], b[n:])) of module's weight W and bias b; on the fast
    path the weight gradient is written into grad_buffer block by block."""
    if not (_fast(module, xa) and _fast(module, xb)):
        return _split_linear(xa, xb, module.weight, module.bias, n)
    return _RowSplitLinear.apply(xa, xb, module.weight, module.bias, n, grad_buffer)


def release_grad_buffers(model: nn.Module) -> None:
    """Frees every GradBuffer of model's modules (e.g. before evaluation, when the gradients are gone)."""
    for m in model.modules():
        for value in vars(m).values():
            for buf in value.values() if isinstance(value, dict) else (value,):
                if isinstance(buf, GradBuffer):
                    buf.release()
