"""HuggingFace interop: `from_hf(dir)` loads a HF BERT or GPT-2 checkpoint, `to_hf(model, dir)` writes one.

Invariants:
- A checkpoint directory holds config.json and model.safetensors (or pytorch_model.bin, read with
  torch.load(weights_only=True)). The architecture comes from config.json's "architectures" (or `architecture=`).
- Weights are renamed by fixed rules; BERT's separate query/key/value are concatenated into the fused qkv
  (rows [q; k; v]); GPT-2's Conv1D weights (in, out) are transposed to Linear (out, in). to_hf inverts both.
- Loading is strict: a checkpoint key that maps to nothing, or a model weight the checkpoint lacks, raises
  CheckpointError naming the keys (strict=False keeps the fresh init for missing head weights, e.g. a new
  classifier on a BertModel checkpoint, and drops head weights the model has no use for, e.g. the MLM/NSP heads
  of a pre-training checkpoint under a classifier; body weights must always match). Unsupported config values
  raise ConfigError naming the key.
- Tied weights (decoder / lm_head = word embeddings) are written once, as transformers' save_pretrained does;
  tie_word_embeddings=False (BERT and GPT-2) loads and writes the decoder / lm_head as weights of their own.
- safetensors and transformers are optional dependencies imported lazily here.
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch

from fastllm.models import bert as bert_mod
from fastllm.models.config import BertConfig, ConfigError, GPTConfig
from fastllm.models.gpt import GPT

log = logging.getLogger("fastllm")

ACT_FROM_HF = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh",
               "relu": "relu"}
ACT_TO_HF = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu"}

BERT_CLASSES = {"BertModel": bert_mod.BertModel, "BertForPreTraining": bert_mod.BertForPreTraining,
                "BertForMaskedLM": bert_mod.BertForMaskedLM,
                "BertForSequenceClassification": bert_mod.BertForSequenceClassification,
                "BertForTokenClassification": bert_mod.BertForTokenClassification,
                "BertForQuestionAnswering": bert_mod.BertForQuestionAnswering,
                "BertForMultipleChoice": bert_mod.BertForMultipleChoice}
GPT_CLASSES = {"GPT2Model": GPT, "GPT2LMHeadModel": GPT}


class CheckpointError(ValueError):
    """A checkpoint's weights do not match the model (the message names the keys)."""


# ------------------------------------------------------------------------------------------ config mapping
def _need(d: dict, key: str, where: str):
    if key not in d:
        raise ConfigError(f"{where}: config.json lacks the required key {key!r}")
    return d[key]


def _reject(d: dict, key: str, ok, where: str) -> None:
    if key in d and d[key] not in ok:
        raise ConfigError(f"{where}: config.json {key}={d[key]!r} is not supported (supported: {list(ok)})")


def _activation(d: dict, key: str, default: str, where: str) -> str:
    act = d.get(key, default)
    if act not in ACT_FROM_HF:
        raise ConfigError(f"{where}: config.json {key}={act!r} is not supported (supported: {list(ACT_FROM_HF)})")
    return ACT_FROM_HF[act]


def bert_config_from_hf(d: dict, **overrides) -> BertConfig:
    where = "BERT checkpoint"
    _reject(d, "position_embedding_type", ("absolute",), where)
    _reject(d, "is_decoder", (False,), where)
    _reject(d, "add_cross_attention", (False,), where)
    keys = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
    cfg = {k: _need(d, k, where) for k in keys}
    for k in ("hidden_dropout_prob", "attention_probs_dropout_prob", "max_position_embeddings", "type_vocab_size",
              "initializer_range", "layer_norm_eps", "classifier_dropout", "problem_type", "tie_word_embeddings"):
        if k in d:
            cfg[k] = d[k]
    cfg["pad_token_id"] = d.get("pad_token_id") or 0
    cfg["hidden_act"] = _activation(d, "hidden_act", "gelu", where)
    if "id2label" in d or "num_labels" in d:
        cfg["num_labels"] = d.get("num_labels", len(d.get("id2label") or {}) or 2)
    return BertConfig(**{**cfg, **overrides})


def gpt_config_from_hf(d: dict, **overrides) -> GPTConfig:
    where = "GPT-2 checkpoint"
    _reject(d, "scale_attn_weights", (True,), where)
    _reject(d, "scale_attn_by_inverse_layer_idx", (False,), where)
    _reject(d, "add_cross_attention", (False,), where)
    cfg = {k: _need(d, k, where) for k in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head")}
    for k in ("n_inner", "resid_pdrop", "embd_pdrop", "attn_pdrop", "layer_norm_epsilon", "initializer_range",
              "tie_word_embeddings", "bos_token_id", "eos_token_id"):
        if k in d and d[k] is not None:
            cfg[k] = d[k]
    cfg["activation_function"] = _activation(d, "activation_function", "gelu_new", where)
    return GPTConfig(**{**cfg, **overrides})


def bert_config_to_hf(c: BertConfig, architecture: str) -> dict:
    if c.hidden_act not in ACT_TO_HF:
        raise ConfigError(f"BertConfig.hidden_act={c.hidden_act!r} has no HF equivalent")
    d = {k: v for k, v in c.to_dict().items() if k not in ("kernels", "num_labels", "problem_type")}
    d.update(model_type="bert", architectures=[architecture], hidden_act=ACT_TO_HF[c.hidden_act],
             position_embedding_type="absolute")
    d["id2label"] = {str(i): f"LABEL_{i}" for i in range(c.num_labels)}
    if c.problem_type is not None:
        d["problem_type"] = c.problem_type
    return d


def gpt_config_to_hf(c: GPTConfig) -> dict:
    if c.position != "learned" or c.n_kv_head not in (None, c.n_head) or c.activation_function not in ACT_TO_HF:
        raise ConfigError("GPTConfig: only learned positions, n_kv_head = n_head and gelu/gelu_tanh/relu map to GPT-2")
    d = {k: v for k, v in c.to_dict().items() if k not in ("kernels", "position", "n_kv_head")}
    d.update(model_type="gpt2", architectures=["GPT2LMHeadModel"], activation_function=ACT_TO_HF[c.activation_function])
    return d


# ------------------------------------------------------------------------------------------ weight mapping
# (HF key prefix, fastllm key prefix); "{i}" is a layer index. Body keys carry no "bert."/"transformer." here.
BERT_PAIRS = [
    ("embeddings.word_embeddings.", "embeddings.word."), ("embeddings.position_embeddings.", "embeddings.position."),
    ("embeddings.token_type_embeddings.", "embeddings.token_type."), ("embeddings.LayerNorm.", "embeddings.norm."),
    ("encoder.layer.{i}.attention.self.query.", "layers.{i}.attn.query."),
    ("encoder.layer.{i}.attention.self.key.", "layers.{i}.attn.key."),
    ("encoder.layer.{i}.attention.self.value.", "layers.{i}.attn.value."),
    ("encoder.layer.{i}.attention.output.dense.", "layers.{i}.attn.out."),
    ("encoder.layer.{i}.attention.output.LayerNorm.", "layers.{i}.norm1."),
    ("encoder.layer.{i}.intermediate.dense.", "layers.{i}.mlp.fc_in."),
    ("encoder.layer.{i}.output.dense.", "layers.{i}.mlp.fc_out."),
    ("encoder.layer.{i}.output.LayerNorm.", "layers.{i}.norm2."), ("pooler.dense.", "pooler.dense."),
]
BERT_HEAD_PAIRS = [
    ("cls.predictions.transform.dense.", "mlm.transform.dense."),
    ("cls.predictions.transform.LayerNorm.", "mlm.transform.norm."), ("cls.predictions.bias", "mlm.bias"),
    ("cls.predictions.decoder.", "mlm.decoder."),
    ("cls.seq_relationship.", "nsp."), ("classifier.", "classifier."), ("qa_outputs.", "qa_outputs."),
]
GPT_PAIRS = [
    ("wte.", "embeddings.word."), ("wpe.", "embeddings.position."), ("h.{i}.ln_1.", "layers.{i}.norm1."),
    ("h.{i}.attn.c_attn.", "layers.{i}.attn.qkv."), ("h.{i}.attn.c_proj.", "layers.{i}.attn.out."),
    ("h.{i}.ln_2.", "layers.{i}.norm2."), ("h.{i}.mlp.c_fc.", "layers.{i}.mlp.fc_in."),
    ("h.{i}.mlp.c_proj.", "layers.{i}.mlp.fc_out."), ("ln_f.", "ln_f."),
]
GPT_HEAD_PAIRS = [("lm_head.", "lm_head.")]
HEAD_NAMES = tuple({ours.split(".")[0] + "." for _, ours in BERT_HEAD_PAIRS + GPT_HEAD_PAIRS})
# Keys that carry no weights of their own: buffers (tied copies of another weight: _untie).
BERT_SKIP = re.compile(r"(^|\.)position_ids$")
BERT_DECODER = ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias")
GPT_SKIP = re.compile(r"\.attn\.(bias|masked_bias)$")
CONV1D = re.compile(r"\.(attn\.qkv|attn\.out|mlp\.fc_in|mlp\.fc_out)\.weight$")


def _rename(key: str, pairs, reverse: bool = False) -> str | None:
    for hf, ours in pairs:
        src, dst = (ours, hf) if reverse else (hf, ours)
        m = re.match(re.escape(src).replace(r"\{i\}", r"(\d+)"), key)
        if m:
            return (dst.replace("{i}", m.group(1)) if m.groups() else dst) + key[m.end():]
    return None


def _legacy(key: str) -> str:
    return re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", key))


def _merge_qkv(sd: dict) -> dict:
    """layers.i.attn.{query,key,value}.X -> layers.i.attn.qkv.X = cat([q; k; v], dim 0)."""
    out = {k: v for k, v in sd.items() if not re.search(r"\.attn\.(query|key|value)\.", k)}
    for k in sd:
        m = re.match(r"(.*\.attn\.)query\.(\w+)$", k)
        if m:
            parts = [sd.get(f"{m.group(1)}{n}.{m.group(2)}") for n in ("query", "key", "value")]
            if any(p is None for p in parts):
                raise CheckpointError(f"checkpoint has {k} but lacks its key/value partner")
            out[f"{m.group(1)}qkv.{m.group(2)}"] = torch.cat(parts, dim=0)
    return out


def _split_qkv(sd: dict) -> dict:
    out = {k: v for k, v in sd.items() if ".attn.qkv." not in k}
    for k, v in sd.items():
        m = re.match(r"(.*\.attn\.)qkv\.(\w+)$", k)
        if m:
            for name, part in zip(("query", "key", "value"), v.chunk(3, dim=0)):
                out[f"{m.group(1)}{name}.{m.group(2)}"] = part.contiguous()
    return out


def map_hf_keys(hf_sd: dict, family: str, body_prefix: str) -> tuple[dict, list[str]]:
    """HF state dict -> (fastllm state dict, HF keys that map to nothing)."""
    pairs, heads, skip, strip = ((BERT_PAIRS, BERT_HEAD_PAIRS, BERT_SKIP, "bert.") if family == "bert" else
                                 (GPT_PAIRS, GPT_HEAD_PAIRS, GPT_SKIP, "transformer."))
    out, unknown = {}, []
    for key, value in hf_sd.items():
        k = _legacy(key)
        if skip.search(k):
            continue
        body = k.removeprefix(strip)
        name = _rename(body, pairs)
        name = body_prefix + name if name is not None else _rename(k, heads)
        if name is None:
            unknown.append(key)
            continue
        out[name] = value.t().contiguous() if family == "gpt" and CONV1D.search(name) else value
    return (_merge_qkv(out) if family == "bert" else out), unknown


def _to_hf_keys(sd: dict, family: str, body_prefix: str, hf_prefix: str) -> dict:
    """fastllm state dict -> HF state dict (inverse of map_hf_keys)."""
    pairs, heads = (BERT_PAIRS, BERT_HEAD_PAIRS) if family == "bert" else (GPT_PAIRS, GPT_HEAD_PAIRS)
    sd = _split_qkv(sd) if family == "bert" else sd
    out = {}
    for key, value in sd.items():
        body = key[len(body_prefix):] if key.startswith(body_prefix) else None
        name = _rename(body, pairs, reverse=True) if body is not None else None
        name = hf_prefix + name if name is not None else _rename(key, heads, reverse=True)
        if name is None:
            raise CheckpointError(f"to_hf: no HF name for the fastllm weight {key!r}")
        value = value.t() if family == "gpt" and CONV1D.search(key) else value
        out[name] = value.detach().contiguous().clone()
    return out


# ------------------------------------------------------------------------------------------ files
def read_config(path: Path) -> dict:
    f = path / "config.json"
    if not f.is_file():
        raise FileNotFoundError(f"{path}: no config.json (expected a HF checkpoint directory)")
    return json.loads(f.read_text())


def read_weights(path: Path) -> dict:
    """The state dict of model.safetensors, a sharded safetensors index, or pytorch_model.bin."""
    if (path / "model.safetensors").is_file():
        from safetensors.torch import load_file

        return load_file(str(path / "model.safetensors"))
    index = path / "model.safetensors.index.json"
    if index.is_file():
        from safetensors.torch import load_file

        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return {k: v for s in shards for k, v in load_file(str(path / s)).items()}
    if (path / "pytorch_model.bin").is_file():
        return torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{path}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def _family(d: dict, architecture: str) -> str:
    if architecture in BERT_CLASSES:
        return "bert"
    if architecture in GPT_CLASSES:
        return "gpt"
    known = sorted([*BERT_CLASSES, *GPT_CLASSES])
    raise ConfigError(f"architecture {architecture!r} (model_type {d.get('model_type')!r}) is not supported; "
                      f"supported: {known}")


def _build(d: dict, architecture: str, overrides: dict):
    if _family(d, architecture) == "bert":
        cls = BERT_CLASSES[architecture]
        return cls(bert_config_from_hf(d, **overrides)), "bert", ("" if cls is bert_mod.BertModel else "bert.")
    return GPT(gpt_config_from_hf(d, **overrides)), "gpt", ""


def _load_state(model, mapped: dict, unknown: list[str], strict: bool) -> None:
    own = model.state_dict()
    missing = sorted(set(own) - set(mapped))
    unused_heads = sorted(k for k in set(mapped) - set(own) if k.startswith(HEAD_NAMES))
    if unused_heads and not strict:  # e.g. a classifier built on a pre-training checkpoint: HF drops them too
        log.warning("fastllm: %s does not use the checkpoint's head weights %s", type(model).__name__, unused_heads)
        mapped = {k: v for k, v in mapped.items() if k not in unused_heads}
    unexpected = sorted(set(unknown) | (set(mapped) - set(own)))
    if unexpected:
        raise CheckpointError(f"checkpoint keys that match no weight of {type(model).__name__}: {unexpected}")
    heads_only = all(not k.startswith(("bert.", "embeddings.", "layers.")) for k in missing)
    if missing and (strict or not heads_only):
        raise CheckpointError(f"checkpoint lacks weights of {type(model).__name__}: {missing}")
    if missing:
        log.warning("fastllm: %s keeps freshly initialized %s", type(model).__name__, missing)
    for k, v in mapped.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise CheckpointError(f"weight {k}: checkpoint shape {tuple(v.shape)} != model {tuple(own[k].shape)}")
    model.load_state_dict({**own, **mapped}, strict=True)


def _untie(hf_sd: dict, family: str, tied: bool) -> dict:
    """hf_sd without the copies of tied weights (GPT-2's lm_head, BERT's decoder: older checkpoints store them).
    An untied BERT decoder saved by transformers 4 shares cls.predictions.bias and stores it once: its bias."""
    if family == "gpt":
        return {k: v for k, v in hf_sd.items() if k != "lm_head.weight"} if tied else hf_sd
    weight, bias = BERT_DECODER
    if tied:
        return {k: v for k, v in hf_sd.items() if k not in BERT_DECODER}
    if weight in hf_sd and bias not in hf_sd and "cls.predictions.bias" in hf_sd:
        return {**hf_sd, bias: hf_sd["cls.predictions.bias"]}
    return hf_sd


def from_hf(path_or_dir, *, architecture: str | None = None, strict: bool = True, **config_overrides):
    """Loads a HF BERT / GPT-2 checkpoint directory into the matching fastllm model (in eval mode).

    architecture overrides config.json's "architectures" (e.g. a BertForSequenceClassification on a BertModel
    checkpoint, with strict=False to keep a fresh classifier); config_overrides set fastllm config fields."""
    path = Path(path_or_dir)
    d = read_config(path)
    arch = architecture or (d.get("architectures") or [None])[0]
    if arch is None:
        arch = {"bert": "BertModel", "gpt2": "GPT2LMHeadModel"}.get(d.get("model_type"), d.get("model_type"))
    model, family, prefix = _build(d, arch, config_overrides)
    hf_sd = _untie(read_weights(path), family, model.config.tie_word_embeddings)
    mapped, unknown = map_hf_keys(hf_sd, family, prefix)
    _load_state(model, mapped, unknown, strict)
    return model.eval()


def _architecture(model) -> tuple[str, dict, str, str]:
    """(HF architecture, HF config dict, fastllm body prefix, HF body prefix) of a fastllm model."""
    if isinstance(model, GPT):
        return "GPT2LMHeadModel", gpt_config_to_hf(model.config), "", "transformer."
    for name, cls in BERT_CLASSES.items():
        if type(model) is cls:
            base = cls is bert_mod.BertModel
            return name, bert_config_to_hf(model.config, name), ("" if base else "bert."), ("" if base else "bert.")
    raise TypeError(f"to_hf: {type(model).__name__} has no HuggingFace equivalent")


def to_hf(model, out_dir) -> Path:
    """Writes config.json + model.safetensors that transformers' from_pretrained loads into the same model."""
    from safetensors.torch import save_file

    _arch, config, body, hf_prefix = _architecture(model)
    family = "gpt" if isinstance(model, GPT) else "bert"
    sd = _to_hf_keys(model.state_dict(), family, body, hf_prefix)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out
