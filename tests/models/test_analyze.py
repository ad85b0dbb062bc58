"""fastllm.analyze: parameter table, analytic FLOPs (masked-only MLM head), memory, timing, attention PNG."""
import torch

from fastllm import analyze
from fastllm.models import GPT, BertForPreTraining
from tests.models.helpers import require, tiny_bert, tiny_gpt


def test_parameter_table_and_gpt_flops():
    model = GPT(tiny_gpt())
    table = dict(analyze.parameter_table(model, depth=1))
    assert table["total"] == sum(p.numel() for p in model.parameters())
    assert table["embeddings"] + table["layers"] + table["ln_f"] == table["total"]  # the LM head is tied
    c, t = model.config, 16
    per_layer = 2 * (32 * 96 + 32 * 32 + 2 * 32 * 128) + 4 * (t + 1) / 2 * 32  # qkv, out, mlp; causal attention
    f = analyze.gpt_flops(model, t)
    assert f.forward == c.n_layer * per_layer + 2 * 32 * c.vocab_size and f.train == 3 * f.forward


def test_mlm_head_and_last_layer_are_counted_on_loss_rows_only():
    model = BertForPreTraining(tiny_bert())
    head = 2 * 32 * 32 + 2 * 32 * 101  # transform dense + decoder, per token
    rows = 2 * 32 * 32 + 2 * 32 * 32 + 2 * (2 * 32 * 48) + 4 * 16 * 32  # last layer: q, out, MLP, attention
    full, masked = analyze.bert_flops(model, 16, 1.0), analyze.bert_flops(model, 16, 0.15)
    assert full.forward == masked.forward  # inference computes every token's logits
    skipped = 0.85 * head + (1 - (0.15 + 1 / 16)) * rows  # masked tokens + [CLS] keep their rows
    assert abs((full.train - masked.train) - 3 * skipped) < 1e-6 * full.train


def test_cli_report_writes_attention_png(tmp_path, capsys):
    require("matplotlib")
    png = tmp_path / "att.png"
    analyze.main(["--model.preset", "gpt-nano", "--seq-len", "8", "--repeats", "1", "--threads", "1",
                  "--attention-png", str(png), "--layer", "1"])
    text = capsys.readouterr().out
    assert "FLOPs per token" in text and "memory estimate" in text and "inference forward" in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    maps = analyze.attention_maps(GPT(tiny_gpt()), {"input_ids": torch.randint(0, 97, (1, 6))})
    assert torch.allclose(maps[0].sum(-1), torch.ones(1, 4, 6))  # rows are probability distributions
    assert (maps[0][0, :, 0, 1:] == 0).all()  # causal: the first token sees only itself
