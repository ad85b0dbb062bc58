"""The error-ratio rule of ARCHITECTURE.md, shared by every op test.

A kernel output passes when max|kernel - ref64| <= 2 * max|torch_same_dtype - ref64| + atol: it may be at most
twice as far from the float64 truth as plain PyTorch computing the same thing in the same dtype. `atol`
absorbs the cases where PyTorch happens to be (near) exact: see `default_atol`.
"""
from __future__ import annotations

import torch

# Unit roundoff of each dtype.
EPS = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def default_atol(ref64: torch.Tensor, dtype: torch.dtype, n_terms: int = 1) -> float:
    """A few roundoffs of the largest reference value, times sqrt(terms summed) for reductions: a different
    summation order of n terms moves a sum by ~sqrt(n) roundoffs of its magnitude even when both are right."""
    scale = ref64.abs().max().item() if ref64.numel() else 0.0
    return 4.0 * EPS[dtype] * max(scale, 1e-6) * max(1.0, n_terms**0.5)


def assert_close_ratio(name: str, got: torch.Tensor, torch_same: torch.Tensor, ref64: torch.Tensor,
                       atol: float) -> None:
    err = (got.double() - ref64).abs().max().item() if ref64.numel() else 0.0
    base = (torch_same.double() - ref64).abs().max().item() if ref64.numel() else 0.0
    assert err <= 2 * base + atol, f"{name}: error {err:.3e} > 2 * torch error {base:.3e} + atol {atol:.3e}"
