"""The Trainer on the parallel engine: held-out evaluation equals one process in every layout (full-vocabulary
accuracy under tp, the last stage's metrics under pp), and an fp16 overflow on one rank makes every rank skip
the same step (one agreed finite check), leaving all weights untouched."""
import math

import pytest
import torch

from fastllm.parallel.mesh import Mesh
from fastllm.train.amp import LossScaler
from tests.parallel.harness import run_distributed
from tests.parallel.workloads import Run, global_batch, make_trainer, my_micro_batches, train

LAYOUTS = [Run(f, dp=2) for f in ("gpt", "bert")] + [Run(f, tp=2) for f in ("gpt", "bert")] + \
          [Run(f, pp=2) for f in ("gpt", "bert")]


def _evaluate(run: Run, mesh: Mesh) -> dict:
    trainer = make_trainer(run, mesh)
    train(trainer, run, steps=2)
    return trainer.evaluate(my_micro_batches(global_batch(run.family, 500), mesh, 2))


def _fp16_skip(run: Run, mesh: Mesh) -> dict:
    trainer = make_trainer(run, mesh)
    trainer.precision, trainer.scaler = "fp16", LossScaler(True, init_scale=1024.0)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    hook = None
    if mesh.rank == 1:  # an overflow on one rank only
        p = [q for q in trainer.model.parameters() if q.requires_grad][-1]
        hook = p.register_hook(lambda g: g * math.inf)
    first = trainer.train_step(my_micro_batches(global_batch(run.family, 0), mesh, run.micro))
    if hook is not None:
        hook.remove()
    untouched = all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))
    second = trainer.train_step(my_micro_batches(global_batch(run.family, 1), mesh, run.micro))
    return {"first": first.finite, "untouched": untouched, "skipped": trainer.scaler.skipped,
            "scale": trainer.scaler.scale, "second": second.finite}


def worker(rank, world, runs):
    evals = [_evaluate(r, Mesh(r.dp, r.pp, r.tp)) for r in runs]
    skips = [_fp16_skip(r, Mesh(r.dp, r.pp, r.tp)) for r in runs if r.family == "gpt"]
    return evals, skips


def test_evaluation_and_fp16_skips_agree_across_layouts():
    results = run_distributed(worker, 2, LAYOUTS)
    ref = {f: _evaluate(Run(f, micro=8), Mesh()) for f in ("gpt", "bert")}
    for i, run in enumerate(LAYOUTS):
        for rank in range(2):
            got, want = results[rank][0][i], ref[run.family]
            assert got.keys() == want.keys(), run
            for k, v in want.items():  # fp32 summation order only (see test_equivalence.py)
                assert got[k] == pytest.approx(v, rel=1e-5), (run, rank, k)
    for skips in zip(*(r[1] for r in results)):  # per layout: both ranks
        assert all(s == {"first": False, "untouched": True, "skipped": 1, "scale": 512.0, "second": True}
                   for s in skips), skips
