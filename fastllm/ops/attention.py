"""Fused attention: `attention` (padded, (B, H, T, D)) and `attention_varlen` (packed, (total, H, D)).

Invariants:
- softmax(scale * q k^T + mask) v with scale = 1/sqrt(D) unless given. k and v have Hkv heads, Hkv dividing H
  (grouped / multi-query attention: query head h reads kv head h // (H // Hkv)). Tq != Tk is allowed; causal
  masking is bottom-right aligned (query i sees keys j <= i + Tk - Tq, as in FlashAttention), so Tq = 1 with a
  KV cache is cached decoding. key_padding_mask (B, Tk) bool, True = attend.
- A query row with no key to attend (all masked) returns zeros, never NaN, and gets zero gradients.
- Dropout on the attention probabilities uses a counter-based hash of (seed, b*H + h, query row, key col)
  (fastllm.ops.reference.dropout_keep), identical in every backend: the same seed gives the same mask
  everywhere, and the backward regenerates it instead of storing it. generator_seed=None draws the seed
  from torch's default generator (torch.manual_seed controls it); the op saves it for the backward.
  In varlen, b is the sequence index and rows/cols count from the start of each sequence, so padded and
  packed calls on the same data agree, dropout included.
- Backends (fastllm.ops.backends): reference (materialized scores, the oracle), cpu/cuda
  (torch.ops.fastllm.attention_fwd/_bwd, csrc/attention/), triton (fastllm.kernels.attention). The fused
  backends save only out and the fp32 log-sum-exp (B, H, Tq) for the backward: extra memory O(B*H*T).
- Layout: the CPU kernel reads q, k, v (and dout) with any strides whose head dim is contiguous, so the
  (B, H, T, D) views of a fused QKV projection go in without copies, and it returns out, dq, dk, dv laid out like
  their inputs (_empty_heads: (B, T, H, D) memory for such views, so merging the heads back is a view too). CUDA
  and Triton take contiguous copies and return contiguous tensors.
- The dispatcher ops have fake kernels and autograd formulas registered here (torch.compile, opcheck). Their
  max_seqlen arguments are SymInt, so a compiled model keeps sequence lengths symbolic (one graph for all).
- Under torch.compile, dropout with generator_seed=None draws the seed inside the graph as an int64 tensor
  (inductor's RNG, also seeded by torch.manual_seed, so compiled and eager masks differ) and calls the
  tensor-seed wrappers fastllm::attention_fwd_seeded / _bwd_seeded, which read it inside the op: no graph
  break, no host sync in the traced code. Eager calls keep the int-seed ops unchanged.
"""
from __future__ import annotations

import math

import torch

from fastllm import _ext
from fastllm.ops import backends, reference
from fastllm.ops._checks import check_float

__all__ = ["attention", "attention_varlen"]


def _empty_heads(x: torch.Tensor, varlen: bool) -> torch.Tensor:
    """A tensor of x's shape laid out as the kernels allocate out / dq / dk / dv for input x (empty_heads in
    attention_cpu.cpp): (B, T, H, D) memory seen as (B, H, T, D) when x is padded and its rows are further apart
    than its heads (a view of a (B, T, H * D) projection), else contiguous. CUDA and Triton get contiguous inputs
    (_layout), so there the rule gives contiguous outputs, as those kernels allocate."""
    if not varlen and x.stride(2) > x.stride(1):
        b, h, t, d = x.shape
        return x.new_empty((b, t, h, d)).transpose(1, 2)  # (B, H, T, D) over (B, T, H, D) memory
    return x.new_empty(x.shape)


def _fwd_fake(q, k, v, mask, cu_q, cu_k, max_q, max_k, causal, dropout_p, scale, seed):
    if cu_q is not None:
        lse = q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)  # (H, total_q)
    else:
        lse = q.new_empty(q.shape[:3], dtype=torch.float32)  # (B, H, Tq)
    return _empty_heads(q, cu_q is not None), lse


def _bwd_fake(dout, q, k, v, out, lse, mask, cu_q, cu_k, max_q, max_k, causal, dropout_p, scale, seed):
    varlen = cu_q is not None
    return _empty_heads(q, varlen), _empty_heads(k, varlen), _empty_heads(v, varlen)


def _setup_context(ctx, inputs, output):
    q, k, v, mask, cu_q, cu_k, *ctx.args = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], mask, cu_q, cu_k)
    ctx.set_materialize_grads(False)  # lse gets no gradient: no zero-filled (B, H, T) buffer per call


def _layout(x: torch.Tensor, strided: bool = True) -> torch.Tensor:
    """x as the kernel reads it: the CPU kernel (strided) takes any strides with a contiguous head dim (q, k, v
    as views of the QKV projection: no copies); CUDA and Triton take contiguous tensors."""
    if strided and x.device.type == "cpu" and x.stride(-1) == 1:
        return x
    return x.contiguous()


def _make_backward(bwd_op, strided: bool = True):
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, mask, cu_q, cu_k = ctx.saved_tensors
        dout = torch.zeros_like(out) if dout is None else _layout(dout, strided)
        dq, dk, dv = bwd_op(dout, q, k, v, out, lse, mask, cu_q, cu_k, *ctx.args)
        return dq, dk, dv, *([None] * 9)

    return backward


def register(fwd_name: str, bwd_name: str, bwd_op) -> None:
    """Registers fake kernels and the autograd formula for a (fwd, bwd) pair of dispatcher ops."""
    torch.library.register_fake(fwd_name)(_fwd_fake)
    torch.library.register_fake(bwd_name)(_bwd_fake)
    torch.library.register_autograd(fwd_name, _make_backward(bwd_op), setup_context=_setup_context)


if _ext.load().loaded and hasattr(torch.ops.fastllm, "attention_fwd"):
    register("fastllm::attention_fwd", "fastllm::attention_bwd", torch.ops.fastllm.attention_bwd)


# ------------------------------------------------------------------------------- tensor seed (torch.compile)
# The fused ops take the dropout seed as an int. A seed drawn while tracing must stay a tensor (its .item()
# would break the graph), so under compile these wrappers take it as a 0-d int64 tensor and read it when they
# run. They are opaque to inductor and call the backend's own int-seed ops.
@torch.library.custom_op("fastllm::attention_fwd_seeded", mutates_args=())
def _fwd_seeded(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                cu_q: torch.Tensor | None, cu_k: torch.Tensor | None, max_q: int, max_k: int, causal: bool,
                dropout_p: float, scale: float, seed: torch.Tensor,
                backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return _fwd_op(backend)(q, k, v, mask, cu_q, cu_k, max_q, max_k, causal, dropout_p, scale, int(seed))


@torch.library.custom_op("fastllm::attention_bwd_seeded", mutates_args=())
def _bwd_seeded(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                lse: torch.Tensor, mask: torch.Tensor | None, cu_q: torch.Tensor | None,
                cu_k: torch.Tensor | None, max_q: int, max_k: int, causal: bool, dropout_p: float,
                scale: float, seed: torch.Tensor, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _bwd_op(backend)(dout, q, k, v, out, lse, mask, cu_q, cu_k, max_q, max_k, causal, dropout_p, scale,
                            int(seed))


_fwd_seeded.register_fake(lambda *a: _fwd_fake(*a[:12]))
_bwd_seeded.register_fake(lambda *a: _bwd_fake(*a[:15]))


def _seeded_setup_context(ctx, inputs, output):
    q, k, v, mask, cu_q, cu_k, *ctx.args, seed, ctx.backend = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], mask, cu_q, cu_k, seed)
    ctx.set_materialize_grads(False)


def _seeded_backward(ctx, dout, _dlse):
    q, k, v, out, lse, mask, cu_q, cu_k, seed = ctx.saved_tensors
    dout = torch.zeros_like(out) if dout is None else _layout(dout, ctx.backend != "triton")
    dq, dk, dv = _bwd_seeded(dout, q, k, v, out, lse, mask, cu_q, cu_k, *ctx.args, seed, ctx.backend)
    return dq, dk, dv, *([None] * 10)


_fwd_seeded.register_autograd(_seeded_backward, setup_context=_seeded_setup_context)


# ------------------------------------------------------------------------------------------------ checks
def _check_qkv(q, k, v, dims: int, name: str) -> None:
    for n_, t in (("q", q), ("k", k), ("v", v)):
        check_float(n_, t)
        if t.dim() != dims:
            raise ValueError(f"{name}: {n_} must have {dims} dims, got shape {tuple(t.shape)}")
        if t.dtype != q.dtype or t.device != q.device:
            raise ValueError(f"{name}: {n_} is {t.dtype} on {t.device} but q is {q.dtype} on {q.device}")
    if k.shape != v.shape:
        raise ValueError(f"{name}: k shape {tuple(k.shape)} != v shape {tuple(v.shape)}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"{name}: head dim of q ({q.shape[-1]}) != head dim of k ({k.shape[-1]})")
    h, hkv = q.shape[1], k.shape[1]
    if hkv == 0 or h % hkv:
        raise ValueError(f"{name}: the number of query heads ({h}) must be a multiple of kv heads ({hkv})")


def _check_common(dropout_p: float, name: str) -> None:
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{name}: dropout_p must be in [0, 1), got {dropout_p}")


def _check_mask(mask, q, k) -> None:
    if mask is None:
        return
    b, tk = q.shape[0], k.shape[2]
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"attention: key_padding_mask must be a bool tensor (True = attend), got "
                        f"{getattr(mask, 'dtype', type(mask))}")
    if tuple(mask.shape) != (b, tk):
        raise ValueError(f"attention: key_padding_mask has shape {tuple(mask.shape)} but expected (B, Tk) = {(b, tk)}")
    if k.shape[0] != b:
        raise ValueError(f"attention: batch of k ({k.shape[0]}) != batch of q ({b})")


def _check_cu(cu, name: str, total: int, max_len: int) -> torch.Tensor:
    if not isinstance(cu, torch.Tensor) or cu.dim() != 1 or cu.numel() < 1 or cu.is_floating_point():
        raise ValueError(f"attention_varlen: {name} must be a 1-D integer tensor (batch + 1,)")
    if not torch.compiler.is_compiling():
        lens = cu.diff()
        if int(cu[0]) != 0 or int(cu[-1]) != total:
            raise ValueError(f"attention_varlen: {name} must start at 0 and end at the token count {total}")
        if bool((lens < 0).any()):
            raise ValueError(f"attention_varlen: {name} must be non-decreasing, got {cu.tolist()}")
        if lens.numel() and int(lens.max()) > max_len:
            raise ValueError(f"attention_varlen: a sequence of {name} is longer than its max_seqlen {max_len}")
    return cu.to(torch.int32).contiguous()


def _seed(dropout_p: float, generator_seed: int | None) -> int | torch.Tensor:
    if dropout_p == 0.0:
        return 0
    if generator_seed is not None:
        return int(generator_seed) & (2**63 - 1)
    drawn = torch.randint(0, 2**62, (), dtype=torch.int64)  # torch.manual_seed controls it
    return drawn if torch.compiler.is_compiling() else int(drawn.item())  # a tensor: see the module doc


def _backend(name_op: str, q: torch.Tensor, backend: str) -> str:
    name = backends.select(name_op, q.device, backend)
    if q.dtype == torch.float64 and backend == "auto":
        return "reference"  # the only backend with float64; the fused kernels take fp32/bf16/fp16
    if name != "reference" and q.dtype == torch.float64:
        raise TypeError(f"{name_op}: the {name} backend supports float32/bfloat16/float16, not float64")
    if name == "cuda" and backend == "auto" and (q.dtype == torch.float32 or q.shape[-1] not in (32, 64, 128)):
        return "triton"  # the CUDA kernel covers bf16/fp16 and head dims 32/64/128; Triton covers the rest
    return name


def _fwd_op(name: str):
    if name == "triton":
        from fastllm.kernels import attention as kernel  # lazy: triton is optional

        return kernel.attention_fwd_op()
    return torch.ops.fastllm.attention_fwd


def _bwd_op(name: str):
    if name == "triton":
        _fwd_op(name)  # registers the Triton ops
        return torch.ops.fastllm.attention_bwd_triton
    return torch.ops.fastllm.attention_bwd


def _run_fwd(name: str, q, k, v, mask, cu_q, cu_k, max_q: int, max_k: int, causal: bool, dropout_p: float,
             scale: float, seed: int | torch.Tensor) -> torch.Tensor:
    strided = name != "triton"
    args = (_layout(q, strided), _layout(k, strided), _layout(v, strided), mask, cu_q, cu_k, max_q, max_k, causal,
            dropout_p, scale)
    if isinstance(seed, torch.Tensor):  # drawn under torch.compile
        return _fwd_seeded(*args, seed, name)[0]
    return _fwd_op(name)(*args, seed)[0]


# ------------------------------------------------------------------------------------------------ public
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
              key_padding_mask: torch.Tensor | None = None, dropout_p: float = 0.0, scale: float | None = None,
              generator_seed: int | None = None, backend: str = "auto") -> torch.Tensor:
    """Attention of q (B, H, Tq, D) over k, v (B, Hkv, Tk, D); returns (B, H, Tq, D). See the module doc."""
    _check_qkv(q, k, v, 4, "attention")
    _check_mask(key_padding_mask, q, k)
    _check_common(dropout_p, "attention")
    if k.shape[0] != q.shape[0]:
        raise ValueError(f"attention: batch of k ({k.shape[0]}) != batch of q ({q.shape[0]})")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    seed = _seed(dropout_p, generator_seed)
    name = _backend("attention", q, backend)
    if name == "reference":
        return reference.attention(q, k, v, causal, key_padding_mask, dropout_p, scale, seed)
    mask = None if key_padding_mask is None else key_padding_mask.contiguous()
    return _run_fwd(name, q, k, v, mask, None, None, q.shape[2], k.shape[2], bool(causal), float(dropout_p),
                    scale, seed)


def attention_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                     cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, *, causal: bool = False,
                     dropout_p: float = 0.0, scale: float | None = None, generator_seed: int | None = None,
                     backend: str = "auto") -> torch.Tensor:
    """Attention over packed sequences: q (total_q, H, D), k, v (total_k, Hkv, D); sequence b holds rows
    cu_seqlens[b]:cu_seqlens[b + 1] and never attends across its boundary. Returns (total_q, H, D)."""
    _check_qkv(q, k, v, 3, "attention_varlen")
    _check_common(dropout_p, "attention_varlen")
    cu_q = _check_cu(cu_seqlens_q, "cu_seqlens_q", q.shape[0], max_seqlen_q)
    cu_k = _check_cu(cu_seqlens_k, "cu_seqlens_k", k.shape[0], max_seqlen_k)
    if cu_q.numel() != cu_k.numel():
        raise ValueError(f"attention_varlen: cu_seqlens_q has {cu_q.numel()} entries, cu_seqlens_k {cu_k.numel()}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    seed = _seed(dropout_p, generator_seed)
    name = _backend("attention_varlen", q, backend)
    if name == "reference":
        return reference.attention_varlen(q, k, v, cu_q, cu_k, causal, dropout_p, scale, seed)
    return _run_fwd(name, q, k, v, None, cu_q, cu_k, int(max_seqlen_q), int(max_seqlen_k), bool(causal),
                    float(dropout_p), scale, seed)
