"""DDP and ZeRO-1/2/3 (fastllm.parallel.data_parallel) against single-process AdamW, in 2 gloo processes.

One spawned run (dp = 2, 1 thread per process) trains every scenario and the parent compares: tiny GPT and tiny
BertForPreTraining, zero 0..3, 10 AdamW steps of 2 micro-batches per rank (the first under no_sync), clipping at
a norm the gradients exceed. The reference is plain torch AdamW (fastllm/train/optim.py groups, foreach=False)
and torch.nn.utils.clip_grad_norm_ over the same 4 micro-batches in one process.

Tolerance 1e-5 relative (losses, grad norms, and per-tensor ||a - b|| / ||b|| of the final parameters): both runs
do the same fp32 math; they differ only in summation order (per-rank partial sums added by the all-reduce versus
one running sum; norms summed per shard), about 1e-7 relative per gradient. AdamW's update m / sqrt(v) is
invariant to the gradient scale, so such a perturbation moves an update by ~1e-7 of lr; ten steps stay far below
1e-5 of the parameters' size. A real bug (a micro-batch dropped or counted twice, a shard stepped by the wrong
rank, missing clipping) changes the gradient by O(1) and the parameters by ~lr / |w| ~ 1e-1 relative.
One exception: the key bias (the middle third of each fused attn.qkv.bias). Its gradient is zero in exact
arithmetic (softmax is invariant to adding q . b_k to every logit of a row), so in both runs it holds rounding
noise (~1e-12) that Adam turns into steps of lr * noise / eps. It is checked to stay noise-sized (|b_k| < 1e-4,
under 1% of the query/value biases) in both runs instead of being compared.
"""
from __future__ import annotations

import contextlib
import math

import pytest
import torch

from fastllm.models import GPT, BertConfig, BertForPreTraining, GPTConfig
from fastllm.train.optim import param_groups
from tests.parallel.harness import run_distributed

WORLD, MICRO, STEPS, B, T = 2, 2, 10, 2, 16
OPTIM = {"lr": 3e-3, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1}
CLIP = 0.5
RTOL = 1e-5
ZEROS = (0, 1, 2, 3)


# ---------------------------------------------------------------------------------------------- workloads
def make_model(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "gpt":
        return GPT(GPTConfig(vocab_size=101, n_positions=32, n_embd=32, n_layer=2, n_head=4, resid_pdrop=0.0,
                             embd_pdrop=0.0, attn_pdrop=0.0))
    return BertForPreTraining(BertConfig(vocab_size=101, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                         intermediate_size=64, max_position_embeddings=32, hidden_dropout_prob=0.0,
                                         attention_probs_dropout_prob=0.0))


def global_batch(kind: str, step: int) -> list[dict]:
    """WORLD * MICRO micro-batches; rank r takes [r * MICRO, (r + 1) * MICRO). Label counts vary per batch."""
    g = torch.Generator().manual_seed(1000 + step)
    out = []
    for _ in range(WORLD * MICRO):
        ids = torch.randint(1, 101, (B, T), generator=g)  # (B, T)
        keep = torch.rand(B, T, generator=g) < (0.8 if kind == "gpt" else 0.2)  # (B, T)
        keep[:, 1] = True  # every micro-batch has targets
        labels = torch.where(keep, ids, torch.full_like(ids, -100))
        mb = {"input_ids": ids, "labels": labels}
        if kind == "bert":
            mb["token_type_ids"] = (torch.arange(T) >= T // 2).long().expand(B, T)
            mb["next_sentence_label"] = torch.randint(0, 2, (B,), generator=g)
        out.append(mb)
    return out


def shares(kind: str, mbs: list[dict]) -> list[tuple[float, float]]:
    """Each micro-batch's share of the global batch's targets: (LM/MLM tokens, NSP sequences)."""
    tok = [int((mb["labels"][:, 1:] if kind == "gpt" else mb["labels"]).ne(-100).sum()) for mb in mbs]
    return [(t / sum(tok), B / (B * len(mbs))) for t in tok]


def weighted_loss(kind: str, model, mb: dict, w: tuple[float, float]) -> torch.Tensor:
    out = model(**mb)
    return out.loss * w[0] if kind == "gpt" else out.mlm_loss * w[0] + out.nsp_loss * w[1]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / max(float(b.double().norm()), 1e-12))


# ---------------------------------------------------------------------------------------------- reference
def reference(kind: str, steps: range, model=None, opt=None):
    """Single-process AdamW on whole global batches: (losses, norms, model, optimizer)."""
    model = model or make_model(kind)
    opt = opt or torch.optim.AdamW(param_groups(model, OPTIM["weight_decay"]), lr=OPTIM["lr"],
                                   betas=OPTIM["betas"], eps=OPTIM["eps"], foreach=False)
    params = [p for g in opt.param_groups for p in g["params"]]
    losses, norms = [], []
    for step in steps:
        mbs = global_batch(kind, step)
        total = 0.0
        for mb, w in zip(mbs, shares(kind, mbs)):
            loss = weighted_loss(kind, model, mb, w)
            loss.backward()
            total += float(loss.detach())
        norms.append(float(torch.nn.utils.clip_grad_norm_(params, CLIP)))
        opt.step()
        opt.zero_grad()
        losses.append(total)
    return losses, norms, model, opt


# ---------------------------------------------------------------------------------------------- engine runs
def train(engine, kind: str, steps: range, mesh, after_backward=None) -> tuple[list, list]:
    """The caller's side of the contract: weighted micro-batches, no_sync on all but the last, clip, step."""
    from fastllm.parallel.mesh import all_reduce
    losses, norms = [], []
    for step in steps:
        mbs = global_batch(kind, step)
        w = shares(kind, mbs)
        mine = range(mesh.dp_rank * len(mbs) // mesh.dp, (mesh.dp_rank + 1) * len(mbs) // mesh.dp)
        total = 0.0
        for j, i in enumerate(mine):
            with engine.no_sync() if j < len(mine) - 1 else contextlib.nullcontext():
                loss = weighted_loss(kind, engine.model, mbs[i], w[i])
                loss.backward()
            total += float(loss.detach())
            if after_backward is not None:
                after_backward()
        engine.finish_grads()
        assert engine.grads_finite()
        norms.append(engine.clip_grad_norm_(CLIP))
        engine.step()
        engine.zero_grad()
        losses.append(float(all_reduce(torch.tensor([total], dtype=torch.float64), mesh, "dp")))
    return losses, norms


def _gathered(model) -> dict:
    """Bytes of parameter storage allocated now, per top-level child and block (ZeRO-3 frees units)."""
    mods = {n: m for n, m in model.named_children() if n != "layers"}
    mods.update({f"layers.{i}": m for i, m in enumerate(getattr(model, "layers", []))})
    return {n: sum(p.untyped_storage().nbytes() for p in m.parameters()) for n, m in mods.items()}


def _scenario(kind: str, zero: int, mesh, checkpointing: bool = False) -> dict:
    from fastllm.parallel.data_parallel import build_data_parallel
    from fastllm.train.trainer import enable_activation_checkpointing
    model = make_model(kind)
    if checkpointing:
        enable_activation_checkpointing(model)
    engine = build_data_parallel(model, mesh, zero, OPTIM)
    seen = {"forward": [], "backward": []}
    if kind == "gpt" and zero == 3:  # what is gathered while block 1 runs forward, and after each backward
        model.layers[1].register_forward_pre_hook(lambda m, a: seen["forward"].append(_gathered(model)))
    comm0 = engine.comm_bytes
    losses, norms = train(engine, kind, range(1), mesh, lambda: seen["backward"].append(_gathered(model)))
    comm_step = engine.comm_bytes - comm0
    more = train(engine, kind, range(1, STEPS), mesh)
    res = {"losses": losses + more[0], "norms": norms + more[1], "params": engine.named_full_params(),
           "memory": engine.memory_bytes(), "comm_step": comm_step, "seen": seen}
    if kind == "gpt" and zero in (1, 3):  # the checkpoint round trip: state after STEPS, params after one more
        res["state"] = engine.optimizer_state()
        res["next_loss"] = train(engine, kind, range(STEPS, STEPS + 1), mesh)[0][0]
        res["next_params"] = engine.named_full_params()
    return res


def _bf16_memory(zero: int, mesh) -> dict:
    from fastllm.parallel.data_parallel import build_data_parallel
    engine = build_data_parallel(make_model("gpt").to(torch.bfloat16), mesh, zero, OPTIM)
    train(engine, "gpt", range(1), mesh)
    return engine.memory_bytes()


def _resume(zero: int, mesh, params: dict, state: dict, step: int) -> tuple[float, dict]:
    """Loads a (dp = 1) checkpoint into this layout and takes one step."""
    from fastllm.parallel.data_parallel import build_data_parallel
    engine = build_data_parallel(make_model("gpt"), mesh, zero, OPTIM)
    engine.load_full_params(params)
    engine.load_optimizer_state(state)
    loss = train(engine, "gpt", range(step, step + 1), mesh)[0][0]
    return loss, engine.named_full_params()


def _edge_cases(mesh) -> dict:
    from fastllm.parallel.data_parallel import build_data_parallel
    from fastllm.parallel.mesh import Mesh
    out = {}
    try:
        build_data_parallel(make_model("gpt"), Mesh(dp=1, pp=2), 3, OPTIM)
    except ValueError as e:
        out["pp"] = str(e)
    engine = build_data_parallel(make_model("gpt"), mesh, 0, OPTIM)
    mb = global_batch("gpt", 0)[0]
    engine.model(**mb).loss.backward()  # synchronizing
    try:
        engine.model(**mb).loss.backward()  # synchronizing again in the same step
    except RuntimeError as e:
        out["twice"] = str(e)
    engine.finish_grads()
    norm = engine.clip_grad_norm_(0.0)
    engine.unscale_(0.25)
    out["unscaled"] = (norm, engine.clip_grad_norm_(0.0))
    out["finite"] = engine.grads_finite()
    if mesh.dp_rank == 1:
        engine.model.ln_f.bias.grad[0] = float("inf")
    out["inf_seen"] = not engine.grads_finite()  # on both ranks
    return out


def _worker(rank: int, world: int, resume_from: dict) -> dict:
    from fastllm.parallel.mesh import Mesh
    mesh = Mesh(dp=world)
    out = {(kind, zero): _scenario(kind, zero, mesh) for kind in ("gpt", "bert") for zero in ZEROS}
    out[("gpt-checkpointing", 3)] = _scenario("gpt", 3, mesh, checkpointing=True)
    out["bf16"] = {zero: _bf16_memory(zero, mesh) for zero in ZEROS}
    out["resume"] = {zero: _resume(zero, mesh, **resume_from) for zero in (1, 3)}
    out["edge"] = _edge_cases(mesh)
    return out


# ---------------------------------------------------------------------------------------------- the run
@pytest.fixture(scope="module")
def run():
    """The dp = 1 checkpoint (zero 2, 3 steps) fed to the workers, then the workers' results per rank."""
    from fastllm.parallel.data_parallel import build_data_parallel
    from fastllm.parallel.mesh import Mesh
    torch.set_num_threads(1)
    engine = build_data_parallel(make_model("gpt"), Mesh(), 2, OPTIM)
    train(engine, "gpt", range(3), Mesh())
    ckpt = {"params": engine.named_full_params(), "state": engine.optimizer_state(), "step": 3}
    expected = train(engine, "gpt", range(3, 4), Mesh())[0][0], engine.named_full_params()
    return run_distributed(_worker, WORLD, ckpt), expected


@pytest.fixture(scope="module")
def references():
    torch.set_num_threads(1)
    return {kind: reference(kind, range(STEPS)) for kind in ("gpt", "bert")}


def _split_key_bias(name: str, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(t with the key-bias third zeroed, that third) for fused qkv biases; (t, None) otherwise."""
    if not name.endswith("attn.qkv.bias"):
        return t, None
    h = t.numel() // 3
    rest = t.clone()
    rest[h:2 * h] = 0
    return rest, t[h:2 * h]


def _close_params(got: dict, want: dict) -> None:
    assert list(got) == list(want)
    bad = {}
    for n, w in want.items():
        (a, ka), (b, kb) = _split_key_bias(n, got[n]), _split_key_bias(n, w)
        if rel(a, b) > RTOL:
            bad[n] = rel(a, b)
        if ka is not None and max(float(ka.abs().max()), float(kb.abs().max())) >= 1e-4:
            bad[n + " (key bias)"] = (float(ka.abs().max()), float(kb.abs().max()))
    assert not bad, bad


@pytest.mark.parametrize("kind,zero", [(k, z) for k in ("gpt", "bert") for z in ZEROS] + [("gpt-checkpointing", 3)])
def test_matches_single_process(run, references, kind, zero):
    ranks, _ = run
    losses, norms, model, _ = references[kind.split("-")[0]]
    want = {n: p.detach() for n, p in model.named_parameters()}
    for res in (r[(kind, zero)] for r in ranks):
        assert all(abs(a - b) <= RTOL * abs(b) for a, b in zip(res["losses"], losses)), (res["losses"], losses)
        assert all(abs(a - b) <= RTOL * b for a, b in zip(res["norms"], norms)), (res["norms"], norms)
        _close_params(res["params"], want)
    assert max(norms) > CLIP  # clipping was exercised
    a, b = (r[(kind, zero)]["params"] for r in ranks)
    assert all(torch.equal(a[n], b[n]) for n in a)  # replicas are bit-identical


def _table(psi: float, n: int, low: bool) -> dict:
    """Expected bytes per rank (module docstring): params, grads, optimizer per zero stage."""
    w = 2 if low else 4
    opt = 12 if low else 8
    return {0: (w * psi, w * psi, opt * psi), 1: (w * psi, w * psi, opt * psi / n),
            2: (w * psi, w * psi / n, opt * psi / n), 3: (w * psi / n, w * psi / n, opt * psi / n)}


@pytest.mark.parametrize("low", [True, False])
def test_memory_matches_zero_formulas(run, low):
    ranks, _ = run
    psi = sum(p.numel() for p in make_model("gpt").parameters())
    table = _table(psi, WORLD, low)
    for zero in ZEROS:
        mem = ranks[0]["bf16"][zero] if low else ranks[0][("gpt", zero)]["memory"]
        got = (mem["params"], mem["grads"], mem["optimizer"])
        assert all(abs(g - e) <= 0.1 * e for g, e in zip(got, table[zero])), (zero, got, table[zero])
    if low:  # the headline totals: 4Ψ + 12Ψ/N, 2Ψ + 14Ψ/N, 16Ψ/N
        totals = [sum(ranks[0]["bf16"][z].values()) for z in (1, 2, 3)]
        for t, e in zip(totals, (4 * psi + 12 * psi / WORLD, 2 * psi + 14 * psi / WORLD, 16 * psi / WORLD)):
            assert abs(t - e) <= 0.1 * e


def test_comm_bytes_follow_ring_formulas(run):
    """fp32 GPT, one step of 2 micro-batches: DDP all-reduces 4Ψ bytes once (2(N-1)/N = 1 at N = 2), ZeRO-1
    adds an all-gather of the params, ZeRO-2 reduce-scatters and all-gathers, ZeRO-3 gathers every unit for each
    forward, the blocks again for each backward, and reduce-scatters once. Padding: < 1 element per segment."""
    ranks, _ = run
    model = make_model("gpt")
    psi = sum(p.numel() for p in model.parameters())
    blocks = sum(p.numel() for n, p in model.named_parameters() if n.startswith("layers."))
    half = 4 * (WORLD - 1) / WORLD  # bytes per element of an all-gather or reduce-scatter at N = 2
    want = {0: 2 * half * psi, 1: 3 * half * psi, 2: 2 * half * psi,
            3: MICRO * half * (psi + blocks) + half * psi}
    for zero, e in want.items():
        got = ranks[0][("gpt", zero)]["comm_step"]
        assert abs(got - e) <= 64, (zero, got, e)


@pytest.mark.parametrize("zero", [1, 3])
def test_optimizer_state_dp2_to_dp1(run, zero):
    """State saved at dp = 2 loads into a dp = 1 DDP engine and takes the same next step."""
    from fastllm.parallel.data_parallel import build_data_parallel
    from fastllm.parallel.mesh import Mesh
    res = run[0][0][("gpt", zero)]
    engine = build_data_parallel(make_model("gpt"), Mesh(), 0, OPTIM)
    engine.load_full_params(res["params"])
    engine.load_optimizer_state(res["state"])
    assert res["state"]["step"] == STEPS
    loss = train(engine, "gpt", range(STEPS, STEPS + 1), Mesh())[0][0]
    assert abs(loss - res["next_loss"]) <= RTOL * abs(loss)
    _close_params(engine.named_full_params(), res["next_params"])


@pytest.mark.parametrize("zero", [1, 3])
def test_optimizer_state_dp1_to_dp2(run, zero):
    ranks, (loss, params) = run
    got_loss, got = ranks[0]["resume"][zero]
    assert abs(got_loss - loss) <= RTOL * abs(loss)
    _close_params(got, params)


def test_zero3_frees_units_outside_their_forward_and_backward(run):
    """While block 1 runs forward only it and the root are gathered; after each backward (step 0) nothing is."""
    seen = run[0][0][("gpt", 3)]["seen"]
    assert len(seen["forward"]) == MICRO * (STEPS + 1) and len(seen["backward"]) == MICRO
    for now in seen["forward"]:
        assert now["layers.0"] == 0 and now["layers.1"] > 0 and now["embeddings"] > 0, now
    for now in seen["backward"]:
        assert not any(now.values()), now


def test_edge_cases(run):
    for rank in run[0]:
        edge = rank["edge"]
        assert "ZeRO-3 cannot be combined with pipeline parallelism (pp=2)" in edge["pp"]
        assert "no_sync" in edge["twice"]
        before, after = edge["unscaled"]
        assert math.isclose(after, 0.25 * before, rel_tol=1e-6)
        assert edge["finite"] and edge["inf_seen"]  # an inf on rank 1 is seen by rank 0 too


def test_single_process_engine_equals_adamw():
    """dp = 1 (no torch.distributed): every stage is plain AdamW with clipping."""
    from fastllm.parallel.data_parallel import build_data_parallel
    from fastllm.parallel.mesh import Mesh
    torch.set_num_threads(1)
    losses, _, model, _ = reference("gpt", range(2))
    want = {n: p.detach() for n, p in model.named_parameters()}
    for zero in ZEROS:
        engine = build_data_parallel(make_model("gpt"), Mesh(), zero, OPTIM)
        got_losses, _ = train(engine, "gpt", range(2), Mesh())
        assert all(math.isclose(a, b, rel_tol=RTOL) for a, b in zip(got_losses, losses))
        _close_params(engine.named_full_params(), want)
