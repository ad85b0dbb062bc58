"""Named model presets: `preset(name, **overrides)` returns a validated config.

Invariants: every name maps to exactly one config class; overrides go through the config's validation, so a
bad override raises ConfigError naming the field. BERT sizes follow Turc et al. 2019 (tiny..medium) and
Devlin et al. (base, large); GPT-2 sizes follow Radford et al. 2019; transformer-base is Vaswani et al.'s.
"""
from __future__ import annotations

from fastllm.models.config import BertConfig, GPTConfig, TransformerConfig


def _bert(layers: int, hidden: int, heads: int) -> BertConfig:
    return BertConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                      intermediate_size=4 * hidden)


PRESETS = {
    "bert-tiny": lambda: _bert(2, 128, 2),
    "bert-mini": lambda: _bert(4, 256, 4),
    "bert-small": lambda: _bert(4, 512, 8),
    "bert-medium": lambda: _bert(8, 512, 8),
    "bert-base": lambda: _bert(12, 768, 12),
    "bert-large": lambda: _bert(24, 1024, 16),
    "gpt-nano": lambda: GPTConfig(vocab_size=512, n_positions=128, n_embd=64, n_layer=2, n_head=4, bos_token_id=0,
                                  eos_token_id=0),
    "gpt2-small": lambda: GPTConfig(n_embd=768, n_layer=12, n_head=12),
    "gpt2-medium": lambda: GPTConfig(n_embd=1024, n_layer=24, n_head=16),
    "gpt2-large": lambda: GPTConfig(n_embd=1280, n_layer=36, n_head=20),
    "transformer-base": lambda: TransformerConfig(),
}


def preset(name: str, **overrides):
    """The config of preset `name` with `overrides` applied (validated)."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
    return PRESETS[name]().replace(**overrides)
