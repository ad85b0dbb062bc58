"""Model outputs: dataclasses with HuggingFace's field names (loss, logits, last_hidden_state, ...).

Invariants: every field defaults to None; `logits`/`prediction_logits` may be None when labels were given in
training mode (the loss is computed without materializing vocabulary logits) unless return_logits=True.
Outputs support attribute access and `out["field"]` like HF's ModelOutput.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

T = torch.Tensor | None


class _Output:
    def __getitem__(self, key: str):
        return getattr(self, key)

    def to_tuple(self) -> tuple:
        return tuple(v for v in vars(self).values() if v is not None)


@dataclass
class BaseModelOutput(_Output):
    last_hidden_state: T = None
    pooler_output: T = None
    hidden_states: tuple | None = None
    attentions: tuple | None = None
    past_key_values: tuple | None = None
    query_rows: T = None  # fastllm only: (B, R) positions of last_hidden_state (B, R, H); None = all T


@dataclass
class PreTrainingOutput(_Output):
    loss: T = None
    mlm_loss: T = None
    nsp_loss: T = None
    prediction_logits: T = None
    seq_relationship_logits: T = None
    hidden_states: tuple | None = None
    attentions: tuple | None = None


@dataclass
class ModelOutput(_Output):
    """Masked LM, causal LM, classification heads and the encoder-decoder."""
    loss: T = None
    logits: T = None
    hidden_states: tuple | None = None
    attentions: tuple | None = None
    past_key_values: tuple | None = None
    last_hidden_state: T = None
    encoder_last_hidden_state: T = None


@dataclass
class QuestionAnsweringOutput(_Output):
    loss: T = None
    start_logits: T = None
    end_logits: T = None
    hidden_states: tuple | None = None
    attentions: tuple | None = None
