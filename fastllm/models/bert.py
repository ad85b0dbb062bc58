"""BERT (Devlin et al. 2019) on fastllm.nn: BertModel and its pre-training / fine-tuning heads.

Invariants:
- Post-LN encoder with HF BERT's semantics; forward arguments and output fields use HF's names.
  attention_mask (B, T) 1/True = attend. Parameters are initialized as BERT: N(0, initializer_range) for
  Linear and Embedding weights, zero biases, LayerNorm (1, 0), a zero padding row.
- BertForPreTraining / BertForMaskedLM with labels: the MLM head (dense + act + LayerNorm) runs only on rows
  whose label != -100, then fastllm.ops.linear_cross_entropy with the decoder weight (the word embeddings unless
  tie_word_embeddings=False) + decoder bias;
  prediction_logits / logits are None in training mode unless return_logits=True (eval mode computes them).
  In training mode the last encoder layer itself runs only on the rows the loss reads (query_rows: the masked
  positions and [CLS], ~16% of a batch): keys and values still cover every position, so loss and gradients
  equal the full computation's (NVIDIA's MLPerf BERT does the same). It needs a plain last layer (not
  tensor-parallel) and is skipped when hidden states, attentions or logits are returned.
  Under torch.compile the head runs on every row instead (static shapes: one graph, no recompile per count of
  masked tokens); linear_cross_entropy skips the ignored rows, so loss and gradients are the same.
- Sequence classification follows HF's problem_type: regression (MSE) when num_labels == 1, single-label CE for
  integer labels, multi-label BCE-with-logits for float labels.
- Every fastllm.ops backend is fixed at build time from config.kernels.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastllm.models.config import BertConfig
from fastllm.models.outputs import BaseModelOutput, ModelOutput, PreTrainingOutput, QuestionAnsweringOutput
from fastllm.nn.blocks import BlockSpec, TransformerBlock
from fastllm.nn.dropout import Dropout
from fastllm.nn.embeddings import Embeddings
from fastllm.nn.heads import ClassLoss, Pooler, PredictionTransform, VocabLoss, masked_rows
from fastllm.nn.tied import TiedGrad


def init_weights(module: nn.Module, std: float) -> None:
    """BERT / GPT-2 initialization: N(0, std) weights, zero biases, LayerNorm (1, 0)."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, 0.0, std)
        if isinstance(module, nn.Embedding) and module.padding_idx is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()
    if getattr(module, "bias", None) is not None and isinstance(module.bias, nn.Parameter):
        nn.init.zeros_(module.bias)
    if type(module).__name__ == "LayerNorm" and module.weight is not None:
        nn.init.ones_(module.weight)


def _padding_mask(attention_mask, input_ids) -> torch.Tensor | None:
    if attention_mask is None:
        return None
    if tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected input_ids' "
                         f"{tuple(input_ids.shape)}")
    return attention_mask.bool()  # (B, T), True = attend


class BertModel(nn.Module):
    def __init__(self, config: BertConfig, add_pooling_layer: bool = True):
        super().__init__()
        self.config = c = config
        self.embeddings = Embeddings(c.vocab_size, c.hidden_size, c.max_position_embeddings, position="learned",
                                     type_vocab_size=c.type_vocab_size, layer_norm=True, eps=c.layer_norm_eps,
                                     dropout=c.hidden_dropout_prob, padding_idx=c.pad_token_id, kernels=c.kernels)
        spec = BlockSpec(c.hidden_size, c.num_attention_heads, c.intermediate_size, c.hidden_act, "post",
                         dropout=c.hidden_dropout_prob, attention_dropout=c.attention_probs_dropout_prob,
                         eps=c.layer_norm_eps, kernels=c.kernels)
        self.layers = nn.ModuleList(TransformerBlock(spec) for _ in range(c.num_hidden_layers))
        self.pooler = Pooler(c.hidden_size) if add_pooling_layer else None
        self.apply(lambda m: init_weights(m, c.initializer_range))

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, *,
                output_hidden_states: bool = False, output_attentions: bool = False,
                query_rows: torch.Tensor | None = None) -> BaseModelOutput:
        """query_rows (B, R): the last layer computes only these positions; last_hidden_state is then
        (B, R, H) and the pooler reads slot 0, so query_rows[:, 0] must be position 0 when it is used."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape (batch, seq), got {tuple(input_ids.shape)}")
        if query_rows is not None and output_hidden_states:
            raise ValueError("BertModel: query_rows and output_hidden_states exclude each other")
        mask = _padding_mask(attention_mask, input_ids)
        x = self.embeddings(input_ids, token_type_ids, position_ids)  # (B, T, H)
        hidden, attns, last = [x], [], len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            rows = query_rows if i == last else None
            x = layer(x, key_padding_mask=mask, output_attentions=output_attentions, query_rows=rows)
            attns.append(x.attentions)
            x = x.hidden  # (B, T, H)
            hidden.append(x)
        pooled = self.pooler(x) if self.pooler is not None else None  # (B, H)
        return BaseModelOutput(x, pooled, tuple(hidden) if output_hidden_states else None,
                               tuple(attns) if output_attentions else None, query_rows=query_rows)


class _BertWithHead(nn.Module):
    """A BertModel under `self.bert` plus a head; `encode` forwards the shared arguments."""

    pooling = True

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.bert = BertModel(config, add_pooling_layer=self.pooling)

    def encode(self, input_ids, attention_mask, token_type_ids, position_ids, kw) -> BaseModelOutput:
        return self.bert(input_ids, attention_mask, token_type_ids, position_ids, **kw)

    def loss_rows(self, labels: torch.Tensor, kw: dict) -> torch.Tensor | None:
        """(B, R) positions a masked-LM loss reads (labelled ones and [CLS] first, ascending), or None when the
        last layer must run on every position (see the module docstring)."""
        layers = self.bert.layers
        if torch.compiler.is_compiling() or kw.get("output_hidden_states") or kw.get("output_attentions"):
            return None
        if not len(layers) or not layers[-1].accepts_query_rows() or labels.dim() != 2:
            return None
        need = labels != -100  # (B, T)
        need[:, 0] = True  # [CLS] feeds the pooler
        count = int(need.sum(dim=1).max())
        return torch.argsort(need.logical_not().byte(), dim=1, stable=True)[:, :count]  # (B, R)

    def _encode_for_loss(self, input_ids, attention_mask, token_type_ids, position_ids, labels, want, kw):
        """encode(), on the loss rows only when only the loss is wanted: (output, labels of its rows)."""
        if labels is not None and tuple(labels.shape) != tuple(input_ids.shape):
            raise ValueError(f"labels has shape {tuple(labels.shape)}, expected input_ids' {tuple(input_ids.shape)}")
        rows = None if want or labels is None else self.loss_rows(labels, kw)
        out = self.encode(input_ids, attention_mask, token_type_ids, position_ids,
                          kw if rows is None else {**kw, "query_rows": rows})
        if out.query_rows is not None:
            labels = labels.gather(1, out.query_rows)  # (B, R)
        return out, labels

    def _init_head(self) -> None:
        for m in self.children():
            if m is not self.bert:
                m.apply(lambda m: init_weights(m, self.config.initializer_range))


def _tie(bert: BertModel, config: BertConfig) -> TiedGrad | None:
    """The embeddings' TiedGrad when the MLM decoder is the word-embedding weight, else None."""
    return bert.embeddings.tie_output() if config.tie_word_embeddings else None


class _MLMHead(nn.Module):
    """cls.predictions: transform + decoder. Tied (config.tie_word_embeddings): the decoder is the word-embedding
    weight plus this head's own (V,) bias. Untied: `decoder`, a Linear with its own weight and bias, as
    transformers 5 builds it; `bias` then is a buffer holding HF's unused cls.predictions.bias (kept only so
    that to_hf writes back exactly what from_hf read)."""

    def __init__(self, config: BertConfig, word_embeddings: nn.Embedding, tied: TiedGrad | None = None):
        super().__init__()
        self.transform = PredictionTransform(config.hidden_size, config.hidden_act, config.layer_norm_eps,
                                             config.kernels)
        if config.tie_word_embeddings:
            self.bias = nn.Parameter(torch.zeros(config.vocab_size))
            self.decoder = None
        else:
            self.register_buffer("bias", torch.zeros(config.vocab_size))
            self.decoder = nn.Linear(config.hidden_size, config.vocab_size)
        self.loss = VocabLoss(kernels=config.kernels)
        self._words = [word_embeddings]  # a list: the tied weight is owned (and saved) by the embeddings
        self._tied = tied  # tied: shares the decoder's gradient buffer with the lookup (fastllm.nn.tied)

    @property
    def decoder_weight(self) -> torch.Tensor:
        return self._words[0].weight if self.decoder is None else self.decoder.weight  # (V, H)

    @property
    def decoder_bias(self) -> torch.Tensor:
        return self.bias if self.decoder is None else self.decoder.bias  # (V,)

    def logits(self, seq: torch.Tensor) -> torch.Tensor:
        return F.linear(self.transform(seq), self.decoder_weight, self.decoder_bias)  # (B, T, V)

    def masked_loss(self, seq: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            # Static shapes under torch.compile: the transform runs on every row and linear_cross_entropy
            # skips the ignored ones itself (same loss and gradients). Gathering the masked rows (nonzero) has
            # a data-dependent size: a graph break, and a graph after it whose shape changes every batch. The
            # extra dense + LayerNorm on unmasked rows costs H^2 MACs a token against ~12 H^2 per layer and
            # token in the encoder: < 1% of a BERT-base step.
            rows, target = seq.reshape(-1, seq.shape[-1]), labels.reshape(-1)  # (B*T, H), (B*T,)
        else:
            rows, target = masked_rows(seq, labels)  # (M, H), (M,)
        w = self.decoder_weight  # (V, H)
        if self._tied is not None:
            w = self._tied.head_weight(w, self._words[0])
        return self.loss(self.transform(rows), w, target, self.decoder_bias)


class BertForPreTraining(_BertWithHead):
    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.mlm = _MLMHead(config, self.bert.embeddings.word, _tie(self.bert, config))
        self.nsp = nn.Linear(config.hidden_size, 2)
        self.nsp_loss = ClassLoss(config.kernels)
        self._init_head()

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, labels=None,
                next_sentence_label=None, *, return_logits: bool = False, **kw) -> PreTrainingOutput:
        want = labels is None or return_logits or not self.training
        out, labels = self._encode_for_loss(input_ids, attention_mask, token_type_ids, position_ids, labels,
                                            want, kw)
        seq, pooled = out.last_hidden_state, out.pooler_output  # (B, T or R, H), (B, H)
        nsp_logits = self.nsp(pooled)  # (B, 2)
        logits = self.mlm.logits(seq) if want else None  # (B, T, V)
        mlm_loss = self.mlm.masked_loss(seq, labels) if labels is not None else None
        nsp_loss = self.nsp_loss(nsp_logits, next_sentence_label) if next_sentence_label is not None else None
        parts = [x for x in (mlm_loss, nsp_loss) if x is not None]
        loss = sum(parts) if parts else None
        return PreTrainingOutput(loss, mlm_loss, nsp_loss, logits, nsp_logits, out.hidden_states, out.attentions)


class BertForMaskedLM(_BertWithHead):
    pooling = False

    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.mlm = _MLMHead(config, self.bert.embeddings.word, _tie(self.bert, config))
        self._init_head()

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, labels=None, *,
                return_logits: bool = False, **kw) -> ModelOutput:
        want = labels is None or return_logits or not self.training
        out, labels = self._encode_for_loss(input_ids, attention_mask, token_type_ids, position_ids, labels,
                                            want, kw)
        seq = out.last_hidden_state  # (B, T or R, H)
        logits = self.mlm.logits(seq) if want else None  # (B, T, V)
        loss = self.mlm.masked_loss(seq, labels) if labels is not None else None
        return ModelOutput(loss, logits, out.hidden_states, out.attentions)


def _problem_type(config: BertConfig, labels: torch.Tensor) -> str:
    if config.problem_type is not None:
        return config.problem_type
    if config.num_labels == 1:
        return "regression"
    if labels.dtype in (torch.long, torch.int):
        return "single_label_classification"
    return "multi_label_classification"


class BertForSequenceClassification(_BertWithHead):
    def __init__(self, config: BertConfig):
        super().__init__(config)
        p = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = Dropout(p, config.kernels)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.ce = ClassLoss(config.kernels)
        self._init_head()

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, labels=None,
                **kw) -> ModelOutput:
        out = self.encode(input_ids, attention_mask, token_type_ids, position_ids, kw)
        logits = self.classifier(self.dropout(out.pooler_output))  # (B, num_labels)
        loss = self._loss(logits, labels) if labels is not None else None
        return ModelOutput(loss, logits, out.hidden_states, out.attentions)

    def _loss(self, logits, labels):
        kind = _problem_type(self.config, labels)
        if kind == "regression":
            return F.mse_loss(logits.squeeze(-1).float(), labels.float().view(-1)) if self.config.num_labels == 1 \
                else F.mse_loss(logits.float(), labels.float())
        if kind == "single_label_classification":
            return self.ce(logits, labels)
        return F.binary_cross_entropy_with_logits(logits.float(), labels.float())


class BertForTokenClassification(_BertWithHead):
    pooling = False

    def __init__(self, config: BertConfig):
        super().__init__(config)
        p = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = Dropout(p, config.kernels)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.ce = ClassLoss(config.kernels)
        self._init_head()

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, labels=None,
                **kw) -> ModelOutput:
        out = self.encode(input_ids, attention_mask, token_type_ids, position_ids, kw)
        logits = self.classifier(self.dropout(out.last_hidden_state))  # (B, T, num_labels)
        loss = self.ce(logits.reshape(-1, logits.shape[-1]), labels) if labels is not None else None
        return ModelOutput(loss, logits, out.hidden_states, out.attentions)


class BertForQuestionAnswering(_BertWithHead):
    pooling = False

    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.qa_outputs = nn.Linear(config.hidden_size, 2)
        self.ce = ClassLoss(config.kernels)
        self._init_head()

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None,
                start_positions=None, end_positions=None, **kw) -> QuestionAnsweringOutput:
        out = self.encode(input_ids, attention_mask, token_type_ids, position_ids, kw)
        start, end = self.qa_outputs(out.last_hidden_state).unbind(-1)  # (B, T) each
        loss = None
        if start_positions is not None and end_positions is not None:
            t = start.shape[1]  # positions outside the sequence are ignored, as in HF
            s_pos, e_pos = start_positions.clamp(0, t), end_positions.clamp(0, t)
            loss = (self.ce(start, s_pos, ignore_index=t) + self.ce(end, e_pos, ignore_index=t)) / 2
        return QuestionAnsweringOutput(loss, start.contiguous(), end.contiguous(), out.hidden_states,
                                       out.attentions)


class BertForMultipleChoice(_BertWithHead):
    def __init__(self, config: BertConfig):
        super().__init__(config)
        p = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = Dropout(p, config.kernels)
        self.classifier = nn.Linear(config.hidden_size, 1)
        self.ce = ClassLoss(config.kernels)
        self._init_head()

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, labels=None,
                **kw) -> ModelOutput:
        b, c = input_ids.shape[:2]
        flat = (lambda t: None if t is None else t.reshape(b * c, -1))  # (B*C, T)
        out = self.encode(flat(input_ids), flat(attention_mask), flat(token_type_ids), flat(position_ids), kw)
        logits = self.classifier(self.dropout(out.pooler_output)).view(b, c)  # (B, C)
        loss = self.ce(logits, labels) if labels is not None else None
        return ModelOutput(loss, logits, out.hidden_states, out.attentions)
