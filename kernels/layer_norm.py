"""Triton LayerNorm (+ optional residual) forward and backward, wrapped as torch.library.triton_op.

Invariants:
- Same contract as the C++ op fastllm::layer_norm_fwd/_bwd: returns (y, h, mean, rstd) and (dx, dw, db);
  statistics and accumulation in fp32; h is rounded to the input dtype before its statistics are taken.
- Each program handles BLOCK_M rows of the whole hidden dim (BLOCK_N = next power of two >= N).
- dweight/dbias: each backward program sums its rows into one row of an fp32 (programs, N) buffer, and the
  host sums those rows: a two-stage reduction without atomics, deterministic.
- Runs on CUDA tensors, and on CPU tensors under TRITON_INTERPRET=1 (tests).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton


@triton.jit
def _ln_fwd(X, R, W, B, Y, H, Mean, Rstd, M, N, eps,
            HAS_RES: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    rmask, cmask = rows < M, cols < N
    mask = rmask[:, None] & cmask[None, :]
    offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        h = x + tl.load(R + offs, mask=mask, other=0.0).to(tl.float32)
        h = h.to(H.dtype.element_ty)
        tl.store(H + offs, h, mask=mask)
        x = h.to(tl.float32)
    mean = tl.sum(x, axis=1) / N
    d = tl.where(mask, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=1) / N + eps)
    y = d * rstd[:, None]
    if HAS_W:
        y = y * tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if HAS_B:
        y = y + tl.load(B + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(Mean + rows, mean, mask=rmask)
    tl.store(Rstd + rows, rstd, mask=rmask)


@triton.jit
def _ln_bwd(DY, DH, H, W, Mean, Rstd, DX, DWp, DBp, M, N, rows_per_prog,
            HAS_DH: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    cmask = cols < N
    w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32) if HAS_W else tl.full((BLOCK_N,), 1.0, tl.float32)
    dw_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    db_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    row_end = tl.minimum((pid + 1) * rows_per_prog, M)
    for start in range(pid * rows_per_prog, row_end, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        rmask = rows < row_end
        mask = rmask[:, None] & cmask[None, :]
        offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
        h = tl.load(H + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(Mean + rows, mask=rmask, other=0.0)
        rstd = tl.load(Rstd + rows, mask=rmask, other=0.0)
        xhat = tl.where(mask, (h - mean[:, None]) * rstd[:, None], 0.0)
        g = dy * w[None, :]
        c1 = tl.sum(g * xhat, axis=1) / N
        c2 = tl.sum(g, axis=1) / N
        dx = (g - c2[:, None] - xhat * c1[:, None]) * rstd[:, None]
        if HAS_DH:
            dx += tl.load(DH + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
        dw_acc += tl.sum(dy * xhat, axis=0)
        db_acc += tl.sum(dy, axis=0)
    if HAS_W:
        tl.store(DWp + pid * N + cols, dw_acc, mask=cmask)
    if HAS_B:
        tl.store(DBp + pid * N + cols, db_acc, mask=cmask)


def _blocks(n: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps): ~8K elements per program tile, whole rows."""
    block_n = triton.next_power_of_2(n)
    block_m = max(1, min(64, 8192 // block_n))
    return block_m, block_n, min(16, max(1, block_m * block_n // 1024))


@triton_op("fastllm::layer_norm_fwd_triton", mutates_args=())
def _fwd(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
         residual: torch.Tensor | None, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    n = x.shape[-1]
    m = x.numel() // n
    y = torch.empty_like(x)
    h = torch.empty_like(x) if residual is not None else x.new_empty(0)
    mean = x.new_empty(m, dtype=torch.float32)
    rstd = x.new_empty(m, dtype=torch.float32)
    block_m, block_n, warps = _blocks(n)
    wrap_triton(_ln_fwd)[(triton.cdiv(m, block_m),)](
        x, residual, weight, bias, y, h, mean, rstd, m, n, eps,
        HAS_RES=residual is not None, HAS_W=weight is not None, HAS_B=bias is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps)
    return y, h, mean, rstd


def _num_programs(x: torch.Tensor, m: int, block_m: int) -> int:
    tiles = triton.cdiv(m, block_m)
    if x.is_cuda:
        return min(tiles, 4 * torch.cuda.get_device_properties(x.device).multi_processor_count)
    return min(tiles, 8)  # interpreter: few programs, many rows each


@triton_op("fastllm::layer_norm_bwd_triton", mutates_args=())
def _bwd(dy: torch.Tensor, dh: torch.Tensor | None, h: torch.Tensor, weight: torch.Tensor | None,
         mean: torch.Tensor, rstd: torch.Tensor, has_bias: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n = h.shape[-1]
    m = h.numel() // n
    block_m, block_n, warps = _blocks(n)
    progs = _num_programs(h, m, block_m)
    rows_per_prog = triton.cdiv(triton.cdiv(m, progs), block_m) * block_m
    progs = triton.cdiv(m, rows_per_prog)
    dx = torch.empty_like(h)
    dw_part = h.new_empty((progs, n), dtype=torch.float32) if weight is not None else h.new_empty(0)
    db_part = h.new_empty((progs, n), dtype=torch.float32) if has_bias else h.new_empty(0)
    wrap_triton(_ln_bwd)[(progs,)](
        dy, dh, h, weight, mean, rstd, dx, dw_part, db_part, m, n, rows_per_prog,
        HAS_DH=dh is not None, HAS_W=weight is not None, HAS_B=has_bias,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps)
    dw = dw_part.sum(0).to(h.dtype) if weight is not None else h.new_empty(0)
    db = db_part.sum(0).to(h.dtype) if has_bias else h.new_empty(0)
    return dx, dw, db


@functools.cache
def layer_norm_fwd_op():
    """The forward op, with its autograd formula registered (once)."""
    from fastllm.ops.layer_norm import _bwd_fake, _fwd_fake, _make_backward, _setup_context

    # Explicit fake kernels: the derived ones would run the kernel body, which the CPU interpreter cannot fake.
    _fwd.register_fake(_fwd_fake)
    _bwd.register_fake(_bwd_fake)
    torch.library.register_autograd("fastllm::layer_norm_fwd_triton", _make_backward(_bwd),
                                    setup_context=_setup_context)
    return _fwd
