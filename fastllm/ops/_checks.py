"""Argument checks shared by every backend of an op, so that bad input fails the same way everywhere.

Invariant: each error names the argument and what is wrong with it (shape, dtype, device, value).
"""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def check_float(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (float32/bfloat16/float16), got {t.dtype}")


def check_like(name: str, t: torch.Tensor | None, ref: torch.Tensor, shape: tuple[int, ...]) -> None:
    """`t` (optional) must have `shape` and the dtype and device of `ref`."""
    if t is None:
        return
    check_float(name, t)
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(t.shape)} but expected {tuple(shape)}")
    if t.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but the input has {ref.dtype}")
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but the input is on {ref.device}")
