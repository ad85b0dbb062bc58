"""The nine GLUE tasks: fields, label sets, metrics, loaders (official TSVs, HF hub, local CSV/JSON), scores and
leaderboard submission files.

Invariants:
- A `GlueTask` is immutable and fully describes a task; `TASKS` maps the lower-case name (cola, sst2, mrpc, stsb,
  qqp, mnli, qnli, rte, wnli) to it, and `get_task` accepts the official spellings too (SST-2, STS-B, MNLI-m...).
- `label_values` are the label strings as they appear in the official TSVs (and in the submission files); an
  Example's label is an index into them (classification), a float (STS-B), or None (test files have no labels).
  The index order equals the HuggingFace `glue` dataset's ClassLabel order, so hub integers map directly.
- Official TSVs are read with csv QUOTE_NONE (as GLUE's own loaders do). Columns are found by header name, or by
  position for the headerless CoLA train/dev files. QQP rows with missing fields are skipped (as the reference
  loaders do, counted in a warning); any other short row, unknown column or label raises ValueError naming the
  file, line, column or label. A missing file raises FileNotFoundError naming the path.
- Metric values are fractions in [0, 1] (correlations in [-1, 1]); `task_score` and `glue_average` are in percent
  and follow the leaderboard: multi-metric tasks (MRPC, QQP, STS-B) are averaged first, MNLI-m and MNLI-mm count
  as two entries, the AX diagnostic is not in the average.
- `datasets` is imported lazily, only by `load_hub`.
"""
from __future__ import annotations

import csv
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fastllm.eval import metrics as M

log = logging.getLogger("fastllm")


@dataclass(frozen=True)
class Layout:
    """Where the fields of one kind of TSV file live: header names, or 0-based positions when header=False."""
    text: tuple
    label: str | int | None
    index: str | None = None
    header: bool = True


@dataclass(frozen=True)
class GlueTask:
    name: str
    dir_name: str
    label_values: tuple[str, ...]  # () for regression
    metrics: tuple[str, ...]
    labelled: Layout
    test: Layout
    dev_splits: tuple[str, ...] = ("dev",)
    test_splits: tuple[str, ...] = ("test",)
    hf_fields: tuple[str, ...] = ("sentence",)
    submission_names: dict = field(default_factory=dict)

    @property
    def is_regression(self) -> bool:
        return not self.label_values

    @property
    def num_labels(self) -> int:
        return 1 if self.is_regression else len(self.label_values)

    @property
    def is_pair(self) -> bool:
        return len(self.labelled.text) == 2

    def submission_name(self, split: str) -> str:
        return self.submission_names.get(split, f"{self.dir_name}.tsv")


@dataclass
class Example:
    guid: str
    text_a: str
    text_b: str | None
    label: int | float | None


_BIN = ("0", "1")
_NLI2 = ("entailment", "not_entailment")
_PAIR_TEST = Layout(("sentence1", "sentence2"), None, "index")

TASKS: dict[str, GlueTask] = {t.name: t for t in (
    GlueTask("cola", "CoLA", _BIN, ("mcc",), Layout((3,), 1, header=False), Layout(("sentence",), None, "index")),
    GlueTask("sst2", "SST-2", _BIN, ("accuracy",), Layout(("sentence",), "label"),
             Layout(("sentence",), None, "index")),
    GlueTask("mrpc", "MRPC", _BIN, ("f1", "accuracy"), Layout(("#1 String", "#2 String"), "Quality"),
             Layout(("#1 String", "#2 String"), None, "index"), hf_fields=("sentence1", "sentence2")),
    GlueTask("stsb", "STS-B", (), ("pearson", "spearman"), Layout(("sentence1", "sentence2"), "score"),
             _PAIR_TEST, hf_fields=("sentence1", "sentence2")),
    GlueTask("qqp", "QQP", _BIN, ("f1", "accuracy"), Layout(("question1", "question2"), "is_duplicate"),
             Layout(("question1", "question2"), None, "id"), hf_fields=("question1", "question2")),
    GlueTask("mnli", "MNLI", ("entailment", "neutral", "contradiction"), ("accuracy",),
             Layout(("sentence1", "sentence2"), "gold_label"), _PAIR_TEST,
             dev_splits=("dev_matched", "dev_mismatched"), test_splits=("test_matched", "test_mismatched"),
             hf_fields=("premise", "hypothesis"),
             submission_names={"test_matched": "MNLI-m.tsv", "test_mismatched": "MNLI-mm.tsv"}),
    GlueTask("qnli", "QNLI", _NLI2, ("accuracy",), Layout(("question", "sentence"), "label"),
             Layout(("question", "sentence"), None, "index"), hf_fields=("question", "sentence")),
    GlueTask("rte", "RTE", _NLI2, ("accuracy",), Layout(("sentence1", "sentence2"), "label"), _PAIR_TEST,
             hf_fields=("sentence1", "sentence2")),
    GlueTask("wnli", "WNLI", _BIN, ("accuracy",), Layout(("sentence1", "sentence2"), "label"), _PAIR_TEST,
             hf_fields=("sentence1", "sentence2")),
)}
AX = GlueTask("ax", "AX", TASKS["mnli"].label_values, (), _PAIR_TEST, _PAIR_TEST, test_splits=("test",),
              hf_fields=("premise", "hypothesis"))

_ALIASES = {"sst-2": "sst2", "sts-b": "stsb", "mnli-m": "mnli", "mnli-mm": "mnli", "mnli_matched": "mnli",
            "mnli_mismatched": "mnli", "diagnostic": "ax"}


def get_task(name: str) -> GlueTask:
    """The task by name (cola, sst2, ..., official spellings like SST-2 accepted; ax is the diagnostic)."""
    key = _ALIASES.get(name.lower(), name.lower())
    if key == "ax":
        return AX
    if key not in TASKS:
        raise ValueError(f"unknown GLUE task {name!r}; known: {sorted(TASKS)}")
    return TASKS[key]


# ------------------------------------------------------------------------------------------------ official TSVs
def task_dir(data_dir, task: GlueTask) -> Path:
    """The folder holding the task's TSVs: DATA/<dir_name> (the GLUE root) or DATA itself."""
    root = Path(data_dir)
    for cand in (root / task.dir_name, root / task.dir_name.lower(), root / task.name):
        if cand.is_dir():
            return cand
    if task is AX and (root / "diagnostic").is_dir():
        return root / "diagnostic"
    return root


def split_file(data_dir, task: GlueTask, split: str) -> Path:
    stem = "diagnostic" if task is AX else split
    path = task_dir(data_dir, task) / f"{stem}.tsv"
    if not path.is_file():
        raise FileNotFoundError(f"GLUE {task.dir_name} split {split!r}: file not found: {path}")
    return path


def _read_tsv(path: Path) -> list[list[str]]:
    with open(path, encoding="utf-8-sig", newline="") as f:
        return [row for row in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)]


def _column_positions(layout: Layout, header: list[str] | None, path: Path) -> tuple[list, object, object]:
    if not layout.header:
        return list(layout.text), layout.label, None

    def pos(name):
        if name is None:
            return None
        if name not in header:
            raise ValueError(f"{path}: column {name!r} not found in header {header}")
        return header.index(name)
    return [pos(n) for n in layout.text], pos(layout.label), pos(layout.index)


def parse_label(task: GlueTask, value, where: str):
    """The label index (or STS-B float) of a label value; ValueError naming the place and the allowed set."""
    text = str(value).strip()
    if task.is_regression:
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"{where}: label {value!r} is not a number (STS-B scores are floats)") from None
    if text in task.label_values:
        return task.label_values.index(text)
    raise ValueError(f"{where}: label {value!r} is not in the {task.dir_name} label set {list(task.label_values)}")


def _row_example(task, row, cols, guid, where) -> Example:
    text_pos, label_pos, _ = cols
    needed = [p for p in (*text_pos, label_pos) if p is not None]
    if needed and len(row) <= max(needed):
        raise IndexError(f"{where}: row has {len(row)} fields, needs at least {max(needed) + 1}")
    texts = [row[p] for p in text_pos]
    label = None if label_pos is None else parse_label(task, row[label_pos], where)
    return Example(guid, texts[0], texts[1] if len(texts) > 1 else None, label)


def _rows_to_examples(task, rows, cols, split, path, first_line: int) -> list[Example]:
    out, skipped = [], 0
    for i, row in enumerate(rows):
        where = f"{path}:{i + first_line}"
        guid = row[cols[2]] if cols[2] is not None and len(row) > cols[2] else f"{split}-{i}"
        try:
            out.append(_row_example(task, row, cols, guid, where))
        except IndexError as e:
            if task.name != "qqp":
                raise ValueError(str(e)) from None
            skipped += 1
    if skipped:
        log.warning("fastllm: %s: skipped %d QQP rows with missing fields", path, skipped)
    return out


def load_tsv(data_dir, task: GlueTask | str, split: str) -> list[Example]:
    """Examples of one split ("train", "dev", "dev_matched", "test", ...) from the official GLUE directory."""
    task = get_task(task) if isinstance(task, str) else task
    known = ("train", *task.dev_splits, *task.test_splits)
    if split not in known:
        raise ValueError(f"{task.dir_name} has no split {split!r}; splits: {list(known)}")
    path = split_file(data_dir, task, split)
    layout = task.test if split.startswith("test") else task.labelled
    rows = _read_tsv(path)
    header = rows.pop(0) if layout.header and rows else None
    if layout.header and header is None:
        raise ValueError(f"{path}: empty file, expected a header")
    cols = _column_positions(layout, header, path)
    return _rows_to_examples(task, rows, cols, split, path, 2 if layout.header else 1)


# -------------------------------------------------------------------------------------- HF hub and local files
_HUB_SPLITS = {"dev": "validation", "dev_matched": "validation_matched", "dev_mismatched": "validation_mismatched",
               "test_matched": "test_matched", "test_mismatched": "test_mismatched", "train": "train", "test": "test"}


def load_hub(task: GlueTask | str, split: str, dataset: str = "nyu-mll/glue") -> list[Example]:
    """Examples from the HuggingFace hub `glue` dataset (needs network and `datasets`)."""
    import datasets  # lazy: optional dependency

    task = get_task(task) if isinstance(task, str) else task
    config = "ax" if task is AX else task.name
    ds = datasets.load_dataset(dataset, config, split=_HUB_SPLITS[split])
    out = []
    for i, rec in enumerate(ds):
        texts = [rec[f] for f in task.hf_fields]
        label = rec.get("label")
        label = None if label is None or (not task.is_regression and label < 0) else label
        guid = str(rec.get("idx", i))
        out.append(Example(guid, texts[0], texts[1] if len(texts) > 1 else None, label))
    return out


def _local_records(path: Path) -> list[dict]:
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    text = path.read_text(encoding="utf-8-sig")
    if path.suffix in (".csv", ".tsv"):
        delim = "\t" if path.suffix == ".tsv" else ","
        return list(csv.DictReader(text.splitlines(), delimiter=delim))
    if path.suffix == ".jsonl" or (path.suffix == ".json" and not text.lstrip().startswith("[")):
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    if path.suffix == ".json":
        return json.loads(text)
    raise ValueError(f"{path}: unsupported file type {path.suffix!r} (use .csv, .tsv, .json or .jsonl)")


def _local_label(task: GlueTask, value, where: str):
    is_int = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    if not task.is_regression and is_int and 0 <= value < task.num_labels and str(value) not in task.label_values:
        return int(value)  # an index into label_values (e.g. HF-style integer NLI labels)
    return parse_label(task, value, where)


def load_local(path, task: GlueTask | str, columns: dict[str, str | None]) -> list[Example]:
    """Examples from a local CSV/TSV/JSON/JSON-lines file; `columns` maps text_a, text_b, label (and optional
    guid) to the file's column names (label None: unlabelled)."""
    task = get_task(task) if isinstance(task, str) else task
    path = Path(path)
    recs = _local_records(path)
    for role in ("text_a", *(("text_b",) if task.is_pair else ())):
        if not columns.get(role):
            raise ValueError(f"column mapping needs {role!r} for {task.dir_name}")
    out = []
    for i, rec in enumerate(recs):
        for role, col in columns.items():
            if col is not None and col not in rec:
                raise ValueError(f"{path}: record {i}: column {col!r} (for {role}) not found; has {sorted(rec)}")
        label = rec[columns["label"]] if columns.get("label") else None
        label = None if label is None else _local_label(task, label, f"{path}: record {i}")
        guid = str(rec[columns["guid"]]) if columns.get("guid") else str(i)
        out.append(Example(guid, str(rec[columns["text_a"]]),
                           str(rec[columns["text_b"]]) if columns.get("text_b") else None, label))
    return out


# ------------------------------------------------------------------------------------------------------ metrics
def compute_metrics(task: GlueTask | str, predictions, labels) -> dict[str, float]:
    """The task's official metrics; predictions are label indices (or floats for STS-B)."""
    task = get_task(task) if isinstance(task, str) else task
    fns = {"mcc": M.matthews_corrcoef, "accuracy": M.accuracy, "f1": lambda t, p: M.f1(t, p, zero_division=0),
           "pearson": lambda t, p: M.pearson(p, t), "spearman": lambda t, p: M.spearman(p, t)}
    return {m: fns[m](labels, predictions) for m in task.metrics}


def task_score(results: dict[str, float]) -> float:
    """A task's leaderboard score in percent: the mean of its metrics."""
    return 100.0 * float(np.mean(list(results.values())))


def leaderboard_entries(results: dict[str, dict[str, dict[str, float]]]) -> dict[str, float]:
    """{column: score in percent} from {task: {split: metrics}}; MNLI gives MNLI-m and MNLI-mm."""
    out = {}
    for name, by_split in results.items():
        task = get_task(name)
        for split, res in by_split.items():
            col = {"dev_matched": "MNLI-m", "dev_mismatched": "MNLI-mm"}.get(split, task.dir_name)
            out[col] = task_score(res)
    return out


def glue_average(results: dict[str, dict[str, dict[str, float]]]) -> float:
    """The GLUE average score (percent) over the leaderboard entries present."""
    entries = leaderboard_entries(results)
    if not entries:
        raise ValueError("no task results to average")
    return float(np.mean(list(entries.values())))


# --------------------------------------------------------------------------------------------------- submission
def format_prediction(task: GlueTask, value) -> str:
    if task.is_regression:
        return f"{min(5.0, max(0.0, float(value))):.3f}"
    return task.label_values[int(value)]


def write_submission(out_dir, task: GlueTask | str, split: str, guids: Sequence[str], predictions) -> Path:
    """Writes the leaderboard file (CoLA.tsv, MNLI-m.tsv, AX.tsv, ...): `index<TAB>prediction` per example."""
    task = get_task(task) if isinstance(task, str) else task
    if len(guids) != len(predictions):
        raise ValueError(f"{len(guids)} guids but {len(predictions)} predictions")
    path = Path(out_dir) / task.submission_name(split)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["index\tprediction"] + [f"{g}\t{format_prediction(task, p)}" for g, p in zip(guids, predictions)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
