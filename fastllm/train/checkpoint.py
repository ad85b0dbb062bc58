"""Checkpoints: one directory per step, written atomically, verified before anything is loaded.

Layout of `<run>/step-00000100/`: model.safetensors, config.json (run config + `model_config` with `family`
"bert"|"gpt"), tokenizer/ (Tokenizer.save), optimizer.pt, scheduler.pt, scaler.pt, rng.pt, sampler.pt
(torch.save of tensors and plain containers), and manifest.json (SHA-256 of every other file) written last.

Invariants:
- Everything is written into `<run>/.tmp-step-N-<pid>`, fsynced, then renamed to `step-N`: a crash leaves either
  the previous checkpoints untouched or a `.tmp-*` folder that is never picked up (and removed on the next save).
- A directory without manifest.json is incomplete and never loaded. `verify()` checks every manifest entry
  (presence, size, SHA-256) and that no file is missing, before a single tensor is read; a failure names the file.
- No pickle is executed: every .pt file is read with torch.load(weights_only=True).
- keep_last: after a successful save, only the newest k complete checkpoints remain.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

MANIFEST = "manifest.json"
STATE_FILES = ("optimizer.pt", "scheduler.pt", "scaler.pt", "rng.pt", "sampler.pt")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupted, unsafe or incompatible (the message names the file)."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(root: Path) -> None:
    entries = {p.relative_to(root).as_posix(): {"sha256": _sha256(p), "bytes": p.stat().st_size}
               for p in _files(root)}
    write_synced(root / MANIFEST, json.dumps({"files": entries}, indent=1).encode())


def write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def verify(ckpt: str | os.PathLike) -> dict:
    """Checks manifest.json against the files; returns the manifest or raises CheckpointError naming the file."""
    root = Path(ckpt)
    if not root.is_dir():
        raise CheckpointError(f"checkpoint not found: {root}")
    mpath = root / MANIFEST
    if not mpath.is_file():
        raise CheckpointError(f"{mpath}: missing (incomplete checkpoint: the save did not finish)")
    try:
        manifest = json.loads(mpath.read_text())
        entries = manifest["files"]
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{mpath}: unreadable manifest ({e})") from None
    for rel, meta in entries.items():
        p = root / rel
        if not p.is_file():
            raise CheckpointError(f"{p}: missing file listed in the manifest")
        if p.stat().st_size != meta["bytes"]:
            raise CheckpointError(f"{p}: size {p.stat().st_size} != {meta['bytes']} in the manifest (truncated?)")
        if _sha256(p) != meta["sha256"]:
            raise CheckpointError(f"{p}: SHA-256 mismatch with the manifest (corrupted)")
    for need in ("model.safetensors", "config.json"):
        if need not in entries:
            raise CheckpointError(f"{root / need}: not in the manifest")
    return manifest


def step_of(path: Path) -> int:
    return int(path.name.split("-")[1])


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints (with a manifest) of a run, oldest first."""
    root = Path(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step-*") if p.is_dir() and (p / MANIFEST).is_file()]
    return sorted(found, key=step_of)


def resolve(path: str | os.PathLike) -> Path:
    """A checkpoint directory itself, or the newest complete checkpoint of a run directory (`<run>/checkpoints/`
    as fastllm.pretrain writes it, or step-* directly under it)."""
    p = Path(path)
    if (p / MANIFEST).is_file() or p.name.startswith("step-"):
        return p
    found = list_checkpoints(p) or list_checkpoints(p / "checkpoints")
    if not found:
        raise CheckpointError(f"no complete checkpoint in {p}")
    return found[-1]


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
             "python_version": random.getstate()[0], "python_gauss": random.getstate()[2],
             "numpy": torch.from_numpy(np_state[1].astype(np.int64)),
             "numpy_pos": int(np_state[2]), "numpy_gauss": [int(np_state[3]), float(np_state[4])]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"],
                         state["numpy_gauss"][0], state["numpy_gauss"][1]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: str | os.PathLike, step: int, *, model, config: dict, tokenizer, states: dict,
                    keep_last: int = 3) -> Path:
    """Writes `<run_dir>/step-<step>` atomically; `states` maps STATE_FILES names to picklable-safe objects."""
    from safetensors.torch import save_model
    root = Path(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-step-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = root / f".tmp-step-{step:08d}-{os.getpid()}"
    tmp.mkdir()
    save_model(model, str(tmp / "model.safetensors"))
    write_synced(tmp / "config.json", json.dumps(config, indent=1, default=str).encode())
    tokenizer.save(tmp / "tokenizer")
    for name, obj in states.items():
        torch.save(obj, tmp / name)
    write_manifest(tmp)
    final = root / f"step-{step:08d}"
    if final.exists():
        old = root / f".tmp-old-{step:08d}-{os.getpid()}"
        final.rename(old)
        shutil.rmtree(old)
    os.rename(tmp, final)
    prune(root, keep_last)
    return final


def prune(root: Path, keep_last: int) -> None:
    for old in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(old)


def load_state(ckpt: Path, name: str):
    try:
        return torch.load(ckpt / name, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is reported with the file name
        raise CheckpointError(f"{ckpt / name}: cannot be loaded safely (weights_only=True): {e}") from None


def read_config(ckpt: Path) -> dict:
    try:
        return json.loads((ckpt / "config.json").read_text())
    except ValueError as e:
        raise CheckpointError(f"{ckpt / 'config.json'}: invalid JSON ({e})") from None


def build_model(model_config: dict):
    """(model, typed config) from a `model_config` dict carrying `family`."""
    from fastllm.models import GPT, BertConfig, BertForPreTraining, GPTConfig
    fields = {k: v for k, v in model_config.items() if k != "family"}
    family = model_config.get("family")
    if family == "bert":
        cfg = BertConfig.from_dict(fields)
        return BertForPreTraining(cfg), cfg
    if family == "gpt":
        cfg = GPTConfig.from_dict(fields)
        return GPT(cfg), cfg
    raise CheckpointError(f"unknown model family {family!r} (expected 'bert' or 'gpt')")


def load_weights(model, ckpt: Path) -> None:
    from safetensors.torch import load_model
    try:
        load_model(model, str(ckpt / "model.safetensors"), strict=True)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{ckpt / 'model.safetensors'}: does not fit the model ({e})") from None


def load_pretrained(path: str | os.PathLike):
    """(model in eval mode, tokenizer, typed model config) from a checkpoint or run directory (verified first)."""
    from fastllm.tokenizers import load_tokenizer
    ckpt = resolve(path)
    verify(ckpt)
    model, cfg = build_model(read_config(ckpt)["model_config"])
    load_weights(model, ckpt)
    return model.eval(), load_tokenizer(ckpt / "tokenizer"), cfg
