"""Modules built on fastllm.ops; each picks its kernel backend once, when it is built."""
from fastllm.nn.attention import Attention, KVCache
from fastllm.nn.dropout import Dropout
from fastllm.nn.layer_norm import LayerNorm
from fastllm.nn.blocks import BlockSpec, TransformerBlock
from fastllm.nn.embeddings import Embeddings, RotaryEmbedding
from fastllm.nn.heads import Pooler, PredictionTransform, VocabLoss
from fastllm.nn.mha import MultiHeadAttention
from fastllm.nn.mlp import MLP

__all__ = ["Attention", "KVCache", "Dropout", "LayerNorm", "BlockSpec", "TransformerBlock", "Embeddings", "RotaryEmbedding",
           "Pooler", "PredictionTransform", "VocabLoss", "MultiHeadAttention", "MLP"]
