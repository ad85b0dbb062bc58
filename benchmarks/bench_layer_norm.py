"""LayerNorm benchmark: torch eager, torch.compile and each fastllm backend, forward and forward+backward.

Also residual+LN: fastllm's fused `layer_norm(x, residual=r)` against torch `x + r` then F.layer_norm.
Prints a markdown table: shape, variant, pass, median ms, GB/s (ideal bytes moved / time) and the ratio of
speed to torch eager in the same run (> 1 is faster). The Triton interpreter (CPU) is not timed: it is a test
tool, not a backend for speed.

    python benchmarks/bench_layer_norm.py [--device cpu|cuda] [--dtype float32] [--threads 2]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import copy_row, median_time, print_table, setup  # noqa: E402

from fastllm.ops import backends, layer_norm  # noqa: E402

SHAPES = [(8192, 768), (4096, 1024), (16384, 4096)]


def _variants(device: str, residual: bool, compile_: bool):
    """name -> fn(x, w, b, r) for every implementation to time."""
    def eager(x, w, b, r):
        if r is None:
            return F.layer_norm(x, (x.shape[-1],), w, b)
        h = x + r
        return F.layer_norm(h, (x.shape[-1],), w, b), h

    out = {"torch eager": eager}
    if compile_:
        torch._dynamo.reset()  # a fresh compile per configuration, never the recompile-limit eager fallback
        out["torch.compile"] = torch.compile(eager)
    for name in backends.available("layer_norm", device):
        if name == "triton" and device == "cpu":
            continue
        out[f"fastllm {name}"] = (lambda x, w, b, r, n=name: layer_norm(x, w, b, 1e-5, r, backend=n))
    return out


def _ideal_bytes(m: int, n: int, elem: int, residual: bool, backward: bool) -> int:
    fwd = (4 if residual else 2) * m * n * elem  # read x (+ r), write y (+ h)
    bwd = (4 if residual else 3) * m * n * elem  # read dy, h (+ dh), write dx
    return fwd + (bwd if backward else 0)


def _time_one(fn, x, w, b, r, backward: bool, device: str, repeats: int) -> float:
    """With a residual, the backward flows into both y and h, as in a pre-LN block where h = x + r is the
    residual stream that continues to the next block."""
    dy, dh = torch.randn_like(x), torch.randn_like(x)

    def step():
        out = fn(x, w, b, r)
        if backward:
            outs, grads = (list(out), [dy, dh]) if isinstance(out, tuple) else ([out], [dy])
            torch.autograd.backward(outs, grads)

    return median_time(step, device, repeats=repeats)


def run(args) -> None:
    dtype = getattr(torch, args.dtype)
    rows = []
    for (m, n) in SHAPES:
        rows.append(copy_row(m, n, dtype, args.device, args.repeats))
        for residual in (False, True):
            for backward in (False, True):
                g = torch.Generator().manual_seed(0)
                x, w, b = (torch.randn(*s, generator=g).to(args.device, dtype) for s in ((m, n), (n,), (n,)))
                r = torch.randn(m, n, generator=g).to(args.device, dtype) if residual else None
                for t in (x, w, b, r) if backward else ():
                    if t is not None:
                        t.requires_grad_(True)
                base = None
                for name, fn in _variants(args.device, residual, args.compile).items():
                    sec = _time_one(fn, x, w, b, r, backward, args.device, args.repeats)
                    base = base or sec
                    gbs = _ideal_bytes(m, n, x.element_size(), residual, backward) / sec / 1e9
                    rows.append([f"({m}, {n})", ("residual+LN " if residual else "LN ") + name,
                                 "fwd+bwd" if backward else "fwd", f"{sec * 1e3:.3f}", f"{gbs:.1f}",
                                 f"{base / sec:.2f}x"])
    print_table(["shape", "variant", "pass", "median ms", "GB/s", "speed vs torch eager"], rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="default: float32 on cpu, bfloat16 on cuda")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--no-compile", dest="compile", action="store_false", help="skip torch.compile")
    args = p.parse_args()
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    print(f"# bench_layer_norm: {setup(args.threads)}, dtype={args.dtype}, device={args.device}\n")
    run(args)


if __name__ == "__main__":
    main()
