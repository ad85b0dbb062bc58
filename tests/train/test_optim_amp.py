"""AdamW groups, LR schedule, and the fp16 loss scaler: injected inf/NaN gradients skip the step and leave the
weights untouched; the scale backs off and grows after N clean steps."""
import math

import torch

from fastllm.models import GPT, preset
from fastllm.parallel.engine import Layout, ParallelEngine
from fastllm.parallel.mesh import Mesh
from fastllm.train.amp import LossScaler
from fastllm.train.optim import param_groups
from fastllm.train.schedule import WarmupDecay, lr_factor
from fastllm.train.trainer import Trainer


def _model():
    torch.manual_seed(0)
    return GPT(preset("gpt-nano", vocab_size=64, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))


def test_no_weight_decay_on_biases_and_norms():
    m = _model()
    decay, no_decay = param_groups(m, 0.1)
    names = {id(p): n for n, p in m.named_parameters()}
    assert all(p.ndim >= 2 for p in decay["params"]) and decay["weight_decay"] == 0.1
    assert no_decay["weight_decay"] == 0.0
    assert any("ln" in names[id(p)] or "norm" in names[id(p)] for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(m.parameters()))


def test_schedule_warmup_then_decay():
    assert lr_factor(0, 10, 100, "linear", 0.0) == 0.1 and lr_factor(9, 10, 100, "linear", 0.0) == 1.0
    assert math.isclose(lr_factor(55, 10, 100, "linear", 0.0), 0.5)
    assert math.isclose(lr_factor(55, 10, 100, "cosine", 0.0), 0.5) and lr_factor(32, 10, 100, "cosine", 0) > 0.5
    assert math.isclose(lr_factor(100, 10, 100, "cosine", 0.1), 0.1)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    s = WarmupDecay(opt, 2.0, 4, 8)
    s.step()
    assert opt.param_groups[0]["lr"] == 1.0


def _trainer(scaler):
    engine = ParallelEngine(_model(), Mesh(), Layout(), {"lr": 1e-2, "betas": (0.9, 0.98), "eps": 1e-6,
                                                         "weight_decay": 0.01})
    return Trainer(engine, WarmupDecay(engine, 1e-2, 0, 100), scaler, precision="fp32")


def _batch():
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    return [{"input_ids": ids, "labels": ids}]


def test_injected_inf_skips_the_step_and_backs_off():
    scaler = LossScaler(True, init_scale=1024.0, growth_interval=2)
    tr = _trainer(scaler)
    before = [p.detach().clone() for p in tr.model.parameters()]
    w = tr.model.embeddings.word.weight
    for bad in (math.inf, math.nan):
        h = w.register_hook(lambda g, bad=bad: g.index_fill(0, torch.tensor([0]), bad))
        res = tr.train_step(_batch())
        h.remove()
        assert not res.finite
        assert all(torch.equal(a, b) for a, b in zip(before, tr.model.parameters()))
    assert scaler.skipped == 2 and scaler.scale == 256.0
    assert not tr.engine.dp.optimizer.state  # AdamW never stepped
    for _ in range(2):
        assert tr.train_step(_batch()).finite
    assert scaler.scale == 512.0  # grew after 2 clean steps
    assert not all(torch.equal(a, b) for a, b in zip(before, tr.model.parameters()))


def test_fp16_scaled_gradients_equal_unscaled():
    a, b = _trainer(LossScaler(False)), _trainer(LossScaler(True, init_scale=2.0 ** 10))
    a.train_step(_batch())
    b.train_step(_batch())
    for p, q in zip(a.model.parameters(), b.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_activation_checkpointing_gives_the_same_gradients():
    from fastllm.train.trainer import enable_activation_checkpointing
    grads = []
    for ckpt in (False, True):
        tr = _trainer(LossScaler(False))
        if ckpt:
            assert enable_activation_checkpointing(tr.model) == 2
        ids = _batch()[0]["input_ids"]
        tr.model(input_ids=ids, labels=ids).loss.backward()
        grads.append([p.grad.clone() for p in tr.model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*grads))
