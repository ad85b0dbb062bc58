"""Attention benchmark: fastllm.ops.attention (each backend) against torch F.scaled_dot_product_attention.

Cases: (B, H, T, D) in SHAPES, causal or not, with a key padding mask (SDPA gets the equivalent boolean
attn_mask (B, 1, 1, T)), with dropout 0.1; forward and forward+backward. Prints a markdown table: median ms,
GFLOP/s (4 B H Tq Tk D flops forward, 3.5x that for forward+backward, whose backward is 2.5x the forward;
halved when causal), peak memory above the inputs (CPU: the largest RSS growth is not tracked by torch, so the
CPU column uses the profiler's allocator peak), and the speed ratio to the first SDPA row of the case in the
same run (> 1 is faster). The Triton interpreter (CPU) is not timed.

    python benchmarks/bench_attention.py [--quick] [--long] [--device cpu|cuda] [--dtype float32]
                                         [--threads 2]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median_time, print_table, setup  # noqa: E402

from fastllm.ops import attention, backends  # noqa: E402

SHAPES = [(8, 12, 128, 64), (8, 12, 512, 64), (2, 12, 2048, 64)]
CASES = [("plain", False, False, 0.0), ("causal", True, False, 0.0), ("padding mask", False, True, 0.0),
         ("causal+mask", True, True, 0.0), ("dropout 0.1", False, False, 0.1)]
QUICK = ([(8, 12, 128, 64), (2, 12, 512, 64)], [CASES[0], CASES[2], CASES[4]])
# --long: the GPU target of issue 3 (bf16 forward TFLOP/s >= SDPA's flash backend at D = 64, 128 and
# T = 2048-8192); on CUDA these rows are timed against SDPA pinned to its flash backend ("torch SDPA flash",
# the ratio's base).
LONG = ([(4, 16, 2048, 64), (2, 16, 4096, 64), (1, 16, 8192, 64), (4, 16, 2048, 128), (2, 16, 4096, 128),
         (1, 16, 8192, 128)], [CASES[0], CASES[1]])


def _sdpa_flash(q, k, v, causal, mask, p):
    from torch.nn.attention import SDPBackend, sdpa_kernel  # CUDA only; the flash backend takes no mask

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=causal)


def _variants(device: str, flash_base: bool = False):
    def sdpa(q, k, v, causal, mask, p):
        attn_mask = None if mask is None else mask[:, None, None, :]  # (B, 1, 1, T)
        if attn_mask is not None and causal:
            t = q.shape[2]
            attn_mask = attn_mask & torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
            causal = False
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=p, is_causal=causal)

    out = {"torch SDPA flash": _sdpa_flash, "torch SDPA": sdpa} if flash_base else {"torch SDPA": sdpa}
    for name in backends.available("attention", device):
        if name in ("reference",) or (name == "triton" and device == "cpu"):
            continue
        out[f"fastllm {name}"] = (lambda q, k, v, c, m, p, n=name:
                                  attention(q, k, v, causal=c, key_padding_mask=m, dropout_p=p, backend=n))
    return out


def _peak_bytes(fn, device: str) -> int:
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        return torch.cuda.max_memory_allocated() - base
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    peak, cur = 0, 0
    for e in sorted(prof.events(), key=lambda e: e.time_range.start):
        cur += e.cpu_memory_usage if e.cpu_memory_usage and not e.cpu_children else 0
        peak = max(peak, cur)
    return peak


def _bench_case(shape, case, args, rows, flash_base=False):
    b, h, t, d = shape
    label, causal, masked, p = case
    dtype = getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, h, t, d, generator=g).to(args.device, dtype).requires_grad_(True) for _ in range(3))
    mask = None
    if masked:
        lens = torch.randint(t // 2, t + 1, (b,), generator=g)
        mask = (torch.arange(t)[None, :] < lens[:, None]).to(args.device)  # (B, T)
    flops = 4 * b * h * t * t * d * (0.5 if causal else 1.0)
    for backward in (False, True):
        base = None
        for name, fn in _variants(args.device, flash_base).items():
            grad = torch.randn(b, h, t, d, device=args.device, dtype=dtype)

            def step():
                out = fn(q, k, v, causal, mask, p)
                if backward:
                    out.backward(grad)

            sec = median_time(step, args.device, warmup=2, repeats=args.repeats)
            base = base or sec
            peak = _peak_bytes(step, args.device) / 2**20
            rate = flops * (3.5 if backward else 1.0) / sec / 1e9
            rows.append([str(shape), label, name, "fwd+bwd" if backward else "fwd", f"{sec * 1e3:.2f}",
                         f"{rate:.1f}", f"{peak:.1f}", f"{base / sec:.2f}x"])


def run(args) -> None:
    sets = [(QUICK if args.quick else (SHAPES, CASES), False)]
    if args.long:
        sets.append((LONG, args.device == "cuda"))
    rows = []
    for (shapes, cases), flash_base in sets:
        for shape in shapes:
            for case in cases:
                _bench_case(shape, case, args, rows, flash_base)
    print_table(["(B, H, T, D)", "case", "impl", "pass", "median ms", "GFLOP/s", "peak MiB",
                 "speed vs first SDPA row"], rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="default: float32 on cpu, bfloat16 on cuda")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="a small subset of shapes and cases")
    p.add_argument("--long", action="store_true",
                   help="also T = 2048-8192 at D = 64 and 128 (the GPU target)")
    args = p.parse_args()
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    print(f"# bench_attention: {setup(args.threads)}, dtype={args.dtype}, device={args.device}\n")
    run(args)


if __name__ == "__main__":
    main()
