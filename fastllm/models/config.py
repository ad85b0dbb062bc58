"""Typed, validated model configs: BertConfig, GPTConfig, TransformerConfig.

Invariants:
- Every config is a dataclass; __post_init__ validates each field and raises ConfigError naming the field,
  its value and the rule it breaks. from_dict() rejects unknown keys by name; to_dict() round-trips.
- `kernels` ("auto", a backend name, or "op=backend,...") is passed down to every block: the fastllm.ops
  backends are chosen once when the model is built (fastllm.nn._kernels).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "swiglu")


class ConfigError(ValueError):
    """A config field has a bad value (the message names the field)."""


def _require(ok: bool, cls: str, field: str, value, rule: str) -> None:
    if not ok:
        raise ConfigError(f"{cls}.{field} = {value!r}: {rule}")


class _Config:
    def _positive(self, *names: str) -> None:
        for n in names:
            v = getattr(self, n)
            _require(isinstance(v, int) and not isinstance(v, bool) and v > 0, type(self).__name__, n, v,
                     "must be a positive int")

    def _probability(self, *names: str) -> None:
        for n in names:
            v = getattr(self, n)
            _require(isinstance(v, (int, float)) and 0.0 <= v < 1.0, type(self).__name__, n, v, "must be in [0, 1)")

    def _check(self, ok: bool, field: str, rule: str) -> None:
        _require(ok, type(self).__name__, field, getattr(self, field), rule)

    def _check_heads(self, hidden: str, heads: str) -> None:
        self._check(getattr(self, hidden) % getattr(self, heads) == 0, hidden, f"must be divisible by {heads}")

    @classmethod
    def from_dict(cls, data: dict):
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"{cls.__name__}: unknown config key(s) {unknown}; valid keys: {sorted(names)}")
        return cls(**data)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)


@dataclass
class BertConfig(_Config):
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    num_labels: int = 2
    classifier_dropout: float | None = None
    problem_type: str | None = None  # None: inferred as in HF (regression / single / multi label)
    tie_word_embeddings: bool = True  # MLM decoder = word embeddings; False: its own (V, H) weight and bias
    kernels: str = "auto"

    def __post_init__(self):
        self._positive("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                       "max_position_embeddings", "num_labels")
        self._check_heads("hidden_size", "num_attention_heads")
        self._probability("hidden_dropout_prob", "attention_probs_dropout_prob")
        self._check(self.hidden_act in ACTIVATIONS, "hidden_act", f"must be one of {ACTIVATIONS}")
        self._check(self.type_vocab_size >= 0, "type_vocab_size", "must be >= 0")
        self._check(self.layer_norm_eps > 0, "layer_norm_eps", "must be > 0")
        self._check(self.initializer_range > 0, "initializer_range", "must be > 0")
        self._check(self.classifier_dropout is None or 0 <= self.classifier_dropout < 1, "classifier_dropout",
                    "must be None or in [0, 1)")
        self._check(self.problem_type in (None, "regression", "single_label_classification",
                                          "multi_label_classification"), "problem_type", "unknown problem type")


@dataclass
class GPTConfig(_Config):
    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int | None = None  # grouped-query attention; None = n_head
    n_inner: int | None = None  # None = 4 * n_embd
    activation_function: str = "gelu_tanh"
    position: str = "learned"  # learned | rope
    resid_pdrop: float = 0.1
    embd_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    tie_word_embeddings: bool = True
    bos_token_id: int = 50256
    eos_token_id: int = 50256
    kernels: str = "auto"

    def __post_init__(self):
        self._positive("vocab_size", "n_positions", "n_embd", "n_layer", "n_head")
        self._check_heads("n_embd", "n_head")
        if self.n_kv_head is not None:
            self._positive("n_kv_head")
            self._check(self.n_head % self.n_kv_head == 0, "n_kv_head", "must divide n_head")
        if self.n_inner is not None:
            self._positive("n_inner")
        self._probability("resid_pdrop", "embd_pdrop", "attn_pdrop")
        self._check(self.activation_function in ACTIVATIONS, "activation_function", f"must be one of {ACTIVATIONS}")
        self._check(self.position in ("learned", "rope"), "position", "must be 'learned' or 'rope'")
        self._check(self.layer_norm_epsilon > 0, "layer_norm_epsilon", "must be > 0")
        self._check(self.position != "rope" or (self.n_embd // self.n_head) % 2 == 0, "position",
                    "rope needs an even head dim")

    @property
    def inner_size(self) -> int:
        return self.n_inner or 4 * self.n_embd


@dataclass
class TransformerConfig(_Config):
    src_vocab_size: int = 37000
    tgt_vocab_size: int = 37000
    share_embeddings: bool = True  # one embedding for source, target and the output projection
    d_model: int = 512
    num_encoder_layers: int = 6
    num_decoder_layers: int = 6
    num_heads: int = 8
    d_ff: int = 2048
    activation: str = "relu"
    dropout: float = 0.1
    attention_dropout: float = 0.0
    label_smoothing: float = 0.1
    max_position_embeddings: int = 1024
    layer_norm_eps: float = 1e-6
    norm: str = "post"
    pad_token_id: int = 0
    bos_token_id: int = 1
    eos_token_id: int = 2
    kernels: str = "auto"

    def __post_init__(self):
        self._positive("src_vocab_size", "tgt_vocab_size", "d_model", "num_encoder_layers", "num_decoder_layers",
                       "num_heads", "d_ff", "max_position_embeddings")
        self._check_heads("d_model", "num_heads")
        self._probability("dropout", "attention_dropout", "label_smoothing")
        self._check(self.activation in ACTIVATIONS, "activation", f"must be one of {ACTIVATIONS}")
        self._check(self.norm in ("pre", "post"), "norm", "must be 'pre' or 'post'")
        self._check(not self.share_embeddings or self.src_vocab_size == self.tgt_vocab_size, "share_embeddings",
                    "needs src_vocab_size == tgt_vocab_size")
        for n in ("pad_token_id", "bos_token_id", "eos_token_id"):
            self._check(0 <= getattr(self, n) < self.tgt_vocab_size, n, "must be a target token id")
