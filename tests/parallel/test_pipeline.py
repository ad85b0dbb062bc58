"""Pipeline parallelism: 2-stage GPT and BertForPreTraining (gloo, GPipe and 1F1B) match the single process.

One spawned 2-process run does every distributed check (each spawn costs seconds on 2 shared cores) and returns
plain tensors; the parent computes the single-process references and compares.

Tolerance (fp32): a stage runs exactly the single-process ops on the same shapes; what differs is summation
order. The tied word-embedding gradient is (sum over micro-batches of the embedding part) + (sum of the head part)
instead of per-micro-batch interleaved sums, and the parent's kernels may use 2 threads where a worker uses 1.
Each reassociation of a sum of a few O(|g|) terms moves it by a few ulp (2^-23 ~ 1.2e-7 relative), so
rtol = 1e-5 with atol = 1e-5 * max|g| (gradients near zero have no relative precision) leaves ~50x margin while
a wrong gradient (a missing micro-batch, an unsynced tied grad, a wrong weight) is off by >= 10%.
"""
import contextlib

import pytest
import torch

from fastllm.models import GPT, BertConfig, BertForPreTraining, GPTConfig
from fastllm.parallel.mesh import Mesh
from fastllm.parallel.pipeline import (
    PipelineError,
    PipelineStats,
    build_stage,
    pipeline_forward,
    run_schedule,
    split_layers,
    sync_tied_grads,
)
from tests.parallel.harness import run_distributed

M, B, T = 4, 2, 8  # micro-batches, their batch size and length
SCHEDULES = ("gpipe", "1f1b")


def _config(kind: str, layers: int = 3):
    if kind == "gpt":
        return GPTConfig(vocab_size=101, n_positions=32, n_embd=32, n_layer=layers, n_head=4, resid_pdrop=0.0,
                         embd_pdrop=0.0, attn_pdrop=0.0)
    return BertConfig(vocab_size=101, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                      intermediate_size=64, max_position_embeddings=32, hidden_dropout_prob=0.0,
                      attention_probs_dropout_prob=0.0, tie_word_embeddings=kind != "bert_untied")


def _model(kind: str, layers: int = 3):
    torch.manual_seed(0)
    return (GPT if kind == "gpt" else BertForPreTraining)(_config(kind, layers)).train()


def _micro_batches(kind: str) -> list[dict]:
    """M micro-batches (B, T) with right padding (mask 0, label -100); BERT: ~30% MLM labels and NSP labels."""
    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(M):
        ids = torch.randint(1, 101, (B, T), generator=g)  # (B, T)
        mask = torch.ones(B, T, dtype=torch.long)
        mask[1, T - 1 - i:] = 0  # micro-batch i pads i + 1 tokens of row 1
        labels = ids.masked_fill(mask == 0, -100)  # (B, T)
        if kind == "gpt":
            out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
            continue
        labels = labels.masked_fill(torch.rand(B, T, generator=g) > 0.3, -100)
        labels[:, 0] = ids[:, 0]  # at least one MLM label per row
        types = (torch.arange(T) >= T // 2).long().expand(B, T)  # (B, T)
        out.append({"input_ids": ids, "attention_mask": mask, "token_type_ids": types, "labels": labels,
                    "next_sentence_label": torch.tensor([i % 2, 1 - i % 2])})
    return out


def _loss_fn(kind: str, mbs: list[dict]):
    """Each micro-batch weighted differently (as a caller weighting by its share of the global batch would)."""
    weights = {id(mb): (i + 1) / 10 for i, mb in enumerate(mbs)}
    if kind == "gpt":
        return lambda out, mb: out.loss * weights[id(mb)]
    return lambda out, mb: (out.mlm_loss + 0.5 * out.nsp_loss) * weights[id(mb)]


def _reference(kind: str, autocast: bool = False) -> tuple[float, dict]:
    """Summed weighted loss and gradients of the single-process model."""
    model, mbs = _model(kind), _micro_batches(kind)
    fn, total = _loss_fn(kind, mbs), 0.0
    for mb in mbs:
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            loss = fn(model(**mb), mb)
        loss.backward()
        total += float(loss.detach())
    return total, {n: p.grad.clone() for n, p in model.named_parameters()}


class _Counter:
    """A no_sync stand-in that counts how many backwards ran inside it."""

    def __init__(self):
        self.n = 0

    @contextlib.contextmanager
    def __call__(self):
        self.n += 1
        yield


# ---------------------------------------------------------------------- what each of the 2 processes runs
def _train_case(kind: str, schedule: str, mesh: Mesh) -> dict:
    stage, mbs, stats, counter = build_stage(_model(kind), mesh), _micro_batches(kind), PipelineStats(), _Counter()
    loss = run_schedule(stage, mbs, _loss_fn(kind, mbs), mesh, schedule, no_sync=counter, stats=stats)
    sync_tied_grads(stage, mesh)
    named = list(stage.named_parameters())
    return {"loss": loss, "grads": {n: p.grad.clone() for n, p in named}, "no_sync": counter.n,
            "in_flight": stats.max_in_flight, "busy": stats.busy_s, "total": stats.total_s,
            "flags": {n: (getattr(p, "tied", False), getattr(p, "tied_copy", False)) for n, p in named}}


def _eval_case(kind: str, mesh: Mesh):
    stage = build_stage(_model(kind), mesh).eval()
    out = pipeline_forward(stage, _micro_batches(kind)[0], mesh)
    return None if out is None else (out.logits if kind == "gpt" else out.prediction_logits)


def _adamw_case(mesh: Mesh) -> dict:
    stage, mbs = build_stage(_model("gpt"), mesh), _micro_batches("gpt")
    opt = torch.optim.AdamW(stage.parameters(), lr=1e-2, weight_decay=0.1)
    losses = []
    for _ in range(3):
        opt.zero_grad()
        losses.append(run_schedule(stage, mbs, _loss_fn("gpt", mbs), mesh, "1f1b"))
        sync_tied_grads(stage, mesh)
        opt.step()
    return {"losses": losses, "word": stage.embeddings.word.weight.detach().clone()}


def _all_checks(rank: int, world: int) -> dict:
    mesh = Mesh(pp=2)
    out = {"train": {(k, s): _train_case(k, s, mesh) for k in ("gpt", "bert") for s in SCHEDULES}}
    out["train"][("bert_untied", "1f1b")] = _train_case("bert_untied", "1f1b", mesh)
    with torch.autocast("cpu", torch.bfloat16):
        out["bf16"] = _train_case("gpt", "1f1b", mesh)
    out["eval"] = {k: _eval_case(k, mesh) for k in ("gpt", "bert")}
    out["adamw"] = _adamw_case(mesh)
    try:
        build_stage(_model("gpt", layers=1), mesh)
        out["too_few_layers"] = None
    except PipelineError as e:
        out["too_few_layers"] = str(e)
    return out


@pytest.fixture(scope="module")
def ranks() -> list[dict]:
    return run_distributed(_all_checks, 2)


# ---------------------------------------------------------------------- comparisons in the parent
def _close(got: torch.Tensor, want: torch.Tensor, name: str) -> None:
    atol = 1e-5 * float(want.abs().max())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=atol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("kind", ["gpt", "bert"])
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_loss_and_every_gradient_match_single_process(ranks, kind, schedule):
    want_loss, want_grads = _reference(kind)
    first, last = ranks[0]["train"][(kind, schedule)], ranks[1]["train"][(kind, schedule)]
    assert first["loss"] == 0.0
    assert last["loss"] == pytest.approx(want_loss, rel=1e-6)
    assert set(first["grads"]) | set(last["grads"]) == set(want_grads)  # names preserved, nothing lost
    for r in (first, last):
        for name, g in r["grads"].items():
            _close(g, want_grads[name], name)
        assert r["no_sync"] == M - 1  # every backward but the last delays gradient reduction


def _layer_ids(names: set, prefix: str) -> set:
    return {n[len(prefix):].split(".")[1] for n in names if n.startswith(f"{prefix}layers.")}


@pytest.mark.parametrize("kind", ["gpt", "bert"])
def test_stage_layout_and_tied_flags(ranks, kind):
    first, last = (set(r["train"][(kind, "1f1b")]["grads"]) for r in ranks)
    prefix = "" if kind == "gpt" else "bert."
    word = f"{prefix}embeddings.word.weight"
    assert first & last == {word}  # the tied word embedding: owner on stage 0, copy on stage 1
    assert _layer_ids(first, prefix) == {"0", "1"} and _layer_ids(last, prefix) == {"2"}  # original indices
    assert any("position" in n for n in first) and not any("position" in n for n in last)
    head = "ln_f" if kind == "gpt" else "nsp"
    assert any(n.startswith(head) for n in last) and not any(n.startswith(head) for n in first)
    assert ranks[0]["train"][(kind, "1f1b")]["flags"][word] == (True, False)
    assert ranks[1]["train"][(kind, "1f1b")]["flags"][word] == (True, True)


def test_untied_bert_decoder_lives_on_the_last_stage_only(ranks):
    want_loss, want_grads = _reference("bert_untied")
    first, last = (r["train"][("bert_untied", "1f1b")] for r in ranks)
    assert last["loss"] == pytest.approx(want_loss, rel=1e-6)
    assert not set(first["grads"]) & set(last["grads"])  # nothing shared: the decoder is its own weight
    assert "mlm.decoder.weight" in last["grads"] and "bert.embeddings.word.weight" in first["grads"]
    for r in (first, last):
        for name, g in r["grads"].items():
            _close(g, want_grads[name], name)


def test_1f1b_holds_at_most_pp_micro_batches(ranks):
    for kind in ("gpt", "bert"):
        assert [r["train"][(kind, "1f1b")]["in_flight"] for r in ranks] == [2, 1]  # pp - stage
        assert [r["train"][(kind, "gpipe")]["in_flight"] for r in ranks] == [M, M]
        assert all(0 < r["train"][(kind, "1f1b")]["busy"] <= r["train"][(kind, "1f1b")]["total"] for r in ranks)


def test_bf16_autocast_activations_travel(ranks):
    # Under autocast a GPT stage sends a bf16 delta and an fp32 residual; both travel unrounded, so the stages run
    # the single-process ops on identical inputs and loss and gradients agree to fp32 summation order (the
    # tolerance above), while rounding the fp32 residual to bf16 on the wire would move gradients by ~2^-9.
    want_loss, want_grads = _reference("gpt", autocast=True)
    assert ranks[0]["bf16"]["loss"] == 0.0
    assert ranks[1]["bf16"]["loss"] == pytest.approx(want_loss, rel=1e-6)
    for r in ranks:
        for name, g in r["bf16"]["grads"].items():
            _close(g, want_grads[name], name)


@pytest.mark.parametrize("kind", ["gpt", "bert"])
def test_pipeline_forward_logits(ranks, kind):
    model = _model(kind).eval()
    with torch.no_grad():
        out = model(**_micro_batches(kind)[0])
    want = out.logits if kind == "gpt" else out.prediction_logits
    assert ranks[0]["eval"][kind] is None
    _close(ranks[1]["eval"][kind], want, "logits")


def test_adamw_keeps_tied_owner_and_copy_equal(ranks):
    assert torch.equal(ranks[0]["adamw"]["word"], ranks[1]["adamw"]["word"])
    model, mbs = _model("gpt"), _micro_batches("gpt")
    opt, fn, want = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1), _loss_fn("gpt", mbs), []
    for _ in range(3):
        opt.zero_grad()
        total = 0.0
        for mb in mbs:
            loss = fn(model(**mb), mb)
            loss.backward()
            total += float(loss.detach())
        want.append(total)
        opt.step()
    # Adam divides by sqrt(v): ulp-level gradient differences stay ulp-level in the update (relative), so the
    # losses after 2 steps agree far better than 1e-4.
    assert ranks[1]["adamw"]["losses"] == pytest.approx(want, rel=1e-4)
    torch.testing.assert_close(ranks[0]["adamw"]["word"], model.embeddings.word.weight.detach(), rtol=1e-4,
                               atol=1e-6)


def test_more_stages_than_layers_is_an_error_on_every_rank(ranks):
    for r in ranks:
        assert "pp=2" in r["too_few_layers"] and "1 layers" in r["too_few_layers"]


# ---------------------------------------------------------------------- single process
def test_split_layers_earlier_stages_take_the_extra_layer():
    assert split_layers(7, 3) == [range(3), range(3, 5), range(5, 7)]
    assert split_layers(4, 4) == [range(i, i + 1) for i in range(4)]
    with pytest.raises(PipelineError, match="pp=5 exceeds the model's 4 layers"):
        split_layers(4, 5)


def test_pp1_is_the_model_and_run_schedule_accumulates():
    mesh, model = Mesh(), _model("gpt")
    assert build_stage(model, mesh) is model
    mbs = _micro_batches("gpt")
    loss = run_schedule(model, mbs, _loss_fn("gpt", mbs), mesh, "1f1b")
    want_loss, want_grads = _reference("gpt")
    assert loss == pytest.approx(want_loss, rel=1e-6)
    for n, p in model.named_parameters():
        _close(p.grad, want_grads[n], n)
    with pytest.raises(PipelineError, match="schedule must be one of"):
        run_schedule(model, mbs, _loss_fn("gpt", mbs), mesh, "zigzag")
