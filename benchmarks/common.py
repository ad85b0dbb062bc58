"""Shared timing helpers for the benchmarks: median wall time after warm-up, fixed threads, a markdown table.

Invariant: benchmarks time and print; they never assert. Every ratio is against a baseline timed in the same run.
"""
from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable

import torch


def setup(threads: int) -> str:
    """Fixes the thread count and returns a one-line description of the machine and settings."""
    torch.set_num_threads(threads)
    cpu = platform.processor() or platform.machine()
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    alloc = os.environ.get("GLIBC_TUNABLES", "glibc default malloc thresholds")
    return f"torch {torch.__version__}, {cpu}, {gpu}, threads={threads}, allocator: {alloc}"


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def median_time(fn: Callable[[], object], device: str, warmup: int = 5, repeats: int = 20) -> float:
    """Median seconds of fn() over `repeats` runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def print_table(header: list[str], rows: list[list[str]]) -> None:
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


def copy_row(m: int, n: int, dtype, device: str, repeats: int) -> list[str]:
    """A table row for a device-to-device copy of an (m, n) tensor: the bandwidth ceiling of elementwise kernels."""
    x = torch.randn(m, n, device=device, dtype=dtype)
    out = torch.empty_like(x)
    sec = median_time(lambda: out.copy_(x), device, repeats=repeats)
    return [f"({m}, {n})", "copy (bandwidth ceiling)", "fwd", f"{sec * 1e3:.3f}",
            f"{2 * x.numel() * x.element_size() / sec / 1e9:.1f}", "-"]
