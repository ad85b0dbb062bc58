"""BERT's text normalization (the reference the C++ core mirrors), with alignment to the original text.

Invariants:
- `normalize(text, config)` returns (normalized, align) with len(align) == len(normalized); align[k] is the
  index of the character of `text` that produced normalized[k]. align is non-decreasing except inside a run of
  combining marks that canonical ordering swapped. Removed characters leave no entry.
- The steps and their order are HuggingFace's BertNormalizer: clean-up (drop NUL, U+FFFD and control
  characters, map whitespace to " "), pad CJK characters with spaces, strip accents (NFD, then drop Mn) when
  asked, lower-case character by character (no context-dependent final sigma, as in HuggingFace).
- `strip_accents=None` means "strip when lower-casing", as in BERT.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass

from fastllm.tokenizers import unicode as uc

Aligned = list[tuple[str, int]]


@dataclass(frozen=True)
class NormalizerConfig:
    clean_text: bool = True
    handle_chinese_chars: bool = True
    strip_accents: bool | None = None
    lowercase: bool = True

    @property
    def do_strip_accents(self) -> bool:
        return self.lowercase if self.strip_accents is None else self.strip_accents


def normalize(text: str, config: NormalizerConfig) -> tuple[str, list[int]]:
    chars: Aligned = [(ch, i) for i, ch in enumerate(text)]
    if config.clean_text:
        chars = _clean(chars)
    if config.handle_chinese_chars:
        chars = _pad_cjk(chars)
    if config.do_strip_accents:
        chars = _strip_accents(chars)
    if config.lowercase:
        chars = [(low, i) for ch, i in chars for low in ch.lower()]
    return "".join(ch for ch, _ in chars), [i for _, i in chars]


def _clean(chars: Aligned) -> Aligned:
    out: Aligned = []
    for ch, i in chars:
        if ch in ("\x00", "\ufffd") or uc.is_control(ch):
            continue
        out.append((" " if uc.is_whitespace(ch) else ch, i))
    return out


def _pad_cjk(chars: Aligned) -> Aligned:
    out: Aligned = []
    for ch, i in chars:
        if uc.is_cjk(ch):
            out.extend(((" ", i), (ch, i), (" ", i)))
        else:
            out.append((ch, i))
    return out


def _strip_accents(chars: Aligned) -> Aligned:
    decomposed = [(d, i) for ch, i in chars for d in unicodedata.normalize("NFD", ch)]
    return [(ch, i) for ch, i in canonical_order(decomposed) if not uc.is_nonspacing_mark(ch)]


def canonical_order(chars: Aligned) -> Aligned:
    """Unicode canonical ordering: stable sort of every run of characters with a non-zero combining class."""
    out: Aligned = []
    run: Aligned = []
    for item in chars:
        if unicodedata.combining(item[0]):
            run.append(item)
            continue
        out.extend(sorted(run, key=lambda x: unicodedata.combining(x[0])))
        run = []
        out.append(item)
    out.extend(sorted(run, key=lambda x: unicodedata.combining(x[0])))
    return out
