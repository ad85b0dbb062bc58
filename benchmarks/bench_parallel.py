"""Parallel-engine benchmarks on CPU gloo processes, one section per feature (run all or pick with --section).

Section "pipeline" (bench_pipeline): GPipe vs 1F1B on a small GPT (fp32, dropout 0) split over pp spawned gloo
processes, for several micro-batch counts m. Per configuration: the median step time (the slowest rank), the
measured bubble 1 - busy / step time per rank (busy = forward + backward compute; the rest is waiting for a
neighbour or transferring), the theory (p - 1) / (m + p - 1) for equal stages, and the peak activation memory
per stage: the largest number of bytes autograd held saved for backward at once (saved_tensors_hooks; each
storage counted once, parameters excluded), measured in one separate untimed step. GPipe holds all m micro-
batches' activations, 1F1B at most pp - stage.

Section "comm" (bench_comm): data parallelism (fastllm.parallel.data_parallel) at zero 0..3 on a small GPT
(fp32, dropout 0) over dp spawned gloo processes, m micro-batches per rank (all but the last under no_sync).
Per stage: the median step time (slowest rank), the bytes one rank sent per step (engine.comm_bytes, ring
formulas) next to the formula in units of the fp32 model size 4Ψ (DDP 2(N-1)/N, ZeRO-1 3(N-1)/N, ZeRO-2 2(N-1)/N,
ZeRO-3 (N-1)/N (m (1 + blocks/Ψ) + 1): a gather per forward, the blocks again per backward, one reduce-scatter),
and engine.memory_bytes() per rank between steps against 16Ψ, 8Ψ + 8Ψ/N, 4Ψ + 12Ψ/N, 16Ψ/N.
Times, never asserts. Usage: python benchmarks/bench_parallel.py [--section pipeline|comm] [--quick] [--threads 1]
Note: each process gets --threads intra-op threads; on a 2-vCPU machine shared with other jobs the bubble is noisy.
"""
from __future__ import annotations

import argparse
import datetime
import os
import pickle
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, setup


# ---------------------------------------------------------------------- spawning gloo processes
def _worker(rank: int, world: int, tmp: str, threads: int, fn, args) -> None:
    import torch.distributed as dist
    torch.set_num_threads(threads)
    try:
        dist.init_process_group("gloo", store=dist.FileStore(os.path.join(tmp, "store"), world), rank=rank,
                                world_size=world, timeout=datetime.timedelta(seconds=600))
        result = ("ok", fn(rank, world, *args))
    except BaseException as e:  # noqa: BLE001 (reported to the parent with its traceback)
        result = ("error", f"rank {rank}: {type(e).__name__}: {e}\n{traceback.format_exc()}")
    with open(os.path.join(tmp, f"{rank}.pkl"), "wb") as fh:
        pickle.dump(result, fh)
    if dist.is_initialized():
        dist.destroy_process_group()


def spawn(fn, world: int, threads: int, *args) -> list:
    """[fn(rank, world, *args) for each rank] from `world` spawned gloo processes of `threads` threads each."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_worker, args=(world, tmp, threads, fn, args), nprocs=world, start_method="spawn")
        results = []
        for r in range(world):
            with open(os.path.join(tmp, f"{r}.pkl"), "rb") as fh:
                results.append(pickle.load(fh))
    for status, value in results:
        if status == "error":
            raise RuntimeError(value)
    return [value for _, value in results]


# ---------------------------------------------------------------------- pipeline section
class SavedActivationMeter:
    """Live and peak bytes of tensors autograd saves for backward (storages counted once, parameters skipped)."""

    def __init__(self, params):
        self.skip = {p.untyped_storage().data_ptr() for p in params}
        self.refs: dict[int, list] = {}  # storage pointer -> [handles alive, bytes]
        self.live = self.peak = 0

    def _pack(self, t: torch.Tensor):
        key = t.untyped_storage().data_ptr()
        if key in self.skip:
            return t
        entry = self.refs.setdefault(key, [0, t.untyped_storage().nbytes()])
        if entry[0] == 0:
            self.live += entry[1]
            self.peak = max(self.peak, self.live)
        entry[0] += 1
        return _Saved(self, key, t)

    def _release(self, key: int) -> None:
        entry = self.refs[key]
        entry[0] -= 1
        if entry[0] == 0:
            self.live -= entry[1]
            del self.refs[key]

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self._pack, lambda s: s.tensor if isinstance(s, _Saved)
                                                        else s)


class _Saved:
    """A saved tensor; dropping it (autograd freed the graph) releases its bytes in the meter."""

    def __init__(self, meter: SavedActivationMeter, key: int, tensor: torch.Tensor):
        self.meter, self.key, self.tensor = meter, key, tensor

    def __del__(self):
        self.meter._release(self.key)


def _gpt_batches(cfg, m: int, batch: int, seq: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(m):
        ids = torch.randint(0, cfg.vocab_size, (batch, seq), generator=g)  # (B, T)
        out.append({"input_ids": ids, "labels": ids})
    return out


def _pipeline_worker(rank: int, world: int, cfg_kw: dict, batch: int, seq: int, cases: list, repeats: int):
    import torch.distributed as dist

    from fastllm.models import GPT, GPTConfig
    from fastllm.parallel.mesh import Mesh
    from fastllm.parallel.pipeline import PipelineStats, build_stage, run_schedule
    mesh = Mesh(pp=world)
    torch.manual_seed(0)
    cfg = GPTConfig(**cfg_kw)
    stage = build_stage(GPT(cfg).train(), mesh)

    def step(mbs: list[dict], schedule: str, stats=None) -> None:
        stage.zero_grad(set_to_none=True)
        dist.barrier()  # every rank starts the step together: the bubble is measured from a common start
        run_schedule(stage, mbs, lambda o, mb: o.loss / len(mbs), mesh, schedule, stats=stats)

    out = {}
    for schedule, m in cases:
        mbs = _gpt_batches(cfg, m, batch, seq)
        step(mbs, schedule)  # warm-up
        meter = SavedActivationMeter(stage.parameters())
        with meter.hooks():
            step(mbs, schedule)
        runs = []
        for _ in range(repeats):
            stats = PipelineStats()
            step(mbs, schedule, stats)
            runs.append((stats.total_s, stats.bubble))
        out[(schedule, m)] = {"step_s": statistics.median(t for t, _ in runs),
                              "bubble": statistics.median(b for _, b in runs), "peak_saved": meter.peak}
    return out


def bench_pipeline(pp: int = 2, micro_batches=(4, 8), schedules=("gpipe", "1f1b"), n_layer: int = 4,
                   n_embd: int = 256, seq: int = 64, batch: int = 4, vocab: int = 512, repeats: int = 3,
                   threads: int = 1) -> list[list[str]]:
    """Runs the pipeline section and prints its markdown table; returns the rows."""
    cfg = {"vocab_size": vocab, "n_positions": seq, "n_embd": n_embd, "n_layer": n_layer,
           "n_head": max(1, n_embd // 64), "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
    cases = [(s, m) for m in micro_batches for s in schedules]
    t0 = time.perf_counter()
    ranks = spawn(_pipeline_worker, pp, threads, cfg, batch, seq, cases, repeats)
    print(f"\n### Pipeline: GPT {n_layer} layers x {n_embd}, vocab {vocab}, micro-batch {batch}x{seq}, pp={pp}, "
          f"{threads} thread(s) per stage, median of {repeats} steps ({time.perf_counter() - t0:.0f} s)\n")
    header = ["schedule", "m", "step ms", "bubble per stage", "bubble mean", "theory (p-1)/(m+p-1)",
              "peak saved activations per stage (MiB)"]
    rows = []
    for schedule, m in cases:
        res = [r[(schedule, m)] for r in ranks]
        bubbles = [x["bubble"] for x in res]
        rows.append([schedule, str(m), f"{max(x['step_s'] for x in res) * 1e3:.0f}",
                     " / ".join(f"{b:.2f}" for b in bubbles), f"{statistics.mean(bubbles):.2f}",
                     f"{(pp - 1) / (m + pp - 1):.2f}", " / ".join(f"{x['peak_saved'] / 2**20:.1f}" for x in res)])
    print_table(header, rows)
    return rows


# ---------------------------------------------------------------------- data-parallel communication section
def _comm_formula(zero: int, n: int, m: int, psi: int, blocks: int) -> tuple[float, float]:
    """(bytes sent per step per rank, memory bytes per rank) of an fp32 model by the ring / ZeRO formulas."""
    ring = (n - 1) / n
    sent = {0: 2 * ring * psi, 1: 3 * ring * psi, 2: 2 * ring * psi, 3: ring * (m * (psi + blocks) + psi)}[zero]
    memory = {0: 16 * psi, 1: 8 * psi + 8 * psi / n, 2: 4 * psi + 12 * psi / n, 3: 16 * psi / n}[zero]
    return 4 * sent, memory


def _comm_worker(rank: int, world: int, cfg_kw: dict, batch: int, seq: int, m: int, cases: list, repeats: int):
    import contextlib

    import torch.distributed as dist

    from fastllm.models import GPT, GPTConfig
    from fastllm.parallel.data_parallel import build_data_parallel
    from fastllm.parallel.mesh import Mesh
    mesh = Mesh(dp=world)
    cfg = GPTConfig(**cfg_kw)
    mbs = _gpt_batches(cfg, m, batch, seq)
    out = {}
    for zero, bucket_mb in cases:
        torch.manual_seed(0)
        engine = build_data_parallel(GPT(cfg).train(), mesh, zero, {"lr": 1e-4, "betas": (0.9, 0.95), "eps": 1e-8,
                                                                    "weight_decay": 0.1}, bucket_mb=bucket_mb)

        def step(engine=engine) -> None:
            for i, mb in enumerate(mbs):
                with engine.no_sync() if i < m - 1 else contextlib.nullcontext():
                    (engine.model(**mb).loss / (m * world)).backward()
            engine.finish_grads()
            engine.clip_grad_norm_(1.0)
            engine.step()
            engine.zero_grad()

        step()  # warm-up (creates the optimizer state)
        sent0, times = engine.comm_bytes, []
        for _ in range(repeats):
            dist.barrier()
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        out[(zero, bucket_mb)] = {"step_s": statistics.median(times), "sent": (engine.comm_bytes - sent0) / repeats,
                                  "memory": engine.memory_bytes()}
    return out


def bench_comm(dp: int = 2, zeros=(0, 1, 2, 3), buckets=(25.0,), m: int = 2, n_layer: int = 4, n_embd: int = 256,
               seq: int = 64, batch: int = 4, vocab: int = 512, repeats: int = 3, threads: int = 1) -> list[list[str]]:
    """Runs the data-parallel section (one row per zero stage and bucket size) and prints its table."""
    from fastllm.models import GPT, GPTConfig
    cfg = {"vocab_size": vocab, "n_positions": seq, "n_embd": n_embd, "n_layer": n_layer,
           "n_head": max(1, n_embd // 64), "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
    model = GPT(GPTConfig(**cfg))
    psi = sum(p.numel() for p in model.parameters())
    blocks = sum(p.numel() for n, p in model.named_parameters() if n.startswith("layers."))
    cases = [(z, b) for z in zeros for b in buckets]
    t0 = time.perf_counter()
    ranks = spawn(_comm_worker, dp, threads, cfg, batch, seq, m, cases, repeats)
    print(f"\n### Data parallel: GPT {n_layer} layers x {n_embd}, vocab {vocab} (Ψ = {psi / 1e6:.2f} M fp32), "
          f"{m} micro-batches of {batch}x{seq} per rank, dp={dp}, {threads} thread(s) per rank, median of {repeats} "
          f"steps ({time.perf_counter() - t0:.0f} s)\n")
    header = ["zero", "bucket MiB", "step ms", "sent / step (MiB)", "formula (MiB)", "params / grads / optim (MiB)",
              "memory total (MiB)", "formula (MiB)"]
    rows = []
    for zero, bucket_mb in cases:
        res = [r[(zero, bucket_mb)] for r in ranks]
        sent, memory = _comm_formula(zero, dp, m, psi, blocks)
        mem = res[0]["memory"]
        rows.append([str(zero), f"{bucket_mb:g}", f"{max(x['step_s'] for x in res) * 1e3:.0f}",
                     f"{res[0]['sent'] / 2**20:.2f}", f"{sent / 2**20:.2f}",
                     " / ".join(f"{mem[k] / 2**20:.2f}" for k in ("params", "grads", "optimizer")),
                     f"{sum(mem.values()) / 2**20:.2f}", f"{memory / 2**20:.2f}"])
    print_table(header, rows)
    return rows


# ---------------------------------------------------------------------- command line
SECTIONS = {"pipeline": lambda args: bench_pipeline(pp=args.pp, micro_batches=(2, 4) if args.quick else (4, 8),
                                                    repeats=2 if args.quick else args.repeats,
                                                    threads=args.threads),
            "comm": lambda args: bench_comm(dp=args.dp, buckets=(25.0,) if args.quick else (25.0, 1.0),
                                            repeats=2 if args.quick else args.repeats, threads=args.threads)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--section", choices=sorted(SECTIONS), action="append", help="default: every section")
    p.add_argument("--quick", action="store_true", help="fewer micro-batches and repeats")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per process")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--pp", type=int, default=2, help="pipeline stages (processes) for the pipeline section")
    p.add_argument("--dp", type=int, default=2, help="data-parallel processes for the comm section")
    args = p.parse_args()
    print(setup(args.threads))
    for name in args.section or list(SECTIONS):
        SECTIONS[name](args)


if __name__ == "__main__":
    main()
