"""BERT pre-training examples (Devlin et al. 2019): sentence pairs for NSP and dynamic MLM masking.

Invariants:
- `make_pairs` follows Google's create_instances_from_document: segments are accumulated up to a target length
  (max_seq_length - 3, shorter with probability short_seq_prob); with probability 1/2 segment B is drawn from
  another document ("random next", label 1) else it is the actual continuation (label 0). Deterministic in seed.
- Masking is dynamic: `mask_tokens` is a pure function of (ids, generator); the dataset seeds a generator per
  (seed, epoch, example index), so every epoch masks differently and a resumed run masks identically.
- Each non-special token (or each whole word with whole_word_mask) is selected with probability p; a selected
  token becomes [MASK] 80%, a random token 10%, itself 10%; labels are -100 except at selected positions.
  At least one token per sequence is selected (the MLM loss is never over zero rows).
"""
from __future__ import annotations

import random

import torch

IGNORE = -100


def _truncate_pair(a: list[int], b: list[int], limit: int, rng: random.Random) -> None:
    while len(a) + len(b) > limit:
        longer = a if len(a) > len(b) else b
        if rng.random() < 0.5:
            del longer[0]
        else:
            longer.pop()


def _random_segment(docs, doc_index: int, target: int, rng: random.Random) -> list[int]:
    for _ in range(10):
        other = rng.randrange(len(docs))
        if other != doc_index or len(docs) == 1:
            break
    segs = docs[other]
    start = rng.randrange(len(segs))
    out: list[int] = []
    for seg in segs[start:]:
        out += seg
        if len(out) >= target:
            break
    return out


def _pairs_of_document(docs, i: int, max_tokens: int, short_seq_prob: float, rng: random.Random):
    target = rng.randint(2, max_tokens) if rng.random() < short_seq_prob else max_tokens
    pairs, chunk, length = [], [], 0
    doc = docs[i]
    for j, seg in enumerate(doc):
        chunk.append(seg)
        length += len(seg)
        if j == len(doc) - 1 or length >= target:
            if chunk:
                pairs.append(_pair_from_chunk(docs, i, chunk, target, max_tokens, rng))
            chunk, length = [], 0
            target = rng.randint(2, max_tokens) if rng.random() < short_seq_prob else max_tokens
    return [p for p in pairs if p is not None]


def _pair_from_chunk(docs, i, chunk, target, max_tokens, rng):
    split = rng.randint(1, len(chunk) - 1) if len(chunk) >= 2 else 1
    a = [t for seg in chunk[:split] for t in seg]
    if len(chunk) == 1 or rng.random() < 0.5:
        b, label = _random_segment(docs, i, target - len(a), rng), 1
    else:
        b, label = [t for seg in chunk[split:] for t in seg], 0
    _truncate_pair(a, b, max_tokens, rng)
    if not a or not b:
        return None
    return a, b, label


def make_pairs(docs: list[list[list[int]]], max_seq_length: int, short_seq_prob: float, seed: int):
    """[(ids_a, ids_b, is_random_next)] over all documents (token ids without special tokens)."""
    rng = random.Random(seed)
    out = []
    for i in range(len(docs)):
        out += _pairs_of_document(docs, i, max_seq_length - 3, short_seq_prob, rng)
    return out


def encode_pairs(pairs, max_seq_length: int, cls_id: int, sep_id: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Fixed-size tensors: input_ids/token_type_ids/attention_mask/special (N, T) and next_sentence_label (N,)."""
    n = len(pairs)
    ids = torch.full((n, max_seq_length), pad_id, dtype=torch.long)
    types = torch.zeros((n, max_seq_length), dtype=torch.long)
    special = torch.ones((n, max_seq_length), dtype=torch.bool)
    attn = torch.zeros((n, max_seq_length), dtype=torch.long)
    for k, (a, b, _) in enumerate(pairs):
        seq = [cls_id, *a, sep_id, *b, sep_id]
        ids[k, :len(seq)] = torch.tensor(seq)
        types[k, len(a) + 2:len(seq)] = 1
        attn[k, :len(seq)] = 1
        special[k, 1:len(a) + 1] = False
        special[k, len(a) + 2:len(seq) - 1] = False
    nsp = torch.tensor([p[2] for p in pairs], dtype=torch.long)
    return {"input_ids": ids, "token_type_ids": types, "attention_mask": attn, "special": special,
            "next_sentence_label": nsp}


def mask_tokens(ids: torch.Tensor, special: torch.Tensor, gen: torch.Generator, *, prob: float, mask_id: int,
                vocab_size: int, continuation: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(masked ids, labels) for one sequence `ids` (T,); `continuation` (V,) bool marks "##" pieces (whole words)."""
    cand = ~special  # (T,)
    if continuation is not None:
        starts = cand & ~continuation[ids]
        word = torch.cumsum(starts.long(), 0) - 1  # (T,) word index of each token
        pick = torch.rand(int(starts.sum()) + 1, generator=gen) < prob
        selected = cand & pick[word.clamp(min=0)] & (word >= 0)
    else:
        selected = cand & (torch.rand(ids.shape, generator=gen) < prob)
    if not bool(selected.any()):
        where = cand.nonzero().flatten()
        selected = selected.clone()
        selected[where[torch.randint(len(where), (1,), generator=gen)]] = True
    r = torch.rand(ids.shape, generator=gen)
    random_ids = torch.randint(vocab_size, ids.shape, generator=gen)
    out = torch.where(selected & (r < 0.8), torch.full_like(ids, mask_id), ids)
    out = torch.where(selected & (r >= 0.8) & (r < 0.9), random_ids, out)
    labels = torch.where(selected, ids, torch.full_like(ids, IGNORE))
    return out, labels


class BertPretrainingData:
    """Indexable examples: `example(index, epoch)` is a dict of tensors, masked for that epoch."""

    def __init__(self, tensors: dict[str, torch.Tensor], *, seed: int, prob: float, mask_id: int,
                 vocab_size: int, continuation: torch.Tensor | None = None):
        self.t, self.seed, self.prob = tensors, seed, prob
        self.mask_id, self.vocab_size, self.continuation = mask_id, vocab_size, continuation

    def __len__(self) -> int:
        return len(self.t["input_ids"])

    @property
    def tokens_per_example(self) -> int:
        return self.t["input_ids"].shape[1]

    def example(self, index: int, epoch: int) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) * 10_000_019 + index)
        ids, labels = mask_tokens(self.t["input_ids"][index], self.t["special"][index], gen, prob=self.prob,
                                  mask_id=self.mask_id, vocab_size=self.vocab_size, continuation=self.continuation)
        return {"input_ids": ids, "labels": labels, "token_type_ids": self.t["token_type_ids"][index],
                "attention_mask": self.t["attention_mask"][index],
                "next_sentence_label": self.t["next_sentence_label"][index]}
