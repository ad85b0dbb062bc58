"""Pre-tokenizers (reference implementations): GPT-2's regex and BERT's whitespace/punctuation split.

Invariants:
- Both return spans (start, end) of character indices, in order, non-overlapping and non-empty.
- `gpt2_spans` covers the text exactly (spans are contiguous, nothing dropped) and equals the matches of
  GPT-2's pattern `GPT2_PATTERN` (as run by the `regex` module or Oniguruma) with the character classes of
  fastllm.tokenizers.unicode: a hand-written scanner, because the standard `re` module has no \\p{L}.
- `bert_spans` drops whitespace and makes every punctuation character a span of its own.
"""

from __future__ import annotations

from fastllm.tokenizers import unicode as uc

GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_CONTRACTIONS = ("s", "t", "re", "ve", "m", "ll", "d")

Span = tuple[int, int]

_SPACE, _LETTER, _NUMBER, _OTHER = range(4)


def _gpt2_class(ch: str) -> int:
    if uc.is_whitespace(ch):
        return _SPACE
    if uc.is_letter(ch):
        return _LETTER
    return _NUMBER if uc.is_number(ch) else _OTHER


def gpt2_spans(text: str) -> list[Span]:
    classes = [_gpt2_class(ch) for ch in text]
    spans: list[Span] = []
    i = 0
    while i < len(text):
        j = _gpt2_match(text, classes, i)
        spans.append((i, j))
        i = j
    return spans


def _run_end(classes: list[int], i: int, cls: int) -> int:
    while i < len(classes) and classes[i] == cls:
        i += 1
    return i


def _gpt2_match(text: str, classes: list[int], i: int) -> int:
    """End of the match of GPT2_PATTERN that starts at i (the alternatives are tried in pattern order)."""
    n = len(text)
    if text[i] == "'":
        for suffix in _CONTRACTIONS:
            if text.startswith(suffix, i + 1):
                return i + 1 + len(suffix)
    start = i + 1 if text[i] == " " and i + 1 < n and classes[i + 1] != _SPACE else i
    if classes[start] != _SPACE:  # ' ?\p{L}+', ' ?\p{N}+' or ' ?[^\s\p{L}\p{N}]+'
        return _run_end(classes, start + 1, classes[start])
    end = _run_end(classes, i, _SPACE)
    if end == n or end - i == 1:  # '\s+(?!\S)' to the end of the text, or a lone '\s+'
        return end
    return end - 1  # '\s+(?!\S)' leaves the last space to the word that follows


def bert_spans(text: str) -> list[Span]:
    spans: list[Span] = []
    start = -1
    for i, ch in enumerate(text):
        if uc.is_whitespace(ch) or uc.is_punctuation(ch):
            if start >= 0:
                spans.append((start, i))
                start = -1
            if not uc.is_whitespace(ch):
                spans.append((i, i + 1))
        elif start < 0:
            start = i
    if start >= 0:
        spans.append((start, len(text)))
    return spans
