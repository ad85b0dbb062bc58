"""Triton softmax cross-entropy (forward, backward) and linear + cross-entropy, wrapped as torch.library.triton_op.

Invariants:
- Same contracts as the C++ ops fastllm::cross_entropy_fwd/_bwd and fastllm::linear_cross_entropy_fwd/_bwd
  (schemas and meaning in csrc/fastllm.cpp): per-row fp32 loss and logsumexp, ignored rows give 0 loss and
  zero gradient, every statistic in fp32.
- Each program handles BLOCK_M rows and walks the vocabulary in BLOCK_V tiles with an online max / sum of
  exponentials (one read of the row), then, for the gradient, a second walk writing
  scale * (softmax - s/V - (1 - s) * onehot) in the output dtype (in place over the logits in the linear op).
- linear_cross_entropy: the matmuls run in torch (cuBLAS on GPU) per chunk of non-ignored rows; the fused
  Triton kernel runs between them. These two ops are torch.library.custom_op (opaque to torch.compile), not
  triton_op: inductor would trace into a triton_op, and the gather of non-ignored rows has a data-dependent
  size that it cannot trace. grad_weight/grad_bias accumulate in fp32 (bf16/fp16 operands are upcast for
  that GEMM: portable to every torch version).
- Runs on CUDA tensors, and on CPU tensors under TRITON_INTERPRET=1 (tests).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import custom_op, triton_op, wrap_triton


@triton.jit
def _grad_pass(X, G, rows, rmask, lab, keep, lse, scale, stride, V, smoothing,
               BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr):
    """G[row] = scale * (exp(X[row] - lse) - s/V - (1 - s) * onehot(label)), zero on ignored rows."""
    base = rows.to(tl.int64)[:, None] * stride
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        mask = rmask[:, None] & (cols < V)[None, :]
        x = tl.load(X + base + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        g = tl.exp(x - lse[:, None]) - smoothing / V
        g = g - tl.where(cols[None, :] == lab[:, None], 1.0 - smoothing, 0.0)
        g = tl.where(keep[:, None], g * scale[:, None], 0.0)
        tl.store(G + base + cols[None, :], g.to(G.dtype.element_ty), mask=mask)


@triton.jit
def _ce_fwd(X, G, Labels, Loss, Lse, Scale, scale0, M, V, stride, ignore_index, smoothing,
            WRITE_GRAD: tl.constexpr, HAS_SCALE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    lab = tl.load(Labels + rows, mask=rmask, other=ignore_index)
    keep = rmask & (lab != ignore_index)
    base = rows.to(tl.int64)[:, None] * stride
    m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_M,), tl.float32)
    sx = tl.zeros((BLOCK_M,), tl.float32)
    xl = tl.zeros((BLOCK_M,), tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        mask = rmask[:, None] & (cols < V)[None, :]
        x = tl.load(X + base + cols[None, :], mask=mask, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows past M: keep exp() finite
        s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(x - m_safe[:, None]), axis=1)
        sx += tl.sum(tl.where(mask, x, 0.0), axis=1)
        xl += tl.sum(tl.where(cols[None, :] == lab[:, None], x, 0.0), axis=1)
        m = m_new
    lse = tl.where(rmask, m + tl.log(tl.where(rmask, s, 1.0)), 0.0)  # rows past M stay finite
    loss = tl.where(keep, (1.0 - smoothing) * (lse - xl) + smoothing * (lse - sx / V), 0.0)
    tl.store(Loss + rows, loss, mask=rmask)
    tl.store(Lse + rows, lse, mask=rmask)
    if WRITE_GRAD:
        if HAS_SCALE:
            scale = tl.load(Scale + rows, mask=rmask, other=0.0)
        else:
            scale = tl.full((BLOCK_M,), 1.0, tl.float32) * scale0
        _grad_pass(X, G, rows, rmask, lab, keep, lse, scale, stride, V, smoothing, BLOCK_M, BLOCK_V)


@triton.jit
def _ce_bwd(X, G, Labels, Lse, Scale, M, V, stride, ignore_index, smoothing,
            BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    lab = tl.load(Labels + rows, mask=rmask, other=ignore_index)
    keep = rmask & (lab != ignore_index)
    lse = tl.load(Lse + rows, mask=rmask, other=0.0)
    scale = tl.load(Scale + rows, mask=rmask, other=0.0)
    _grad_pass(X, G, rows, rmask, lab, keep, lse, scale, stride, V, smoothing, BLOCK_M, BLOCK_V)


def _blocks(x: torch.Tensor, v: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_V, num_warps): one row per program on GPU; many rows per program in the interpreter."""
    if x.is_cuda:
        return 1, min(4096, triton.next_power_of_2(v)), 8
    block_v = min(2048, triton.next_power_of_2(v))
    return max(1, min(512, 8192 // block_v)), block_v, 4


def _launch_fwd(logits, grad, labels, loss, lse, scale, scale0, ignore_index, smoothing, write_grad):
    m, v = logits.shape
    if m == 0:
        return
    bm, bv, warps = _blocks(logits, v)
    wrap_triton(_ce_fwd)[(triton.cdiv(m, bm),)](
        logits, grad, labels, loss, lse, scale, scale0, m, v, logits.stride(0), ignore_index, smoothing,
        WRITE_GRAD=write_grad, HAS_SCALE=scale is not None, BLOCK_M=bm, BLOCK_V=bv, num_warps=warps)


@triton_op("fastllm::cross_entropy_fwd_triton", mutates_args=())
def _fwd(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int,
         label_smoothing: float) -> tuple[torch.Tensor, torch.Tensor]:
    loss = logits.new_empty(logits.shape[0], dtype=torch.float32)  # (N,)
    lse = torch.empty_like(loss)  # (N,)
    _launch_fwd(logits, logits, labels, loss, lse, None, 1.0, ignore_index, label_smoothing, False)
    return loss, lse


@triton_op("fastllm::cross_entropy_bwd_triton", mutates_args=())
def _bwd(grad_loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor,
         ignore_index: int, label_smoothing: float) -> torch.Tensor:
    grad = torch.empty_like(logits)  # (N, V)
    m, v = logits.shape
    if m:
        bm, bv, warps = _blocks(logits, v)
        wrap_triton(_ce_bwd)[(triton.cdiv(m, bm),)](
            logits, grad, labels, lse, grad_loss, m, v, logits.stride(0), ignore_index, label_smoothing,
            BLOCK_M=bm, BLOCK_V=bv, num_warps=warps)
    return grad


# ---- linear + cross-entropy ----


def _accumulate(g, hc, gw, gb) -> None:
    """grad_W (fp32) += G^T h_c, grad_b (fp32) += column sums of G."""
    if g.dtype == torch.float32:
        gw.addmm_(g.t(), hc)  # (V, H) += (V, C) @ (C, H)
    else:
        gw.addmm_(g.t().float(), hc.float())
    if gb is not None:
        gb.add_(g.sum(0, dtype=torch.float32))  # (V,)


def _chunks(h, lab, weight, bias, scale, scale0, ignore_index, smoothing, chunk, grads):
    """The chunk loop over gathered rows: returns the per-row loss (M,); fills grads = (gh, gw, gb) if given."""
    m, v = h.shape[0], weight.shape[0]
    loss = h.new_empty(m, dtype=torch.float32)  # (M,)
    lse = torch.empty_like(loss)  # (M,)
    buf = h.new_empty((min(chunk, max(m, 1)), v))  # (C, V), reused
    for r0 in range(0, m, chunk):
        c = min(chunk, m - r0)
        hc, lg = h[r0:r0 + c], buf[:c]  # (c, H), (c, V)
        torch.addmm(bias, hc, weight.t(), out=lg) if bias is not None else torch.mm(hc, weight.t(), out=lg)
        sc = scale[r0:r0 + c] if scale is not None else None
        _launch_fwd(lg, lg, lab[r0:r0 + c], loss[r0:r0 + c], lse[r0:r0 + c], sc, scale0, ignore_index,
                    smoothing, grads is not None)
        if grads is not None:
            torch.mm(lg, weight, out=grads[0][r0:r0 + c])  # (c, H) = (c, V) @ (V, H)
            _accumulate(lg, hc, grads[1], grads[2])
    return loss


def _gather(hidden, labels, ignore_index):
    idx = (labels != ignore_index).nonzero().squeeze(1)  # (M,)
    return idx, hidden.index_select(0, idx), labels.index_select(0, idx)


def _scatter(sel, idx, rows):
    out = sel.new_zeros((rows, *sel.shape[1:]))
    return out.index_copy_(0, idx, sel)


def _new_grads(h, weight, bias):
    f32 = {"dtype": torch.float32, "device": h.device}
    gb = torch.zeros(weight.shape[0], **f32) if bias is not None else None
    return torch.empty_like(h), torch.zeros(weight.shape, **f32), gb


def _finish_grads(grads, idx, rows, weight, bias):
    gb = grads[2].to(bias.dtype) if bias is not None else weight.new_empty(0)
    return _scatter(grads[0], idx, rows), grads[1].to(weight.dtype), gb


@custom_op("fastllm::linear_cross_entropy_fwd_triton", mutates_args=())
def _lce_fwd(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
             ignore_index: int, label_smoothing: float, reduction: int, chunk_size: int,
             compute_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    idx, h, lab = _gather(hidden, labels, ignore_index)
    m = h.shape[0]
    want = compute_grad and reduction != 0
    grads = _new_grads(h, weight, bias) if want else None
    scale0 = 1.0 / m if reduction == 1 and m > 0 else 1.0
    loss = _chunks(h, lab, weight, bias, None, scale0, ignore_index, label_smoothing, chunk_size, grads)
    total = loss.sum()
    out = {0: _scatter(loss, idx, hidden.shape[0]), 1: total / m if m else total / 0.0, 2: total}[reduction]
    if not want:
        return out, hidden.new_empty(0), hidden.new_empty(0), hidden.new_empty(0)
    return (out, *_finish_grads(grads, idx, hidden.shape[0], weight, bias))


@custom_op("fastllm::linear_cross_entropy_bwd_triton", mutates_args=())
def _lce_bwd(grad_loss: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
             labels: torch.Tensor, ignore_index: int, label_smoothing: float,
             chunk_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    idx, h, lab = _gather(hidden, labels, ignore_index)
    grads = _new_grads(h, weight, bias)
    scale = grad_loss.index_select(0, idx).contiguous()  # (M,)
    _chunks(h, lab, weight, bias, scale, 1.0, ignore_index, label_smoothing, chunk_size, grads)
    return _finish_grads(grads, idx, hidden.shape[0], weight, bias)


def _register() -> None:
    """Fake kernels and autograd formulas, registered once at import (not lazily inside a function that
    torch.compile could trace: dynamo refuses to trace register_autograd)."""
    from fastllm.ops.cross_entropy import (
        _ce_bwd_fake,
        _ce_fwd_fake,
        _ce_setup_context,
        _lce_bwd_fake,
        _lce_fwd_fake,
        _lce_setup_context,
        _make_ce_backward,
        _make_lce_backward,
    )

    # Explicit fake kernels: the derived ones would run the kernel body, which the CPU interpreter cannot fake.
    _fwd.register_fake(_ce_fwd_fake)
    _bwd.register_fake(_ce_bwd_fake)
    torch.library.register_autograd("fastllm::cross_entropy_fwd_triton", _make_ce_backward(_bwd),
                                    setup_context=_ce_setup_context)
    _lce_fwd.register_fake(_lce_fwd_fake)
    _lce_bwd.register_fake(_lce_bwd_fake)
    torch.library.register_autograd("fastllm::linear_cross_entropy_fwd_triton", _make_lce_backward(_lce_bwd),
                                    setup_context=_lce_setup_context)


_register()


def cross_entropy_fwd_op():
    """The forward op (fake kernel and autograd formula registered at import)."""
    return _fwd


def linear_cross_entropy_fwd_op():
    """The linear forward op (fake kernels and autograd formula registered at import)."""
    return _lce_fwd
