"""Triton standalone dropout, wrapped as torch.library.triton_op; also home of the Triton counter hash `fmix32`.

Invariants:
- Same contract as the C++ op fastllm::dropout_fwd (csrc/dropout/dropout.h): y = keep ? x * scale : +0 over
  the flat index n of the contiguous x, keep = (h >> 8) >= thr with h the hash chain of
  fastllm.ops.reference.dropout_mask; every value is bit-identical to the reference, cpu and cuda backends.
- uint32 arithmetic throughout (wrapping multiplies, logical shifts); the seed is loaded from a one-element
  int64 tensor on the device of x (copied from the 0-d CPU seed inside the op, so no host read: traceable).
- float32/bfloat16/float16: fp32 math with the fp32-rounded scale, written in the input dtype (no float64).
  bf16 is converted to and from fp32 in integer arithmetic (exact widening; round to nearest even), which is
  what the GPU's casts do and what the interpreter's casts do not (they flush subnormals and truncate).
- One program per BLOCK elements; runs on CUDA tensors, and on CPU tensors under TRITON_INTERPRET=1 (tests).
"""
from __future__ import annotations

import struct

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from fastllm.ops.reference import HASH_COL, HASH_DROPOUT, HASH_ROW, dropout_threshold


@triton.jit
def fmix32(h):
    """MurmurHash3's 32-bit finalizer on uint32 values (shared with fastllm.kernels.attention)."""
    h ^= h >> 16
    h *= 0x85EBCA6B
    h ^= h >> 13
    h *= 0xC2B2AE35
    return h ^ (h >> 16)


@triton.jit
def _bf16_rne(v):
    """fp32 -> bf16 rounded to nearest even, in integer arithmetic: the bits of torch's and C++'s conversion.
    (The Triton interpreter's fp32 -> bf16 cast truncates; on GPU this equals the native RTNE cast.) NaN gives
    the canonical 0x7FC0; the add cannot wrap for a non-NaN input (u <= 0xFF800000, so u + 0x8000 < 2^32)."""
    u = v.to(tl.uint32, bitcast=True)
    r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    r = tl.where(v != v, 0x7FC0, r)  # noqa: PLR0124 - v != v is the NaN test (no isnan in the interpreter)
    return r.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _bf16_to_f32(x):
    """bf16 -> fp32 exactly (a 16-bit shift), subnormals included, which the interpreter's cast flushes."""
    return (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)


@triton.jit
def _dropout_kernel(X, Y, SEED, n, thr, scale, C_KEY: tl.constexpr, C_ROW: tl.constexpr, C_COL: tl.constexpr,
                    BF16: tl.constexpr, BLOCK: tl.constexpr):
    s = tl.load(SEED)  # int64
    lo = (s & 0xFFFFFFFF).to(tl.uint32)
    hi = ((s >> 32) & 0xFFFFFFFF).to(tl.uint32)
    key = fmix32(lo ^ fmix32(hi ^ C_KEY))
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # (BLOCK,) flat indices
    inb = offs < n
    r = fmix32(key ^ ((offs >> 32).to(tl.uint32) * C_ROW))
    h = fmix32(r ^ ((offs & 0xFFFFFFFF).to(tl.uint32) * C_COL))
    keep = (h >> 8) >= thr
    x = tl.load(X + offs, mask=inb, other=0.0)
    if BF16:
        y = tl.where(keep, _bf16_to_f32(x) * scale, 0.0)
        tl.store(Y + offs, _bf16_rne(y), mask=inb)
    else:
        y = tl.where(keep, x.to(tl.float32) * scale, 0.0)
        tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=inb)


def _launch_args(x: torch.Tensor, p: float) -> dict:
    block = 1024 if x.is_cuda else 4096  # the interpreter: fewer, larger programs
    scale32 = struct.unpack("f", struct.pack("f", 1.0 / (1.0 - p)))[0]  # rounded to fp32 (nearest), as in C++
    return {"thr": dropout_threshold(p), "scale": scale32, "C_KEY": HASH_DROPOUT, "C_ROW": HASH_ROW,
            "C_COL": HASH_COL, "BF16": x.dtype == torch.bfloat16, "BLOCK": block, "num_warps": 4}


@triton_op("fastllm::dropout_fwd_triton", mutates_args=())
def _fwd(x: torch.Tensor, p: float, seed: torch.Tensor) -> torch.Tensor:
    y = torch.empty_like(x)
    n = x.numel()
    if n == 0:
        return y
    args = _launch_args(x, p)
    # (1,) on the kernel's device; non_blocking: a blocking copy from pageable memory would sync the stream
    seed_dev = seed.reshape(1).to(device=x.device, dtype=torch.int64, non_blocking=True)
    wrap_triton(_dropout_kernel)[(triton.cdiv(n, args["BLOCK"]),)](x, y, seed_dev, n, **args)
    return y


def _register() -> None:
    """The fake kernel and autograd formula (the op on the gradient, same seed). Done at import, not lazily, so
    that a first call inside a torch.compile region does not trace into the (untraceable) registration."""
    from fastllm.ops.dropout import _fwd_fake, _make_backward, _setup_context

    # An explicit fake kernel: the derived one would run the kernel body, which the CPU interpreter cannot fake.
    _fwd.register_fake(_fwd_fake)
    torch.library.register_autograd("fastllm::dropout_fwd_triton", _make_backward(_fwd),
                                    setup_context=_setup_context)


_register()


def dropout_fwd_op():
    """The op (registered with its fake kernel and autograd formula when this module was imported)."""
    return _fwd
