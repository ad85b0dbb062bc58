"""The encoder-decoder Transformer of "Attention Is All You Need" (Vaswani et al. 2017) on fastllm.nn.

Invariants:
- Sinusoidal positions added to sqrt(d_model)-scaled embeddings; post-LN blocks by default (config.norm="pre"
  adds final encoder/decoder LayerNorms); decoder blocks have causal self-attention and cross-attention.
- share_embeddings=True: one embedding for source and target (a shared vocabulary); the output projection is
  always the target embedding matrix (weight tying, section 3.4).
- labels (B, L) are the decoder targets; decoder_input_ids default to labels shifted right behind
  bos_token_id (-100 replaced by pad). The loss is label-smoothed CE (config.label_smoothing) over labels
  != -100 through fastllm.ops.linear_cross_entropy; logits are None in training mode unless return_logits=True.
- past_key_values: per decoder layer ((k, v) self, (k, v) cross); cross pairs are the projected encoder memory.
- Init: Xavier-uniform Linear weights, zero biases, N(0, d_model^-1/2) embeddings (as fairseq/tensor2tensor).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastllm.models.config import TransformerConfig
from fastllm.models.outputs import ModelOutput
from fastllm.nn._kernels import apply_norm, make_layer_norm
from fastllm.nn.blocks import BlockSpec, TransformerBlock
from fastllm.nn.embeddings import Embeddings
from fastllm.nn.heads import VocabLoss


def shift_right(labels: torch.Tensor, start: int, pad: int) -> torch.Tensor:
    """(B, L) targets -> (B, L) decoder inputs [start, labels[:-1]] with -100 replaced by pad."""
    start_col = labels.new_full((labels.shape[0], 1), start)  # (B, 1)
    shifted = torch.cat([start_col, labels[:, :-1]], dim=1)  # (B, L)
    return shifted.masked_fill(shifted == -100, pad)


class Transformer(nn.Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = c = config
        emb = {"position": "sinusoidal", "dropout": c.dropout, "scale_embeddings": True, "padding_idx": c.pad_token_id,
                   "kernels": c.kernels}
        self.src_embed = Embeddings(c.src_vocab_size, c.d_model, c.max_position_embeddings, **emb)
        self.tgt_embed = (self.src_embed if c.share_embeddings else
                          Embeddings(c.tgt_vocab_size, c.d_model, c.max_position_embeddings, **emb))
        spec = BlockSpec(c.d_model, c.num_heads, c.d_ff, c.activation, c.norm, dropout=c.dropout,
                         attention_dropout=c.attention_dropout, eps=c.layer_norm_eps, kernels=c.kernels)
        self.encoder = nn.ModuleList(TransformerBlock(spec) for _ in range(c.num_encoder_layers))
        dec_spec = BlockSpec(**{**spec.__dict__, "cross_attention": True})
        self.decoder = nn.ModuleList(TransformerBlock(dec_spec) for _ in range(c.num_decoder_layers))
        pre = c.norm == "pre"
        self.enc_norm = make_layer_norm(c.d_model, c.layer_norm_eps, c.kernels) if pre else None
        self.dec_norm = make_layer_norm(c.d_model, c.layer_norm_eps, c.kernels) if pre else None
        self.loss_fn = VocabLoss(c.label_smoothing, c.kernels)
        self._init()

    def _init(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, 0.0, self.config.d_model ** -0.5)
                with torch.no_grad():
                    m.weight[self.config.pad_token_id].zero_()

    @property
    def output_weight(self) -> torch.Tensor:
        return self.tgt_embed.word.weight  # (V_tgt, d)

    def _stack(self, layers, x, final_norm, **kw):
        res, presents, pasts = None, [], kw.pop("pasts", None)
        for i, layer in enumerate(layers):
            o = layer(x, res, past=pasts[i] if pasts else None, **kw)
            x, res = o.hidden, o.residual
            presents.append(o.present)
        y = apply_norm(final_norm, x, res)[0] if final_norm is not None else x  # (B, T, d)
        return y, presents

    def encode(self, input_ids, attention_mask=None) -> torch.Tensor:
        """(B, S) source ids -> (B, S, d) memory."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape (batch, seq), got {tuple(input_ids.shape)}")
        mask = None if attention_mask is None else attention_mask.bool()  # (B, S)
        x = self.src_embed(input_ids)  # (B, S, d)
        return self._stack(self.encoder, x, self.enc_norm, key_padding_mask=mask)[0]

    def decode(self, decoder_input_ids, memory, attention_mask=None, decoder_attention_mask=None,
               past_key_values=None, use_cache=False):
        """(B, L) target ids over (B, S, d) memory -> ((B, L, d), presents or None)."""
        past = past_key_values[0][0][0].shape[2] if past_key_values else 0
        x = self.tgt_embed(decoder_input_ids, past_length=past)  # (B, L, d)
        kw = {"causal": True, "memory": memory, "use_cache": use_cache,
                  "key_padding_mask": None if decoder_attention_mask is None else decoder_attention_mask.bool(),
                  "memory_mask": None if attention_mask is None else attention_mask.bool()}
        if past_key_values:
            kw["pasts"] = past_key_values
        y, presents = self._stack(self.decoder, x, self.dec_norm, **kw)
        return y, (tuple(presents) if use_cache else None)

    def forward(self, input_ids=None, attention_mask=None, decoder_input_ids=None, decoder_attention_mask=None,
                labels=None, encoder_outputs=None, past_key_values=None, *, use_cache: bool = False,
                return_logits: bool = False, logits_to_keep: int = 0) -> ModelOutput:
        c = self.config
        memory = encoder_outputs if encoder_outputs is not None else self.encode(input_ids, attention_mask)
        if decoder_input_ids is None:
            if labels is None:
                raise ValueError("Transformer.forward needs decoder_input_ids or labels")
            decoder_input_ids = shift_right(labels, c.bos_token_id, c.pad_token_id)
        y, presents = self.decode(decoder_input_ids, memory, attention_mask, decoder_attention_mask,
                                  past_key_values, use_cache)
        logits = None
        if labels is None or return_logits or not self.training:
            kept = y[:, -logits_to_keep:] if logits_to_keep else y  # (B, L', d)
            logits = F.linear(kept, self.output_weight)  # (B, L', V)
        loss = None
        if labels is not None:
            loss = self.loss_fn(y.reshape(-1, y.shape[-1]), self.output_weight, labels.reshape(-1))
        return ModelOutput(loss, logits, past_key_values=presents, last_hidden_state=y,
                           encoder_last_hidden_state=memory)

    def generate(self, input_ids: torch.Tensor, *, num_beams: int = 1, **kwargs) -> torch.Tensor:
        """(B, S) source -> (B, 1 + n) decoder ids, as HF's model.generate: beam search when num_beams > 1
        (fastllm.models.generation.beam_search), else greedy / sampling (generation.generate's keywords)."""
        from fastllm.models import generation  # lazy: generation imports this module

        if num_beams > 1:
            return generation.beam_search(self, input_ids, num_beams=num_beams, **kwargs)
        return generation.generate(self, input_ids, **kwargs)
