"""fastllm.models: BERT (all heads), GPT, the encoder-decoder Transformer, presets, generation, HF interop.

Invariant: importing this package imports neither transformers nor safetensors (fastllm.models.hf does, lazily).
"""
from fastllm.models.bert import (
                                 BertForMaskedLM,
                                 BertForMultipleChoice,
                                 BertForPreTraining,
                                 BertForQuestionAnswering,
                                 BertForSequenceClassification,
                                 BertForTokenClassification,
                                 BertModel,
)
from fastllm.models.config import BertConfig, ConfigError, GPTConfig, TransformerConfig
from fastllm.models.generation import beam_search, generate, stream_generate
from fastllm.models.gpt import GPT
from fastllm.models.presets import PRESETS, preset
from fastllm.models.transformer import Transformer

__all__ = [
                                 "GPT",
                                 "PRESETS",
                                 "BertConfig",
                                 "BertForMaskedLM",
                                 "BertForMultipleChoice",
                                 "BertForPreTraining",
                                 "BertForQuestionAnswering",
                                 "BertForSequenceClassification",
                                 "BertForTokenClassification",
                                 "BertModel",
                                 "ConfigError",
                                 "GPTConfig",
                                 "Transformer",
                                 "TransformerConfig",
                                 "beam_search",
                                 "generate",
                                 "preset",
                                 "stream_generate",
]
