"""Dropout benchmark: torch F.dropout (eager, optionally torch.compile) and each fastllm backend, forward and
forward+backward.

Prints a markdown table: shape, variant, pass, median ms, GB/s (ideal bytes moved / time: read x, write y;
backward read dy, write dx) and the ratio of speed to torch eager F.dropout in the same run (> 1 is faster).
Every call draws a fresh seed (fastllm) or mask (torch), as in training, except the "dispatcher op only" rows,
which call torch.ops.fastllm.dropout_fwd with a fixed seed tensor to show the kernel without the Python wrapper
(argument checks, seed draw). The Triton interpreter (CPU) is not timed: it is a test tool, not a backend for
speed.

    python benchmarks/bench_dropout.py [--device cpu|cuda] [--dtype float32] [--threads 2] [--p 0.1]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import copy_row, median_time, print_table, setup  # noqa: E402

from fastllm.ops import backends, dropout  # noqa: E402

SHAPES = [(512, 768), (512, 3072), (8192, 768)]


def _variants(device: str, p: float, compile_: bool, reference: bool):
    """name -> fn(x) for every implementation to time."""
    def eager(x):
        return F.dropout(x, p, training=True)

    out = {"torch F.dropout": eager}
    if compile_:
        torch._dynamo.reset()  # a fresh compile per configuration, never the recompile-limit eager fallback
        out["torch.compile F.dropout"] = torch.compile(eager)
    for name in backends.available("dropout", device):
        if (name == "triton" and device == "cpu") or (name == "reference" and not reference):
            continue
        out[f"fastllm {name}"] = (lambda x, n=name: dropout(x, p, backend=n))
        if name == device:  # the dispatcher op alone (fixed seed): what the Python wrapper adds per call
            seed = torch.tensor(1234)
            out[f"fastllm {name}, dispatcher op only"] = (lambda x, s=seed: torch.ops.fastllm.dropout_fwd(x, p, s))
    return out


def _ideal_bytes(numel: int, elem: int, backward: bool) -> int:
    return (4 if backward else 2) * numel * elem  # fwd: read x, write y; bwd: read dy, write dx


def _time_one(fn, x, backward: bool, device: str, repeats: int) -> float:
    dy = torch.randn_like(x)

    def step():
        y = fn(x)
        if backward:
            y.backward(dy)

    return median_time(step, device, repeats=repeats)


def run(args) -> None:
    dtype = getattr(torch, args.dtype)
    rows = []
    for (m, n) in SHAPES:
        rows.append(copy_row(m, n, dtype, args.device, args.repeats))
        for backward in (False, True):
            x = torch.randn(m, n, generator=torch.Generator().manual_seed(0)).to(args.device, dtype)
            x.requires_grad_(backward)
            base = None
            for name, fn in _variants(args.device, args.p, args.compile, args.reference).items():
                sec = _time_one(fn, x, backward, args.device, args.repeats)
                base = base or sec
                gbs = _ideal_bytes(x.numel(), x.element_size(), backward) / sec / 1e9
                rows.append([f"({m}, {n})", name, "fwd+bwd" if backward else "fwd", f"{sec * 1e3:.3f}",
                             f"{gbs:.1f}", f"{base / sec:.2f}x"])
    print_table(["shape", "variant", "pass", "median ms", "GB/s", "speed vs torch eager"], rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="default: float32 on cpu, bfloat16 on cuda")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--p", type=float, default=0.1, help="dropout probability (BERT's is 0.1)")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="skip torch.compile")
    p.add_argument("--no-reference", dest="reference", action="store_false", help="skip the reference backend")
    args = p.parse_args()
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    print(f"# bench_dropout: {setup(args.threads)}, dtype={args.dtype}, device={args.device}, p={args.p}\n")
    run(args)


if __name__ == "__main__":
    main()
