"""Which kernel backend runs each fastllm op: `available(op, device)` and `select(op, device, requested)`.

Backends: `reference` (plain PyTorch, always available), `cpu` (C++ in fastllm._C), `cuda` (.cu in
fastllm._C), `triton` (fastllm.kernels.<op>). The choice is made once, when a module is built (or per call of
the functional API, through a cache), never by probing inside forward().

`FASTLLM_KERNELS` = `auto` | a backend name | `op=backend,op=backend` overrides `requested="auto"`.
An explicit request for an unavailable backend raises BackendUnavailable naming the op, the backend and why;
there is never a silent fallback. `auto` takes the first available backend of AUTO_ORDER for the device.
"""
from __future__ import annotations

import functools
import importlib.util
import logging
import os

import torch

from fastllm import _ext

BACKENDS = ("cuda", "triton", "cpu", "reference")

# Fastest first, per device type. CPU: the C++ kernels beat plain PyTorch at every shape of
# benchmarks/bench_<op>.py (benchmarks/RESULTS.md, 2 threads); the Triton interpreter is a test tool, never
# auto. CUDA: the .cu kernels first, then Triton — the expected order, not yet measured on a GPU here;
# scripts/gpu_check.sh times both and RESULTS.md records what it found.
AUTO_ORDER = {"cpu": ("cpu", "reference"), "cuda": ("cuda", "triton", "reference")}

# op name -> the dispatcher op whose kernel registration proves the cpu/cuda backend exists.
NATIVE_OPS = {"layer_norm": "fastllm::layer_norm_fwd", "attention": "fastllm::attention_fwd",
              "attention_varlen": "fastllm::attention_fwd", "cross_entropy": "fastllm::cross_entropy_fwd",
              "linear_cross_entropy": "fastllm::linear_cross_entropy_fwd", "dropout": "fastllm::dropout_fwd"}

log = logging.getLogger("fastllm")


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run the op on the device."""


def _device_type(device) -> str:
    return torch.device(device).type


def _native_reason(op: str, key: str) -> str | None:
    status = _ext.load()
    if not status.loaded:
        return f"the compiled extension fastllm._C did not load: {status.error}"
    if not torch._C._dispatch_has_kernel_for_dispatch_key(NATIVE_OPS[op], key):
        return f"fastllm._C was built without a {key} kernel for {NATIVE_OPS[op]}"
    return None


def _triton_reason(dev: str) -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton)"
    if dev == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return "triton runs on CPU tensors only under TRITON_INTERPRET=1"
    if dev == "cuda" and not torch.cuda.is_available():
        return "no CUDA device is available"
    if dev not in ("cpu", "cuda"):
        return f"triton does not run on {dev} tensors"
    return None


def why_unavailable(op: str, backend: str, device) -> str | None:
    """None when `backend` can run `op` on `device`, else the reason."""
    if op not in NATIVE_OPS:
        raise ValueError(f"unknown op {op!r}; known ops: {', '.join(sorted(NATIVE_OPS))}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r} for {op}; choose one of {', '.join(BACKENDS)} or auto")
    dev = _device_type(device)
    if backend == "reference":
        return None
    if backend == "triton":
        return _triton_reason(dev)
    if backend != dev:
        return f"the {backend} backend runs on {backend} tensors, not {dev}"
    return _native_reason(op, backend.upper())


def available(op: str, device) -> list[str]:
    """Backends that can run `op` on `device`, fastest first (auto's order; triton-on-CPU last)."""
    order = AUTO_ORDER.get(_device_type(device), ("reference",))
    extra = [b for b in BACKENDS if b not in order]
    return [b for b in (*order, *extra) if why_unavailable(op, b, device) is None]


def _env_request(op: str, spec: str) -> str:
    """The backend FASTLLM_KERNELS asks for `op` ('auto' when it says nothing about it)."""
    spec = spec.strip()
    if not spec or spec == "auto":
        return "auto"
    if "=" not in spec:
        return spec
    for item in spec.split(","):
        name, sep, backend = item.partition("=")
        if not sep or not name.strip() or not backend.strip():
            raise ValueError(f"FASTLLM_KERNELS item {item!r} is not of the form op=backend")
        if name.strip() == op:
            return backend.strip()
    return "auto"


@torch.compiler.assume_constant_result  # a pure function of its arguments and the environment at build time
def select(op: str, device, requested: str = "auto") -> str:
    """The backend that runs `op` on `device`: `requested`, or for 'auto' FASTLLM_KERNELS, else the fastest.
    The environment is read only for 'auto': modules pass the name they resolved at build time, so their
    forward() never reads it."""
    env = os.environ.get("FASTLLM_KERNELS", "") if requested == "auto" else ""
    return _select(op, _device_type(device), requested, env)


@functools.cache
def _select(op: str, dev: str, requested: str, env: str) -> str:
    if requested == "auto":
        requested = _env_request(op, env)
    if requested == "auto":
        choice = available(op, dev)[0]
    else:
        reason = why_unavailable(op, requested, dev)
        if reason is not None:
            raise BackendUnavailable(f"{op}: backend {requested!r} is unavailable on {dev}: {reason}")
        choice = requested
    log.info("fastllm: %s on %s uses the %s backend", op, dev, choice)
    return choice
