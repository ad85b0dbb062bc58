"""Checkpoint safety: round trip through load_pretrained; corrupted, truncated and missing files are detected and
named; a crash while saving leaves the previous checkpoint loadable; a malicious pickle is never executed;
keep-last-k."""
import json
import os
import pickle

import pytest
import torch

from fastllm.models import GPT, preset
from fastllm.tokenizers import ByteLevelBPETokenizer
from fastllm.train import checkpoint as ck


def _save(run, step, keep_last=3):
    torch.manual_seed(step)
    mc = preset("gpt-nano", vocab_size=300)
    model = GPT(mc)
    tok = ByteLevelBPETokenizer().train(["hello world, a tiny corpus"] * 5, 300, show_progress=False)
    config = {"step": step, "family": "gpt", "model_config": {"family": "gpt", **mc.to_dict()}, "run": {}}
    states = {"optimizer.pt": {"state": {}, "t": torch.ones(3)}, "scheduler.pt": {"step_count": step},
              "scaler.pt": {"scale": 1.0}, "rng.pt": ck.rng_state(), "sampler.pt": {"epoch": 0, "position": step}}
    return ck.save_checkpoint(run, step, model=model, config=config, tokenizer=tok, states=states,
                              keep_last=keep_last), model


def test_round_trip_and_keep_last(tmp_path):
    for step in (1, 2, 3, 4):
        path, model = _save(tmp_path, step, keep_last=2)
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == ["step-00000003", "step-00000004"]
    loaded, tok, cfg = ck.load_pretrained(tmp_path)  # a run dir: its newest checkpoint
    assert cfg.vocab_size == 300 and 256 < tok.vocab_size <= 300 and not loaded.training
    for (n, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), n
    assert ck.load_state(path, "sampler.pt") == {"epoch": 0, "position": 4}


@pytest.mark.parametrize("damage", ["corrupt", "truncate", "missing"])
def test_damaged_file_is_named(tmp_path, damage):
    path, _ = _save(tmp_path, 1)
    target = path / "model.safetensors"
    if damage == "corrupt":
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0xFF
        target.write_bytes(bytes(data))
    elif damage == "truncate":
        target.write_bytes(target.read_bytes()[:100])
    else:
        target.unlink()
    with pytest.raises(ck.CheckpointError, match="model.safetensors"):
        ck.load_pretrained(path)


def test_missing_manifest_means_incomplete(tmp_path):
    path, _ = _save(tmp_path, 1)
    (path / "manifest.json").unlink()
    with pytest.raises(ck.CheckpointError, match="manifest.json: missing"):
        ck.verify(path)
    assert ck.list_checkpoints(tmp_path) == []


def test_crash_while_saving_keeps_previous(tmp_path, monkeypatch):
    good, _ = _save(tmp_path, 1)

    def crash(*a, **k):
        raise OSError("simulated crash (disk full)")

    monkeypatch.setattr(ck, "write_manifest", crash)
    with pytest.raises(OSError, match="simulated"):
        _save(tmp_path, 2)
    monkeypatch.undo()
    assert ck.resolve(tmp_path) == good
    ck.load_pretrained(tmp_path)
    assert list(tmp_path.glob(".tmp-step-*"))  # the partial save is left aside, never picked up
    _save(tmp_path, 3)
    assert not list(tmp_path.glob(".tmp-step-*"))  # and cleaned by the next save


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['EVIL_MARKER']}",))


def test_malicious_pickle_is_never_executed(tmp_path, monkeypatch):
    path, _ = _save(tmp_path / "run", 1)
    marker = tmp_path / "pwned"
    monkeypatch.setenv("EVIL_MARKER", str(marker))
    (path / "optimizer.pt").write_bytes(pickle.dumps({"state": _Evil()}))
    ck.write_manifest(path)  # an attacker can rewrite the manifest too: hashes then match
    assert json.loads((path / "manifest.json").read_text())["files"]["optimizer.pt"]
    with pytest.raises(ck.CheckpointError, match="optimizer.pt"):
        ck.load_state(path, "optimizer.pt")
    assert not marker.exists()
