"""Resharding: a checkpoint saved at dp=2 (ZeRO-2), tp=2 or pp=2 loads in one process, one saved at tp=1 loads
at tp=2, and the next steps' losses equal the uninterrupted run's; the consolidated model.safetensors is the
single-device model. Tolerance: fp32 summation-order differences only (see test_equivalence.py)."""
import pytest
import torch

from fastllm.parallel import checkpoint as pckpt
from fastllm.parallel.mesh import Mesh
from fastllm.train import checkpoint as ck
from tests.parallel.harness import run_distributed
from tests.parallel.workloads import Run, make_trainer, train

K = 3  # steps before the checkpoint


def _save(trainer, run: Run, root) -> str:
    cfg = {"model_config": {"family": run.family, **trainer.engine.config.to_dict()}, "step": K}
    states = {"scheduler.pt": trainer.scheduler.state_dict()}
    return str(pckpt.save(trainer.engine, root, K, config=cfg, tokenizer=None, states=states, keep_last=1))


def _resume(run: Run, mesh: Mesh, path: str) -> list:
    trainer = make_trainer(run, mesh)
    pckpt.load_into(trainer.engine, ck.resolve(path))
    trainer.scheduler.load_state_dict(ck.load_state(ck.resolve(path), "scheduler.pt"))
    return _losses(train(trainer, run, first=K, steps=2))


def _losses(results) -> list[float]:
    return [loss for loss, _ in results]


def worker(rank, world, saves, root, tp1_ckpt):
    out = {}
    for name, run in saves:
        trainer = make_trainer(run, Mesh(run.dp, run.pp, run.tp))
        train(trainer, run, steps=K)
        out[name] = _save(trainer, run, f"{root}/{name}")
        out[name + "/next"] = _losses(train(trainer, run, first=K, steps=2))
    out["tp1->tp2"] = _resume(Run("gpt", tp=2), Mesh(1, 1, 2), tp1_ckpt)
    return out


def test_resharding_round_trips(tmp_path):
    uninterrupted = {f: _losses(train(make_trainer(Run(f), Mesh()), Run(f), steps=K + 2)) for f in ("gpt", "bert")}
    base = make_trainer(Run("gpt"), Mesh())
    train(base, Run("gpt"), steps=K)
    tp1 = _save(base, Run("gpt"), tmp_path / "tp1")
    saves = [("dp2-zero2", Run("bert", dp=2, zero=2)), ("tp2", Run("gpt", tp=2)), ("pp2", Run("bert", pp=2))]
    res = run_distributed(worker, 2, saves, str(tmp_path), tp1)[0]
    for name, run in saves:
        expect = uninterrupted[run.family][K:]
        assert res[name + "/next"] == pytest.approx(expect, rel=1e-5), name  # the un-resharded continuation
        assert _resume(Run(run.family), Mesh(), res[name]) == pytest.approx(expect, rel=1e-5), name
    assert res["tp1->tp2"] == pytest.approx(uninterrupted["gpt"][K:], rel=1e-5)


def test_consolidated_model_is_the_single_device_model(tmp_path):
    trainer = make_trainer(Run("gpt"), Mesh())
    train(trainer, Run("gpt"), steps=1)
    path = _save(trainer, Run("gpt"), tmp_path)
    model, _ = ck.build_model({"family": "gpt", **trainer.engine.config.to_dict()})
    ck.load_weights(model, ck.resolve(path))
    for name, p in trainer.engine.dp.named_full_params().items():
        assert torch.equal(dict(model.named_parameters())[name], p), name
