"""Sharded checkpoints of any dp x tp x pp layout, loadable into any other layout, with one manifest.

Layout of `step-N/` (in addition to train/checkpoint.py's config.json, tokenizer/, scheduler/scaler/sampler/rng):
- shards/pp{p}-tp{t}.safetensors, written by dp rank 0 of each (pp, tp) position: for every parameter this rank
  owns (tied copies excluded), `param/NAME`, `exp_avg/NAME`, `exp_avg_sq/NAME` (and `master/NAME`, the fp32
  copy of a bf16/fp16 parameter) in the rank's local (tensor-
  parallel) shape, gathered over dp (ZeRO shards become whole), and `tp_index/NAME` for tp shards (the indices
  along `tp_dim` into the canonical tensor, -1 for vocabulary padding); metadata holds tp dims and the step.
- rng/rank-R.pt: each rank's RNG state (dropout); model.safetensors: the consolidated single-device model
  (canonical names), written by rank 0 from the shards, so every checkpoint loads with load_pretrained.
- manifest.json, written last by rank 0 after every rank finished: the directory is renamed from `.tmp-step-N`
  to `step-N` only then (atomic for readers), and every rank verifies it before loading.

Invariants: loading assembles canonical tensors from all shards (O(model) host memory per rank) and slices them
for the new layout, so dp, tp and pp may all change between save and load; moments follow their parameters.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from fastllm.train import checkpoint as ckpt_io

MOMENTS = ("exp_avg", "exp_avg_sq", "master")  # master: the fp32 copy of a bf16/fp16 parameter


def _barrier(mesh) -> None:
    if mesh.world_size > 1:
        dist.barrier()


def shard_tensors(engine) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """This rank's shard file content (collective over dp: every dp rank must call it)."""
    params = engine.dp.named_full_params()
    state = engine.dp.optimizer_state()
    tensors, meta = {}, {"step": str(state["step"])}
    for name, t in params.items():
        if name in engine.tied_copies:
            continue
        tensors[f"param/{name}"] = t.detach().contiguous().cpu()
        for key in MOMENTS:
            m = state["params"].get(name, {}).get(key)
            if m is not None:
                tensors[f"{key}/{name}"] = m.detach().contiguous().cpu()
        if name in engine.tp_meta:
            dim, idx = engine.tp_meta[name]
            tensors[f"tp_index/{name}"], meta[f"tp_dim/{name}"] = idx.cpu().clone(), str(dim)
    return tensors, meta


def write_shards(engine, tmp: Path) -> None:
    from safetensors.torch import save_file
    mesh = engine.mesh
    tensors, meta = shard_tensors(engine)
    (tmp / "rng").mkdir(exist_ok=True)
    torch.save(ckpt_io.rng_state(), tmp / "rng" / f"rank-{mesh.rank:05d}.pt")
    if mesh.dp_rank == 0:
        (tmp / "shards").mkdir(exist_ok=True)
        save_file(tensors, str(tmp / "shards" / f"pp{mesh.pp_rank}-tp{mesh.tp_rank}.safetensors"), metadata=meta)


# ---------------------------------------------------------------------------------------------- assembling
def _read_shards(ckpt: Path) -> list[tuple[dict, dict]]:
    from safetensors import safe_open
    files = sorted((ckpt / "shards").glob("*.safetensors"))
    if not files:
        raise ckpt_io.CheckpointError(f"{ckpt / 'shards'}: no shard files (a checkpoint of an older fastllm?)")
    out = []
    for f in files:
        with safe_open(str(f), "pt") as fh:
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 - safe_open is not a dict
            out.append((tensors, fh.metadata() or {}))
    return out


def _place(full: torch.Tensor | None, local: torch.Tensor, idx: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    if full is None:
        shape = list(local.shape)
        shape[dim] = size
        full = torch.zeros(shape, dtype=local.dtype)
    keep = idx >= 0
    return full.index_copy_(dim, idx[keep], local.index_select(dim, keep.nonzero().squeeze(1)))


def canonical_state(ckpt: Path) -> tuple[dict[str, dict[str, torch.Tensor]], int]:
    """{kind: {name: canonical tensor}} for kind in param/exp_avg/exp_avg_sq/master, and the optimizer step."""
    shards, pieces, step = _read_shards(ckpt), {}, 0
    for tensors, meta in shards:
        step = int(meta.get("step", 0))
        for key, t in tensors.items():
            kind, name = key.split("/", 1)
            if kind == "tp_index":
                continue
            idx = tensors.get(f"tp_index/{name}")
            pieces.setdefault(kind, {}).setdefault(name, []).append((t, idx, int(meta.get(f"tp_dim/{name}", 0))))
    out = {kind: {name: _merge(parts) for name, parts in d.items()} for kind, d in pieces.items()}
    return out, step


def _merge(parts: list) -> torch.Tensor:
    t, idx, dim = parts[0]
    if idx is None:
        return t
    size = 1 + max(int(i.max()) for _, i, _ in parts)
    full = None
    for t, idx, dim in parts:
        full = _place(full, t, idx, dim, size)
    return full


def local_slice(full: torch.Tensor, name: str, tp_meta: dict) -> torch.Tensor:
    """The part of a canonical tensor this rank holds (its tp shard; padding rows zero)."""
    if name not in tp_meta:
        return full
    dim, idx = tp_meta[name]
    local = full.index_select(dim, idx.clamp(min=0).to(torch.long))
    mask_shape = [1] * local.dim()
    mask_shape[dim] = -1
    return local * (idx >= 0).view(mask_shape).to(local.dtype)


def load_into(engine, ckpt: Path) -> None:
    """Loads parameters and AdamW moments of a checkpoint of any layout into this engine's layout."""
    state, step = canonical_state(ckpt)
    names = list(engine.param_names)
    missing = [n for n in names if n not in state.get("param", {})]
    if missing:
        raise ckpt_io.CheckpointError(f"{ckpt / 'shards'}: no parameter {missing[0]!r} ({len(missing)} missing)")
    engine.dp.load_full_params({n: local_slice(state["param"][n], n, engine.tp_meta) for n in names})
    moments = {n: {k: local_slice(state[k][n], n, engine.tp_meta) if n in state.get(k, {}) else None
                   for k in MOMENTS} for n in names}
    engine.dp.load_optimizer_state({"step": step, "params": moments})
    rng = ckpt / "rng" / f"rank-{engine.mesh.rank:05d}.pt"
    if rng.is_file():
        ckpt_io.set_rng_state(ckpt_io.load_state(ckpt, f"rng/{rng.name}"))


# ---------------------------------------------------------------------------------------------- saving
def consolidate(ckpt_dir: Path, model_config: dict, out_file: Path) -> None:
    """Writes the single-device fp32 model.safetensors (canonical names, tied weights once) from the shards."""
    from safetensors.torch import save_model
    state, _ = canonical_state(ckpt_dir)
    model, _ = ckpt_io.build_model(model_config)
    params = {**state["param"], **state.get("master", {})}  # fp32 masters of bf16/fp16 parameters win
    result = model.load_state_dict(params, strict=False)
    if result.unexpected_keys or result.missing_keys:
        raise ckpt_io.CheckpointError(f"{ckpt_dir}: shards do not form the model (missing "
                                      f"{result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]})")
    save_model(model, str(out_file))


def save(engine, run_dir: Path, step: int, *, config: dict, tokenizer, states: dict, keep_last: int) -> Path:
    """Collective: every rank calls it. Returns the final directory."""
    mesh, root = engine.mesh, Path(run_dir)
    tmp, final = root / f".tmp-step-{step:08d}", root / f"step-{step:08d}"
    if mesh.rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-step-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    _barrier(mesh)
    write_shards(engine, tmp)
    _barrier(mesh)
    if mesh.rank == 0:
        _finish(tmp, final, config, tokenizer, states)
        ckpt_io.prune(root, keep_last)
    _barrier(mesh)
    return final


def _finish(tmp: Path, final: Path, config: dict, tokenizer, states: dict) -> None:
    consolidate(tmp, config["model_config"], tmp / "model.safetensors")
    ckpt_io.write_synced(tmp / "config.json", json.dumps(config, indent=1, default=str).encode())
    if tokenizer is not None:
        tokenizer.save(tmp / "tokenizer")
    for name, obj in states.items():
        torch.save(obj, tmp / name)
    ckpt_io.write_manifest(tmp)
    if final.exists():
        old = final.with_name(f".tmp-old-{final.name}-{os.getpid()}")
        final.rename(old)
        shutil.rmtree(old)
    os.rename(tmp, final)
