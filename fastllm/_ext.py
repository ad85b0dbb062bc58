"""Loads the compiled op library fastllm._C once, and remembers why it failed when it did.

Invariant: `load()` never raises; a missing or broken extension yields ExtensionStatus(loaded=False, error=...)
and exactly one warning, so that `import fastllm` works without a compiler and ops fall back to `reference`.
"""
from __future__ import annotations

import functools
import importlib
import warnings
from dataclasses import dataclass


@dataclass(frozen=True)
class ExtensionStatus:
    loaded: bool
    error: str = ""
    cuda: bool = False  # the library was compiled with CUDA kernels


@functools.cache
def load() -> ExtensionStatus:
    import torch

    try:
        importlib.import_module("fastllm._C")
    except ImportError as err:
        msg = f"fastllm._C could not be imported ({err}); all ops use the slow reference backend"
        warnings.warn(msg, RuntimeWarning, stacklevel=2)
        return ExtensionStatus(False, str(err))
    cuda = torch._C._dispatch_has_kernel_for_dispatch_key("fastllm::layer_norm_fwd", "CUDA")
    return ExtensionStatus(True, "", cuda)
