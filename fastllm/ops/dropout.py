"""Standalone dropout with a counter-based hash mask: `dropout(x, p, *, seed=None, backend="auto")`.

Invariants:
- y = keep * x / (1 - p), keep for flat index n (row-major over the contiguous x) being the counter hash of
  (seed, n) documented in fastllm.ops.reference (dropout_mask). Every backend gives the same bits for the same
  seed: reference, cpu/cuda (torch.ops.fastllm.dropout_fwd, csrc/dropout/), triton (fastllm.kernels.dropout).
  A dropped element is +0 even where x is inf or NaN. bf16/fp16 are computed in fp32 and rounded to the input
  dtype; float64 runs in float64 on reference/cpu/cuda (Triton takes float32/bfloat16/float16).
- Nothing but the seed (a 0-d int64 CPU tensor) and p is saved for the backward: it is the same op applied
  to the gradient, the mask regenerated from the seed. Double backward works (the op is linear).
- seed=None draws a 63-bit seed from torch's default CPU generator (torch.manual_seed controls it); an int seed
  is taken mod 2^64. Under torch.compile the seed is drawn inside the graph as a CPU int64 tensor and the op
  reads it when it runs: no graph break, no device sync (inductor's RNG draws it, so compiled and eager masks
  differ; both are valid).
- p must be a number in [0, 1) (ValueError naming p otherwise); p == 0 returns x itself, without an op call.
  A non-contiguous x is made contiguous first (a copy); the mask indexes that copy, so the output is contiguous.
- The dispatcher ops have fake kernels and autograd formulas registered here (torch.compile, opcheck).
"""
from __future__ import annotations

import numbers

import torch

from fastllm import _ext
from fastllm.ops import backends, reference
from fastllm.ops._checks import check_float

__all__ = ["dropout"]

SEED_HIGH = 2**63 - 1  # seeds are drawn from [0, 2^63 - 1): 63 random bits


def _fwd_fake(x, p, seed):
    return torch.empty_like(x)


def _setup_context(ctx, inputs, output):
    _, ctx.p, seed = inputs
    ctx.save_for_backward(seed)


def _make_backward(fwd_op):
    def backward(ctx, grad):
        (seed,) = ctx.saved_tensors
        return fwd_op(grad.contiguous(), ctx.p, seed), None, None

    return backward


def register(fwd_name: str, fwd_op) -> None:
    """Registers the fake kernel and the autograd formula (the op itself, same seed) of a dropout op."""
    torch.library.register_fake(fwd_name)(_fwd_fake)
    torch.library.register_autograd(fwd_name, _make_backward(fwd_op), setup_context=_setup_context)


if _ext.load().loaded and hasattr(torch.ops.fastllm, "dropout_fwd"):
    register("fastllm::dropout_fwd", torch.ops.fastllm.dropout_fwd)


def _check_p(p) -> float:
    if isinstance(p, bool) or not isinstance(p, numbers.Real):
        raise TypeError(f"dropout: p must be a float in [0, 1), got {type(p).__name__}")
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout: p must be in [0, 1), got p={p}")
    return float(p)


def _seed_tensor(seed: int | None) -> torch.Tensor:
    """The seed as a 0-d int64 CPU tensor: drawn from torch's default generator, or the given int mod 2^64."""
    if seed is None:
        return torch.randint(0, SEED_HIGH, (), dtype=torch.int64, device="cpu")
    s = int(seed) & (2**64 - 1)
    return torch.tensor(s - 2**64 if s >= 2**63 else s, dtype=torch.int64)  # the same 64 bits, as int64


def _backend(x: torch.Tensor, backend: str) -> str:
    name = backends.select("dropout", x.device, backend)
    if name == "triton" and x.dtype == torch.float64:
        raise TypeError("dropout: the triton backend supports float32/bfloat16/float16, not float64")
    return name


def _op(name: str):
    if name == "triton":
        from fastllm.kernels import dropout as kernel  # lazy: triton is optional

        return kernel.dropout_fwd_op()
    return torch.ops.fastllm.dropout_fwd


def dropout(x: torch.Tensor, p: float, *, seed: int | None = None, backend: str = "auto") -> torch.Tensor:
    """keep * x / (1 - p) with a counter-hash mask of (seed, flat index); see the module doc."""
    check_float("x", x)
    p = _check_p(p)
    name = _backend(x, backend)
    if p == 0.0:
        return x
    s = _seed_tensor(seed)
    x = x.contiguous()
    if name == "reference":
        return reference.dropout(x, p, s)
    return _op(name)(x, p, s)
