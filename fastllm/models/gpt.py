"""GPT (decoder-only, pre-LN, tied embeddings) in GPT-2's shape, on fastllm.nn and fastllm.ops.

Invariants:
- Causal self-attention everywhere (bottom-right aligned, so cached decoding needs no extra mask); the residual
  stream is carried as (delta, residual) and every add is fused into the next LayerNorm (see nn/blocks.py).
- The LM head is the word-embedding matrix (tie_word_embeddings; an untied `lm_head` otherwise). With labels,
  the loss is mean CE of position t predicting labels[t + 1] (labels are shifted inside, -100 ignored, as HF),
  through fastllm.ops.linear_cross_entropy: logits are None in training mode unless return_logits=True.
- past_key_values: a tuple with one (k, v) pair of (B, Hkv, P, D) per layer; attention_mask (B, P + T) covers
  cached and new positions. position_ids default to P .. P + T - 1.
- Init as GPT-2: N(0, 0.02), residual output projections N(0, 0.02 / sqrt(2 n_layer)), zero biases.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fastllm.models.bert import init_weights
from fastllm.models.config import GPTConfig
from fastllm.models.outputs import ModelOutput
from fastllm.nn._kernels import apply_norm, make_layer_norm
from fastllm.nn.blocks import BlockSpec, TransformerBlock
from fastllm.nn.embeddings import Embeddings, RotaryEmbedding
from fastllm.nn.heads import VocabLoss


def shift_labels(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """(B, T) labels -> (B, T) targets where position t holds labels[t + 1] and the last is ignored."""
    pad = labels.new_full((labels.shape[0], 1), ignore_index)  # (B, 1)
    return torch.cat([labels[:, 1:], pad], dim=1)  # (B, T)


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = c = config
        self.embeddings = Embeddings(c.vocab_size, c.n_embd, c.n_positions, position=c.position,
                                     dropout=c.embd_pdrop, kernels=c.kernels)
        hd = c.n_embd // c.n_head
        self.rotary = RotaryEmbedding(hd, c.n_positions) if c.position == "rope" else None
        spec = BlockSpec(c.n_embd, c.n_head, c.inner_size, c.activation_function, "pre", c.n_kv_head,
                         dropout=c.resid_pdrop, attention_dropout=c.attn_pdrop, eps=c.layer_norm_epsilon,
                         kernels=c.kernels)
        self.layers = nn.ModuleList(TransformerBlock(spec, rotary=self.rotary) for _ in range(c.n_layer))
        self.ln_f = make_layer_norm(c.n_embd, c.layer_norm_epsilon, c.kernels)
        self.lm_head = None if c.tie_word_embeddings else nn.Linear(c.n_embd, c.vocab_size, bias=False)
        self.loss_fn = VocabLoss(kernels=c.kernels)
        if self.lm_head is None:
            self.embeddings.tie_output()
        self._init()

    def _init(self) -> None:
        std = self.config.initializer_range
        self.apply(lambda m: init_weights(m, std))
        for layer in self.layers:  # GPT-2: scale residual projections by 1/sqrt(number of residual adds)
            for lin in (layer.attn.out, layer.mlp.fc_out):
                nn.init.normal_(lin.weight, 0.0, std / math.sqrt(2 * self.config.n_layer))

    @property
    def output_weight(self) -> torch.Tensor:
        return self.embeddings.word.weight if self.lm_head is None else self.lm_head.weight  # (V, H)

    def _loss_weight(self) -> torch.Tensor:
        """output_weight for the loss; tied, it shares its gradient buffer with the lookup (fastllm.nn.tied).
        A pipeline's last stage holds the weight in a TiedHolder, without a TiedGrad: then the plain weight."""
        tied = getattr(self.embeddings, "tied", None) if self.lm_head is None else None
        return self.output_weight if tied is None else tied.head_weight(self.output_weight, self.embeddings.word)

    def _positions(self, input_ids, position_ids, past_length: int):
        if position_ids is not None:
            return position_ids
        return self.embeddings.default_positions(input_ids, past_length)  # (B, T)

    def body(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False,
             output_hidden_states=False, output_attentions=False):
        """Runs embeddings, blocks and ln_f: (hidden (B, T, H), presents, hidden_states, attentions)."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape (batch, seq), got {tuple(input_ids.shape)}")
        past = past_key_values[0][0].shape[2] if past_key_values else 0
        if past_key_values and len(past_key_values) != len(self.layers):
            raise ValueError(f"past_key_values has {len(past_key_values)} layers, the model {len(self.layers)}")
        mask = self._mask(attention_mask, input_ids, past)
        pos = self._positions(input_ids, position_ids, past) if self.rotary is not None else None
        x, res = self.embeddings(input_ids, None, position_ids, past), None  # (B, T, H)
        hidden, attns, presents = [], [], []
        for i, layer in enumerate(self.layers):
            hidden.append(x if res is None else x + res)
            o = layer(x, res, key_padding_mask=mask, causal=True, past=(past_key_values[i], None) if past else None,
                      use_cache=use_cache, positions=pos, output_attentions=output_attentions)
            x, res = o.hidden, o.residual
            attns.append(o.attentions)
            presents.append(o.present[0] if use_cache else None)
        y = apply_norm(self.ln_f, x, res)[0]  # (B, T, H)
        hidden.append(y)
        return (y, tuple(presents) if use_cache else None, tuple(hidden) if output_hidden_states else None,
                tuple(attns) if output_attentions else None)

    def _mask(self, attention_mask, input_ids, past: int):
        if attention_mask is None:
            return None
        want = (input_ids.shape[0], past + input_ids.shape[1])
        if tuple(attention_mask.shape) != want:
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected (B, past + T) = "
                             f"{want}")
        return attention_mask.bool()  # (B, P + T)

    def forward(self, input_ids, attention_mask=None, position_ids=None, labels=None, past_key_values=None, *,
                use_cache: bool = False, output_hidden_states: bool = False, output_attentions: bool = False,
                return_logits: bool = False, logits_to_keep: int = 0) -> ModelOutput:
        if labels is not None and tuple(labels.shape) != tuple(input_ids.shape):
            raise ValueError(f"labels has shape {tuple(labels.shape)}, expected input_ids' {tuple(input_ids.shape)}")
        y, presents, hidden, attns = self.body(input_ids, attention_mask, position_ids, past_key_values, use_cache,
                                               output_hidden_states, output_attentions)
        logits = None
        if labels is None or return_logits or not self.training:
            kept = y[:, -logits_to_keep:] if logits_to_keep else y  # (B, T', H)
            logits = F.linear(kept, self.output_weight)  # (B, T', V)
        loss = None
        if labels is not None:
            target = shift_labels(labels).reshape(-1)  # (B*T,)
            loss = self.loss_fn(y.reshape(-1, y.shape[-1]), self._loss_weight(), target)
        return ModelOutput(loss, logits, hidden, attns, presents, y)

    def generate(self, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
        """(B, T) prompt -> (B, T + n) ids, as HF's model.generate: fastllm.models.generation.generate."""
        from fastllm.models.generation import generate  # lazy: generation imports this module

        return generate(self, input_ids, **kwargs)
