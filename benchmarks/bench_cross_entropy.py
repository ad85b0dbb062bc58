"""Cross-entropy benchmark: naive F.linear + F.cross_entropy against fastllm.ops.linear_cross_entropy (each
backend of the device), and F.cross_entropy against fastllm.ops.cross_entropy, forward+backward.

Shapes: BERT MLM head (N = 608 and 4096 rows, H = 768, V = 30522) and GPT-2 LM head (N = 8192, H = 768,
V = 50257); `--quick` runs only BERT N = 608. Prints a markdown table: median ms over repeats after warm-up,
peak memory of one forward+backward step and both as ratios to the naive variant of the same run (< 1 is better).
Peak memory is measured in a fresh subprocess per (shape, variant): on CPU the rise of ru_maxrss over its value
just before the first step (inputs, weights and their .grad buffers already allocated), on CUDA
max_memory_allocated minus the memory allocated before the step. The Triton interpreter (CPU) is not timed.

    python benchmarks/bench_cross_entropy.py [--quick] [--device cpu|cuda] [--dtype float32] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median_time, print_table, setup

from fastllm.ops import backends, cross_entropy, linear_cross_entropy

SHAPES = [("BERT", 608, 768, 30522), ("BERT", 4096, 768, 30522), ("GPT-2", 8192, 768, 50257)]
IGNORED = 0.0  # fraction of rows labelled -100 (an MLM batch has ~85%; 0 times the worst case)


def _variants(device: str) -> list[str]:
    names = [b for b in backends.available("linear_cross_entropy", device)
             if b != "reference" and not (b == "triton" and device == "cpu")]
    return ["naive"] + names


def _inputs(n, h, v, dtype, device):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, h, generator=g).to(device, dtype).requires_grad_(True)  # (N, H)
    weight = (torch.randn(v, h, generator=g) * h**-0.5).to(device, dtype).requires_grad_(True)  # (V, H)
    bias = torch.zeros(v, device=device, dtype=dtype, requires_grad=True)  # (V,)
    labels = torch.randint(0, v, (n,), generator=g)  # (N,)
    labels[torch.rand(n, generator=g) < IGNORED] = -100
    return hidden, weight, bias, labels.to(device)


def _step_fn(kind: str, variant: str, tensors):
    hidden, weight, bias, labels = tensors
    if kind == "linear":
        if variant == "naive":
            return lambda: F.cross_entropy(F.linear(hidden, weight, bias), labels).backward()
        return lambda: linear_cross_entropy(hidden, weight, labels, bias=bias, backend=variant).backward()
    logits = F.linear(hidden, weight, bias).detach().requires_grad_(True)  # (N, V)
    if variant == "naive":
        return lambda: F.cross_entropy(logits, labels).backward()
    return lambda: cross_entropy(logits, labels, backend=variant).backward()


def _zero_grads(tensors):
    for t in tensors[:3]:
        t.grad = torch.zeros_like(t)  # allocated before the baseline: both variants write the same grads


def worker(args) -> None:
    """One (kind, shape, variant) in this fresh process: prints {"peak_mib": .., "ms": ..} as JSON."""
    torch.set_num_threads(args.threads)
    n, h, v = args.shape
    tensors = _inputs(n, h, v, getattr(torch, args.dtype), args.device)
    _zero_grads(tensors)
    step = _step_fn(args.kind, args.variant, tensors)
    if args.device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        step()
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024
    sec = median_time(step, args.device, warmup=1, repeats=args.repeats)
    print(json.dumps({"peak_mib": peak / 2**20, "ms": sec * 1e3}))


def _measure(args, kind, shape, variant) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--kind", kind, "--variant", variant, "--device", args.device,
           "--dtype", args.dtype, "--threads", str(args.threads), "--repeats", str(args.repeats),
           "--shape", *map(str, shape)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy(), check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{kind} {shape} {variant} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(args) -> None:
    rows = []
    for name, n, h, v in SHAPES[:1] if args.quick else SHAPES:
        for kind in ("linear", "plain"):
            base = None
            for variant in _variants(args.device):
                r = _measure(args, kind, (n, h, v), variant)
                base = base or r
                label = ("F.linear + F.cross_entropy" if kind == "linear" else "F.cross_entropy") \
                    if variant == "naive" else (f"linear_cross_entropy {variant}" if kind == "linear"
                                                else f"cross_entropy {variant}")
                rows.append([f"{name} N={n} H={h} V={v}", label, f"{r['ms']:.1f}", f"{r['peak_mib']:.0f}",
                             f"{r['ms'] / base['ms']:.2f}x", f"{r['peak_mib'] / max(base['peak_mib'], 1e-9):.3f}x"])
                print(" | ".join(rows[-1]), file=sys.stderr, flush=True)  # progress: a full run takes minutes
    print_table(["shape", "variant (fwd+bwd)", "median ms", "peak MiB", "time vs naive", "memory vs naive"], rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="default: float32 on cpu, bfloat16 on cuda")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="only the BERT N=608 shape")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--kind", default="linear", help=argparse.SUPPRESS)
    p.add_argument("--variant", default="naive", help=argparse.SUPPRESS)
    p.add_argument("--shape", type=int, nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    if args.worker:
        worker(args)
        return
    print(f"# bench_cross_entropy: {setup(args.threads)}, dtype={args.dtype}, device={args.device}, "
          f"ignored rows={IGNORED:.0%}, peak memory per fresh subprocess\n")
    run(args)


if __name__ == "__main__":
    main()
