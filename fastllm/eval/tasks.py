"""Token classification (CoNLL-style BIO files) and extractive QA (SQuAD-style JSON): loaders, features, decoding.

Invariants:
- CoNLL files: one token per line, whitespace-separated columns (token first, tag last by default), sentences
  separated by blank lines, `-DOCSTART-` lines ignored. A tag must be O or start with B-/I-/E-/S-; a bad line or
  tag raises ValueError naming the file and line.
- NER features label only the first word piece of each word (others get -100, ignored by the loss); words cut by
  max_length are predicted "O", so every gold sentence keeps its length for entity F1.
- SQuAD JSON: {"data": [{"paragraphs": [{"context", "qas": [{"id", "question", "answers": [{"text",
  "answer_start"}], "is_impossible"?}]}]}]}; a missing key raises ValueError naming the file and the path.
- QA features: [CLS] question [SEP] window [SEP], one feature per window of the context. Windows hold
  max_length - len(question) - 3 context tokens and overlap by `doc_stride` tokens (HF run_qa's meaning of the
  stride), so no part of a long context is unreachable; a window without the whole answer targets [CLS]
  (as HF). Questions longer than max_query_length tokens are cut. Token offsets index the context string, so a
  predicted span is a substring of the context; `decode_example` takes the best span over all windows of an
  example and the lowest [CLS] null score of its windows (BERT's run_squad / HF's post-processing).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

IGNORE = -100
_TAG_PREFIXES = ("B-", "I-", "E-", "S-")


# ----------------------------------------------------------------------------------------------------------- NER
@dataclass
class Sentence:
    words: list[str]
    tags: list[str]


def _check_tag(tag: str, where: str) -> None:
    if tag != "O" and not (tag.startswith(_TAG_PREFIXES) and len(tag) > 2):
        raise ValueError(f"{where}: tag {tag!r} is not BIO (O, B-X, I-X, E-X or S-X)")


def read_conll(path, token_col: int = 0, tag_col: int = -1) -> list[Sentence]:
    """Sentences of a CoNLL-style file (e.g. CoNLL-2003: `EU NNP B-NP B-ORG`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CoNLL file not found: {path}")
    sents, cur = [], Sentence([], [])
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        cols = line.split()
        if not cols or cols[0] == "-DOCSTART-":
            if cur.words:
                sents.append(cur)
            cur = Sentence([], [])
            continue
        if len(cols) < 2:
            raise ValueError(f"{path}:{n}: expected a token and a tag column, got {line!r}")
        _check_tag(cols[tag_col], f"{path}:{n}")
        cur.words.append(cols[token_col])
        cur.tags.append(cols[tag_col])
    if cur.words:
        sents.append(cur)
    return sents


def tag_list(sentences: list[Sentence]) -> list[str]:
    """The label set of a training file: "O" first, then the other tags sorted."""
    tags = {t for s in sentences for t in s.tags}
    return ["O", *sorted(tags - {"O"})]


def _special_id(tokenizer, token: str) -> int:
    i = tokenizer.token_to_id(token)
    if i is None:
        raise ValueError(f"tokenizer has no {token} token, needed for BERT inputs")
    return i


def ner_features(tokenizer, sentences: list[Sentence], labels: list[str], max_length: int, where: str) -> list[dict]:
    """input_ids / labels (first piece of each word) / word_starts per sentence."""
    index = {t: i for i, t in enumerate(labels)}
    cls, sep, unk = (_special_id(tokenizer, t) for t in ("[CLS]", "[SEP]", tokenizer.unk_token or "[UNK]"))
    feats = []
    for k, s in enumerate(sentences):
        pieces = [e.ids or [unk] for e in tokenizer.encode_batch(s.words, add_special_tokens=False)]
        ids, labs, starts = [cls], [IGNORE], []
        for w, (p, tag) in enumerate(zip(pieces, s.tags)):
            if tag not in index:
                raise ValueError(f"{where}: sentence {k}: tag {tag!r} is not in the training label set {labels}")
            if len(ids) + len(p) > max_length - 1:
                break
            starts.append(len(ids))
            ids += p
            labs += [index[tag]] + [IGNORE] * (len(p) - 1)
        feats.append({"input_ids": ids + [sep], "labels": labs + [IGNORE], "word_starts": starts,
                      "n_words": len(s.words)})
    return feats


def decode_tags(logits: torch.Tensor, feat: dict, labels: list[str]) -> list[str]:
    """Predicted tag per word from (T, num_labels) logits; words cut by truncation get "O"."""
    best = logits[feat["word_starts"]].argmax(-1).tolist()
    return [labels[i] for i in best] + ["O"] * (feat["n_words"] - len(best))


# ------------------------------------------------------------------------------------------------------------ QA
@dataclass
class QAExample:
    qid: str
    question: str
    context: str
    answers: list[str]
    answer_starts: list[int]


def _need(d: dict, key: str, where: str):
    if not isinstance(d, dict) or key not in d:
        raise ValueError(f"{where}: missing key {key!r}")
    return d[key]


def _qa_examples(para: dict, where: str) -> list[QAExample]:
    context = _need(para, "context", where)
    out = []
    for j, qa in enumerate(_need(para, "qas", where)):
        w = f"{where}.qas[{j}]"
        answers = [] if qa.get("is_impossible") else _need(qa, "answers", w)
        texts = [_need(a, "text", w + ".answers") for a in answers]
        starts = [int(_need(a, "answer_start", w + ".answers")) for a in answers]
        out.append(QAExample(str(_need(qa, "id", w)), _need(qa, "question", w), context, texts, starts))
    return out


def read_squad(path) -> list[QAExample]:
    """Questions of a SQuAD v1.1/v2.0-style JSON file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"SQuAD file not found: {path}")
    doc = json.loads(path.read_text(encoding="utf-8"))
    out = []
    for i, article in enumerate(_need(doc, "data", str(path))):
        for k, para in enumerate(_need(article, "paragraphs", f"{path}: data[{i}]")):
            out.extend(_qa_examples(para, f"{path}: data[{i}].paragraphs[{k}]"))
    return out


def _answer_tokens(offsets, ctx_tokens, start_char: int, end_char: int) -> tuple[int, int]:
    first = [t for t in ctx_tokens if offsets[t][1] > start_char]
    last = [t for t in ctx_tokens if offsets[t][0] < end_char]
    if not first or not last or first[0] > last[-1] or offsets[last[-1]][1] < end_char:
        return 0, 0  # answer (partly) truncated away: target [CLS]
    return first[0], last[-1]


def window_starts(n: int, room: int, doc_stride: int) -> list[int]:
    """First context token of each window of `room` tokens over n tokens, consecutive windows sharing
    `doc_stride` tokens."""
    if room <= 0:
        raise ValueError(f"max_length leaves no room for the context after the question ({room} tokens)")
    if not 0 <= doc_stride < room:
        raise ValueError(f"doc_stride {doc_stride} must be in [0, {room}) (the context tokens per window)")
    starts = [0]
    while starts[-1] + room < n:
        starts.append(starts[-1] + room - doc_stride)
    return starts


def _qa_window(ex: QAExample, q: list[int], ctx, start: int, room: int, special: tuple[int, int]) -> dict:
    cls, sep = special
    win = range(start, min(start + room, len(ctx.ids)))
    head = len(q) + 2
    ids = [cls, *q, sep, *(ctx.ids[i] for i in win), sep]
    offsets = [(0, 0)] * head + [tuple(ctx.offsets[i]) for i in win] + [(0, 0)]
    tokens = list(range(head, head + len(win)))
    s, e = 0, 0
    if ex.answers:
        a0 = ex.answer_starts[0]
        s, e = _answer_tokens(offsets, tokens, a0, a0 + len(ex.answers[0]))
    return {"input_ids": ids, "token_type_ids": [0] * head + [1] * (len(win) + 1), "start_positions": s,
            "end_positions": e, "context_tokens": tokens, "offsets": offsets}


def qa_features(tokenizer, examples: list[QAExample], max_length: int, doc_stride: int = 128,
                max_query_length: int = 64) -> list[dict]:
    """Features of every context window, each with `example` (its index in `examples`), start/end token
    targets, and the context token positions and offsets."""
    special = (_special_id(tokenizer, "[CLS]"), _special_id(tokenizer, "[SEP]"))
    qs = tokenizer.encode_batch([e.question for e in examples], add_special_tokens=False)
    cs = tokenizer.encode_batch([e.context for e in examples], add_special_tokens=False)
    feats = []
    for k, (ex, q, ctx) in enumerate(zip(examples, qs, cs)):
        q_ids = q.ids[:max_query_length]
        room = max_length - len(q_ids) - 3
        stride = min(doc_stride, max(room - 1, 0))  # a short max_length still advances by one token
        for start in window_starts(len(ctx.ids), room, stride):
            feats.append({**_qa_window(ex, q_ids, ctx, start, room, special), "example": k})
    return feats


def best_span(start: torch.Tensor, end: torch.Tensor, feat: dict, max_answer_tokens: int = 30):
    """(score, first token, last token) of the best context span of one window, or None without context."""
    ctx = torch.tensor(feat["context_tokens"], dtype=torch.long)
    if len(ctx) == 0:
        return None
    scores = start[ctx][:, None] + end[ctx][None, :]  # (C, C)
    i, j = torch.meshgrid(ctx, ctx, indexing="ij")
    scores = scores.masked_fill((j < i) | (j - i >= max_answer_tokens), float("-inf"))
    flat = int(scores.argmax())
    return float(scores.max()), int(ctx[flat // len(ctx)]), int(ctx[flat % len(ctx)])


def decode_example(rows: list[tuple[torch.Tensor, torch.Tensor]], feats: list[dict], context: str,
                   max_answer_tokens: int = 30, allow_empty: bool = False) -> str:
    """The best span over all windows of one example; "" when allow_empty and the lowest [CLS] null score of
    the windows beats it."""
    best, null = None, float("inf")
    for (start, end), feat in zip(rows, feats):
        null = min(null, float(start[0] + end[0]))
        cand = best_span(start, end, feat, max_answer_tokens)
        if cand is not None and (best is None or cand[0] > best[0]):
            best = (*cand, feat)
    if best is None or (allow_empty and null > best[0]):
        return ""
    _, a, b, feat = best
    return context[feat["offsets"][a][0]:feat["offsets"][b][1]]


def decode_span(start: torch.Tensor, end: torch.Tensor, feat: dict, context: str, max_answer_tokens: int = 30,
                allow_empty: bool = False) -> str:
    """decode_example for a single window."""
    return decode_example([(start, end)], [feat], context, max_answer_tokens, allow_empty)
