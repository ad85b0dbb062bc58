"""Runs a function in N gloo processes (spawned) and returns each rank's result, re-raising worker errors.

Invariants: every worker gets 1 intra-op thread, a private FileStore rendezvous and a 120 s collective timeout,
so a bug that desynchronizes ranks fails the test instead of hanging CI. `fn` must be importable (module level).
"""
from __future__ import annotations

import datetime
import os
import pickle
import tempfile
import traceback

import torch
import torch.multiprocessing as mp


def _worker(rank: int, world: int, store_path: str, out_dir: str, fn, args) -> None:
    import torch.distributed as dist
    torch.set_num_threads(1)
    os.environ.setdefault("TRITON_INTERPRET", "1")
    result = None
    try:
        store = dist.FileStore(store_path, world)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=120))
        result = ("ok", fn(rank, world, *args))
    except BaseException as e:  # noqa: BLE001 - reported to the parent with its traceback
        result = ("error", f"rank {rank}: {type(e).__name__}: {e}\n{traceback.format_exc()}")
    finally:
        with open(os.path.join(out_dir, f"{rank}.pkl"), "wb") as fh:
            pickle.dump(result, fh)
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn, world: int, *args) -> list:
    """[fn(rank, world, *args) for each rank], computed in `world` spawned gloo processes."""
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        mp.start_processes(_worker, args=(world, store, tmp, fn, args), nprocs=world, join=True,
                           start_method="spawn")
        results = []
        for r in range(world):
            with open(os.path.join(tmp, f"{r}.pkl"), "rb") as fh:
                results.append(pickle.load(fh))
    errors = [msg for status, msg in results if status == "error"]
    if errors:
        raise AssertionError("distributed worker failed:\n" + "\n".join(errors))
    return [value for _, value in results]
