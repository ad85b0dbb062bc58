"""fastllm.nn.Dropout: torch.nn.Dropout's interface on the counter-hash op, used by every model block."""
import pytest
import torch

from fastllm.models import GPT, BertForPreTraining
from fastllm.nn import Dropout
from fastllm.ops.dropout import dropout
from tests.models.helpers import tiny_bert, tiny_gpt


@pytest.mark.parametrize("kernels", ["auto", "reference"])
def test_training_mode_is_the_op_with_a_seed_from_torch_generator(kernels):
    drop = Dropout(0.25, kernels).train()
    x = torch.randn(6, 33, requires_grad=True)
    torch.manual_seed(3)
    y = drop(x)
    torch.manual_seed(3)
    expected = dropout(x.detach(), 0.25, backend=drop.backend["dropout"])
    assert torch.equal(y, expected)
    kept = y != 0  # x has no exact zeros (randn), so a zero output is a dropped element
    assert 0 < int(kept.sum()) < x.numel()
    y.backward(torch.ones_like(y))
    assert torch.equal(x.grad, kept.float() / 0.75)  # 1 / (1 - p) where kept, 0 elsewhere


def test_eval_mode_and_zero_p_are_the_identity_and_bad_p_is_refused():
    x = torch.randn(4, 8)
    assert Dropout(0.5).eval()(x) is x
    assert Dropout(0.0).train()(x) is x
    for p in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match="p must be in"):
            Dropout(p)


def test_models_use_the_fused_dropout_everywhere():
    for model in (BertForPreTraining(tiny_bert()), GPT(tiny_gpt())):
        assert not any(type(m) is torch.nn.Dropout for m in model.modules())
        assert any(isinstance(m, Dropout) and m.p > 0 for m in model.modules())
