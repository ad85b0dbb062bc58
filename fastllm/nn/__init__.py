"""Modules built on fastllm.ops; each picks its kernel backend once, when it is built."""
from fastllm.nn.attention import Attention, KVCache
from fastllm.nn.layer_norm import LayerNorm

__all__ = ["Attention", "KVCache", "LayerNorm"]
