"""Every layout trains like one process: per-step losses, grad norms and final parameters of 10 steps of a tiny
GPT and a tiny BERT (MLM + NSP, padding) under DDP, ZeRO-1/2/3, TP (with and without sequence parallelism), PP
(GPipe, 1F1B) and their 4-process compositions equal the single-process run on the same global batches
(vocabulary 1001: not divisible by tp).

Tolerance: fp32 everywhere; layouts only change summation order (micro-batch splits, dp all-reduce, tp partial
matmuls), about 1e-7 relative per op, so losses and grad norms agree to rtol 1e-5. Parameters get rtol 1e-5 and
atol 1e-5: AdamW's normalized update m / (sqrt(v) + eps) turns the relative error of a gradient element that is
near zero by cancellation into an O(1) change of its update, so such an element can drift by a small fraction of
lr = 3e-3 (1.8e-6 seen on an AVX-512 machine, whose GEMMs sum in another order). A real layout bug moves
parameters by ~lr per step (and shows in the losses), far above 1e-5 = lr / 300.
"""
import pytest
import torch

from tests.parallel.harness import run_distributed
from tests.parallel.workloads import Run, merge, run_layout, worker_errors, worker_many

RTOL, ATOL = 1e-5, 1e-5

TWO = [Run(f, dp=2, zero=z) for f in ("gpt", "bert") for z in (0, 1, 2, 3)] + \
      [Run(f, tp=2, sp=sp) for f in ("gpt", "bert") for sp in (False, True)] + \
      [Run(f, pp=2, schedule=s) for f in ("gpt", "bert") for s in ("gpipe", "1f1b")]
FOUR = [Run("gpt", dp=2, tp=2, zero=1), Run("bert", dp=2, tp=2, zero=2),
        Run("gpt", dp=2, pp=2, zero=2), Run("bert", dp=2, pp=2, zero=1, schedule="gpipe"),
        Run("gpt", tp=2, pp=2), Run("bert", tp=2, pp=2),
        Run("gpt", tp=2, pp=2, sp=True), Run("bert", tp=2, pp=2, sp=True), Run("bert", dp=2, tp=2, zero=3, sp=True)]


@pytest.fixture(scope="module")
def reference():
    """One process, the whole global batch in a single micro-batch."""
    return {f: run_layout(Run(f, micro=8)) for f in ("gpt", "bert")}


def _compare(run: Run, per_rank: list, reference) -> None:
    ref_losses, ref_params = reference[run.family]
    losses = per_rank[0][0]
    assert all(r[0] == losses for r in per_rank), f"{run}: ranks disagree on the losses"
    for step, ((loss, norm), (rl, rn)) in enumerate(zip(losses, ref_losses)):
        assert loss == pytest.approx(rl, rel=RTOL), f"{run}: loss of step {step}"
        assert norm == pytest.approx(rn, rel=RTOL), f"{run}: grad norm of step {step}"
    params = merge([r[1] for r in per_rank])
    assert params.keys() == ref_params.keys(), f"{run}: parameter names differ"
    for name, ref in ref_params.items():
        torch.testing.assert_close(params[name], ref[0], rtol=RTOL, atol=ATOL,
                                   msg=lambda m, name=name: f"{run} {name}: {m}")


def test_two_process_layouts_equal_one_process(reference):
    results = run_distributed(worker_many, 2, TWO)  # results[rank][run index]
    for i, run in enumerate(TWO):
        _compare(run, [results[r][i] for r in range(2)], reference)


def test_four_process_compositions_equal_one_process(reference):
    results = run_distributed(worker_many, 4, FOUR)
    for i, run in enumerate(FOUR):
        _compare(run, [results[r][i] for r in range(4)], reference)


def test_bad_layouts_fail_on_every_rank_without_hanging():
    """tp=4 with 2 heads, pp=4 with 2 layers, ZeRO-3 with pp: the same clear error on all four ranks."""
    messages = run_distributed(worker_errors, 4)
    for per_rank in zip(*messages):
        assert all(m and m == per_rank[0] for m in per_rank), per_rank
    heads, layers, zero3 = messages[0]
    assert "heads = 2 is not divisible by tp = 4" in heads
    assert "pp=4 exceeds the model's 2 layers" in layers and "ZeRO-3" in zero3 and "pp=2" in zero3
