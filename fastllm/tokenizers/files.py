"""Vocabulary and merge files: vocab.json + merges.txt (GPT-2 / BPE) and vocab.txt (BERT WordPiece).

Invariants:
- Readers validate everything and raise FileNotFoundError or ValueError naming the file, the line or key and
  the offending value: a missing file, invalid JSON, a non-integer id, ids that are not exactly 0..n-1, a
  duplicate token, a malformed merge line, a merge whose parts or result are not in the vocabulary.
- Writers produce files the readers (and GPT-2's / HuggingFace's loaders) read back to the same vocabulary and
  merge ranks: vocab.json sorted by id, merges.txt with a "#version: 0.2" header, vocab.txt one token per line
  in id order.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from fastllm.tokenizers.unicode import WHITESPACE

MERGES_HEADER = "#version: 0.2"
_TRAILING = "".join(map(chr, sorted(WHITESPACE)))  # as HuggingFace's trim_end (Unicode White_Space)


def _require(path: Path, what: str) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {path}")


def check_ids(vocab: dict[str, int], source: str) -> None:
    """Ids must be the integers 0..n-1, each used once."""
    seen: dict[int, str] = {}
    for token, idx in vocab.items():
        if isinstance(idx, bool) or not isinstance(idx, int):
            raise ValueError(f"{source}: id of {token!r} must be an integer, got {idx!r}")
        if idx in seen:
            raise ValueError(f"{source}: id {idx} is used by both {seen[idx]!r} and {token!r}")
        seen[idx] = token
    missing = next((i for i in range(len(vocab)) if i not in seen), None)
    if missing is not None:
        raise ValueError(
            f"{source}: ids must be 0..{len(vocab) - 1}; id {missing} is missing (largest id {max(seen)})"
        )


def read_vocab_json(path: str | Path) -> dict[str, int]:
    path = Path(path)
    _require(path, "vocab")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not a valid JSON vocabulary ({err})") from None
    if not isinstance(data, dict) or not data:
        raise ValueError(f"{path}: expected a non-empty JSON object token -> id, got {type(data).__name__}")
    check_ids(data, str(path))
    return data


def write_vocab_json(path: str | Path, vocab: dict[str, int]) -> None:
    ordered = dict(sorted(vocab.items(), key=lambda kv: kv[1]))
    Path(path).write_text(json.dumps(ordered, ensure_ascii=False), encoding="utf-8")


def read_merges_txt(path: str | Path) -> list[tuple[str, str]]:
    path = Path(path)
    _require(path, "merges")
    merges: list[tuple[str, str]] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line or (lineno == 1 and line.startswith("#version")):
                continue
            parts = line.split(" ")
            if len(parts) != 2 or not all(parts):
                raise ValueError(f"{path}:{lineno}: expected two tokens separated by one space, got {line!r}")
            merges.append((parts[0], parts[1]))
    return merges


def write_merges_txt(path: str | Path, merges: Sequence[tuple[str, str]]) -> None:
    lines = [MERGES_HEADER] + [f"{a} {b}" for a, b in merges]
    Path(path).write_text("\n".join(lines) + "\n", encoding="utf-8")


def merges_to_ids(
    merges: Sequence[tuple[str, str]], vocab: dict[str, int], source: str, strip_prefix: str = ""
) -> list[tuple[int, int, int]]:
    """(left, right) strings -> (left id, right id, merged id); every part and result must be in vocab."""
    out: list[tuple[int, int, int]] = []
    for rank, (a, b) in enumerate(merges):
        right = b[len(strip_prefix) :] if strip_prefix and b.startswith(strip_prefix) else b
        for token in (a, b, a + right):
            if token not in vocab:
                raise ValueError(
                    f"{source}: merge #{rank} ({a!r}, {b!r}) uses {token!r}, which is not in the vocab"
                )
        out.append((vocab[a], vocab[b], vocab[a + right]))
    return out


def read_vocab_txt(path: str | Path) -> dict[str, int]:
    path = Path(path)
    _require(path, "vocab")
    vocab: dict[str, int] = {}
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text ({err})") from None
    if lines and lines[-1] == "":
        lines.pop()  # the final line ending
    for lineno, line in enumerate(lines, 1):
        token = line.rstrip(_TRAILING)
        if not token:
            raise ValueError(f"{path}:{lineno}: empty token (one token per line expected)")
        if token in vocab:
            raise ValueError(f"{path}:{lineno}: duplicate token {token!r} (first on line {vocab[token] + 1})")
        vocab[token] = len(vocab)
    if not vocab:
        raise ValueError(f"{path}: empty vocabulary")
    return vocab


def write_vocab_txt(path: str | Path, vocab: dict[str, int]) -> None:
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    Path(path).write_text("\n".join(tokens) + "\n", encoding="utf-8")
