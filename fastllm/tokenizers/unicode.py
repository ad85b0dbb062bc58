"""Character classes shared by every tokenizer: the readable reference for the C++ tables.

Invariants:
- Every predicate here is a pure function of one code point, defined from Python's `unicodedata` (its Unicode
  version is `UNICODE_VERSION`); csrc/tokenizers/unicode_tables.h is generated from these same predicates by
  `python -m fastllm.tokenizers._gen_unicode_tables`, so the C++ core and this module agree code point by code
  point whenever the header was generated with the same Unicode version.
- The definitions follow HuggingFace `tokenizers` (the test oracle):
  * whitespace = the Unicode White_Space property (Rust `char::is_whitespace`, Oniguruma `\\s`);
  * control (removed by BERT's clean-up) = categories Cc, Cf, Co, Cs except tab, newline and carriage return;
    unassigned code points (Cn) are kept, as HuggingFace keeps them;
  * BERT punctuation = ASCII punctuation or any Unicode P* category;
  * GPT-2's `\\p{L}` / `\\p{N}` = categories L* / N*;
  * CJK = the ranges HuggingFace's BertNormalizer pads with spaces (note 0x2B920, not 0x2B820).
  HuggingFace builds some of these tables from older Unicode data, so characters assigned after Unicode 10
  (e.g. U+2E43..U+2E4F as punctuation, a few Arabic marks) can be classified differently there.
- `bytes_to_unicode()` is GPT-2's reversible map from the 256 byte values to printable characters.
"""

from __future__ import annotations

import functools
import unicodedata

UNICODE_VERSION: str = unicodedata.unidata_version

WHITESPACE: frozenset[int] = frozenset(
    [
        *range(0x09, 0x0E),
        0x20,
        0x85,
        0xA0,
        0x1680,
        *range(0x2000, 0x200B),
        0x2028,
        0x2029,
        0x202F,
        0x205F,
        0x3000,
    ]
)

CJK_RANGES: tuple[tuple[int, int], ...] = (
    (0x4E00, 0x9FFF),
    (0x3400, 0x4DBF),
    (0x20000, 0x2A6DF),
    (0x2A700, 0x2B73F),
    (0x2B740, 0x2B81F),
    (0x2B920, 0x2CEAF),
    (0xF900, 0xFAFF),
    (0x2F800, 0x2FA1F),
)


def is_whitespace(ch: str) -> bool:
    """Unicode White_Space (tab, newline, carriage return, NBSP, ideographic space, ...)."""
    return ord(ch) in WHITESPACE


def is_control(ch: str) -> bool:
    """A character BERT's clean-up removes: Cc/Cf/Co/Cs except tab, newline, carriage return."""
    if ch in "\t\n\r":
        return False
    return unicodedata.category(ch) in ("Cc", "Cf", "Co", "Cs")


def is_punctuation(ch: str) -> bool:
    """BERT punctuation: every non-alphanumeric printable ASCII character, or a Unicode P* character."""
    cp = ord(ch)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


def is_letter(ch: str) -> bool:
    """GPT-2's \\p{L}."""
    return unicodedata.category(ch).startswith("L")


def is_number(ch: str) -> bool:
    """GPT-2's \\p{N}."""
    return unicodedata.category(ch).startswith("N")


def is_nonspacing_mark(ch: str) -> bool:
    """Category Mn: what BERT's accent stripping removes after NFD."""
    return unicodedata.category(ch) == "Mn"


def is_cjk(ch: str) -> bool:
    cp = ord(ch)
    return any(lo <= cp <= hi for lo, hi in CJK_RANGES)


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map: printable Latin-1 bytes to themselves, the other 68 bytes to U+0100.. in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


@functools.cache
def unicode_to_bytes() -> dict[str, int]:
    return {ch: b for b, ch in bytes_to_unicode().items()}


def token_to_bytes(token: str) -> bytes:
    """The raw bytes of a byte-level token string ("Ġthe" -> b" the"); KeyError names a foreign character."""
    table = unicode_to_bytes()
    return bytes(table[ch] for ch in token)


def bytes_to_token(raw: bytes) -> str:
    table = bytes_to_unicode()
    return "".join(table[b] for b in raw)
