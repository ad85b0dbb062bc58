"""Evaluation metrics, written from their definitions (numpy only; scikit-learn/scipy/seqeval are test oracles).

Invariants:
- Every metric accepts Python lists, numpy arrays and torch tensors (moved to CPU, detached) and returns a
  Python float (or a dict of floats); inputs are 1-D sequences of equal length.
- Empty input raises ValueError (as scikit-learn does); mismatched lengths raise ValueError naming both lengths.
- Classification metrics follow scikit-learn 1.x exactly: labels are the sorted union of y_true and y_pred;
  precision/recall/F1 use its zero_division rule ("warn" -> 0.0 with an UndefinedMetricWarning-like
  `ZeroDivisionWarning`, or 0.0 / 1.0 / nan), and nan per-class scores are skipped by the averages.
  MCC is 0.0 when it is undefined (one class only, constant predictions), as in scikit-learn.
- Pearson and Spearman follow scipy.stats: nan with a ConstantInputWarning-like warning for constant input,
  ValueError for fewer than 2 points; Spearman ranks ties by their average rank.
- SQuAD exact match / F1 use the official normalization (lowercase, drop punctuation, drop a/an/the, collapse
  whitespace), take the max over gold answers, and the aggregate is in percent, as the official script reports.
- Entity F1 follows seqeval's default (conlleval-compatible) chunking of BIO/IOBES tags, micro-averaged.
"""
from __future__ import annotations

import math
import re
import string
import warnings
from collections import Counter
from collections.abc import Sequence

import numpy as np

AVERAGES = ("binary", "micro", "macro", "weighted", None)


class ZeroDivisionWarning(UserWarning):
    """A precision/recall/F-score was ill-defined and set to the zero_division value (sklearn's
    UndefinedMetricWarning)."""


class ConstantInputWarning(RuntimeWarning):
    """A correlation input was constant; the coefficient is nan (scipy's ConstantInputWarning)."""


# ----------------------------------------------------------------------------------------------- input handling
def to_numpy(x, name: str = "input") -> np.ndarray:
    """A 1-D numpy array from a list, tuple, numpy array or torch tensor."""
    if hasattr(x, "detach"):  # torch tensor, without importing torch here
        x = x.detach().cpu().numpy()
    arr = np.asarray(x)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    return arr


def _pair(y_true, y_pred, min_len: int = 1) -> tuple[np.ndarray, np.ndarray]:
    a, b = to_numpy(y_true, "y_true"), to_numpy(y_pred, "y_pred")
    if len(a) != len(b):
        raise ValueError(f"y_true and y_pred have different lengths: {len(a)} != {len(b)}")
    if len(a) < min_len:
        raise ValueError(f"found {len(a)} samples while a minimum of {min_len} is required (empty input?)")
    return a, b


def _check_discrete(a: np.ndarray, name: str) -> None:
    if a.dtype.kind == "f" and not np.all(np.isfinite(a) & (a == np.round(a))):
        raise ValueError(f"{name} holds continuous values; classification metrics need discrete labels")


def _labels(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    _check_discrete(a, "y_true")
    _check_discrete(b, "y_pred")
    try:
        return np.unique(np.concatenate([a, b]))
    except TypeError as e:
        raise ValueError(f"labels of mixed types cannot be compared: {e}") from None


# ------------------------------------------------------------------------------------------------ classification
def accuracy(y_true, y_pred) -> float:
    """Fraction of exact matches."""
    a, b = _pair(y_true, y_pred)
    _labels(a, b)
    return float(np.mean(a == b))


def _zero_value(zero_division) -> float:
    if isinstance(zero_division, str):
        if zero_division != "warn":
            raise ValueError(f"zero_division must be 'warn', 0, 1 or nan, got {zero_division!r}")
        return 0.0
    if not (zero_division in (0, 1) or (isinstance(zero_division, float) and math.isnan(zero_division))):
        raise ValueError(f"zero_division must be 'warn', 0, 1 or nan, got {zero_division!r}")
    return float(zero_division)


def _divide(num: np.ndarray, den: np.ndarray, what: str, zero_division, warn: bool) -> np.ndarray:
    mask = den == 0
    out = num.astype(np.float64) / np.where(mask, 1, den).astype(np.float64)
    if mask.any():
        out[mask] = _zero_value(zero_division)
        if warn and zero_division == "warn":
            warnings.warn(f"{what} is ill-defined and being set to 0.0; use zero_division to control this",
                          ZeroDivisionWarning, stacklevel=4)
    return out


def _nanaverage(x: np.ndarray, weights: np.ndarray | None) -> float:
    keep = ~np.isnan(x)
    if not keep.any():
        return float("nan")
    if weights is None or weights[keep].sum() == 0:
        return float(np.mean(x[keep]))
    return float(np.average(x[keep], weights=weights[keep]))


def _set_labels(a, b, average, labels, pos_label) -> np.ndarray:
    present = _labels(a, b)
    if average not in AVERAGES:
        raise ValueError(f"average must be one of {AVERAGES}, got {average!r}")
    if average != "binary":
        return present if labels is None else np.asarray(labels)
    if len(present) > 2:
        raise ValueError(f"target is multiclass ({len(present)} labels) but average='binary'; "
                         "choose average='micro', 'macro' or 'weighted'")
    if pos_label not in present.tolist() and len(present) >= 2:
        raise ValueError(f"pos_label={pos_label!r} is not a valid label; it should be one of {present.tolist()}")
    return np.asarray([pos_label])


def _class_counts(a, b, labels) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    tp = np.array([np.sum((a == c) & (b == c)) for c in labels], dtype=np.int64)
    pred = np.array([np.sum(b == c) for c in labels], dtype=np.int64)
    true = np.array([np.sum(a == c) for c in labels], dtype=np.int64)
    return tp, pred, true


def precision_recall_f1(y_true, y_pred, *, average: str | None = "binary", pos_label=1, labels=None,
                        zero_division="warn", warn_for=("precision", "recall", "f-score")):
    """(precision, recall, f1) as scikit-learn's precision_recall_fscore_support with beta=1 (arrays when
    average is None)."""
    a, b = _pair(y_true, y_pred)
    _zero_value(zero_division)
    lab = _set_labels(a, b, average, labels, pos_label)
    tp, pred, true = _class_counts(a, b, lab)
    if average == "micro":
        tp, pred, true = tp.sum(keepdims=True), pred.sum(keepdims=True), true.sum(keepdims=True)
    p = _divide(tp, pred, "Precision", zero_division, "precision" in warn_for)
    r = _divide(tp, true, "Recall", zero_division, "recall" in warn_for)
    f = _divide(2.0 * tp, (true + pred).astype(np.float64), "F-score", zero_division, "f-score" in warn_for)
    if average is None:
        return p, r, f
    weights = true.astype(np.float64) if average == "weighted" else None
    return _nanaverage(p, weights), _nanaverage(r, weights), _nanaverage(f, weights)


def precision(y_true, y_pred, **kw):
    """Precision (see precision_recall_f1 for the keyword arguments)."""
    return precision_recall_f1(y_true, y_pred, warn_for=("precision",), **kw)[0]


def recall(y_true, y_pred, **kw):
    """Recall (see precision_recall_f1 for the keyword arguments)."""
    return precision_recall_f1(y_true, y_pred, warn_for=("recall",), **kw)[1]


def f1(y_true, y_pred, **kw):
    """F1 (see precision_recall_f1 for the keyword arguments)."""
    return precision_recall_f1(y_true, y_pred, warn_for=("f-score",), **kw)[2]


def matthews_corrcoef(y_true, y_pred) -> float:
    """Matthews correlation coefficient (multiclass R_K statistic); 0.0 when undefined, as in scikit-learn."""
    a, b = _pair(y_true, y_pred)
    lab = _labels(a, b)
    ia, ib = np.searchsorted(lab, a), np.searchsorted(lab, b)
    c = np.zeros((len(lab), len(lab)), dtype=np.int64)
    np.add.at(c, (ia, ib), 1)
    t_sum, p_sum = c.sum(axis=1, dtype=np.float64), c.sum(axis=0, dtype=np.float64)
    n_correct, n = np.trace(c, dtype=np.float64), p_sum.sum()
    cov_tp = n_correct * n - np.dot(t_sum, p_sum)
    cov_pp = n**2 - np.dot(p_sum, p_sum)
    cov_tt = n**2 - np.dot(t_sum, t_sum)
    if cov_pp * cov_tt == 0:
        return 0.0
    return float(cov_tp / np.sqrt(cov_pp * cov_tt))


# -------------------------------------------------------------------------------------------------- correlation
def _float_pair(x, y) -> tuple[np.ndarray, np.ndarray]:
    a, b = _pair(x, y, min_len=2)
    a, b = a.astype(np.float64), b.astype(np.float64)
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        raise ValueError("correlation inputs must be finite")
    return a, b


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    if np.all(a == a[0]) or np.all(b == b[0]):
        warnings.warn("an input array is constant; the correlation coefficient is not defined (nan)",
                      ConstantInputWarning, stacklevel=3)
        return float("nan")
    am, bm = a - a.mean(), b - b.mean()
    am, bm = am / np.abs(am).max(), bm / np.abs(bm).max()  # scale first, as scipy does, to avoid overflow
    r = np.dot(am / np.linalg.norm(am), bm / np.linalg.norm(bm))
    return float(np.clip(r, -1.0, 1.0))


def pearson(x, y) -> float:
    """Pearson's r (scipy.stats.pearsonr's statistic)."""
    return _pearson(*_float_pair(x, y))


def rankdata(x) -> np.ndarray:
    """Ranks 1..n with ties given their average rank (scipy.stats.rankdata, method='average')."""
    a = to_numpy(x)
    order = np.argsort(a, kind="mergesort")
    sorted_a = a[order]
    starts = np.r_[True, sorted_a[1:] != sorted_a[:-1]]
    group = np.cumsum(starts) - 1  # group id of each sorted element
    first = np.flatnonzero(starts)
    last = np.r_[first[1:], len(a)]
    avg = (first + 1 + last) / 2.0  # mean of ranks first+1 .. last
    ranks = np.empty(len(a), dtype=np.float64)
    ranks[order] = avg[group]
    return ranks


def spearman(x, y) -> float:
    """Spearman's rho: Pearson's r of the average ranks (scipy.stats.spearmanr's statistic)."""
    a, b = _float_pair(x, y)
    return _pearson(rankdata(a), rankdata(b))


def perplexity(mean_loss: float) -> float:
    """exp(mean token cross-entropy in nats); inf when that overflows."""
    loss = float(mean_loss)
    if math.isnan(loss) or loss < 0:
        raise ValueError(f"perplexity needs a mean loss >= 0, got {loss}")
    return math.exp(loss) if loss < 709.78 else float("inf")


# --------------------------------------------------------------------------------------------------------- SQuAD
_PUNCT = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)


def normalize_answer(s: str) -> str:
    """The official SQuAD normalization: lowercase, remove punctuation, articles and extra whitespace."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", s).split())


def _exact(prediction: str, truth: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(truth))


def _token_f1(prediction: str, truth: str) -> float:
    pred, gold = normalize_answer(prediction).split(), normalize_answer(truth).split()
    if not pred or not gold:  # SQuAD 2.0 rule: both empty (no answer) is a match
        return float(pred == gold)
    same = sum((Counter(pred) & Counter(gold)).values())
    if same == 0:
        return 0.0
    p, r = same / len(pred), same / len(gold)
    return 2 * p * r / (p + r)


def _gold_list(golds) -> list[str]:
    golds = [golds] if isinstance(golds, str) else list(golds)
    return golds or [""]  # an unanswerable question has the empty answer


def squad_exact_match(prediction: str, golds) -> float:
    """1.0 when the normalized prediction equals any normalized gold answer."""
    return max(_exact(prediction, g) for g in _gold_list(golds))


def squad_f1(prediction: str, golds) -> float:
    """Max over gold answers of the bag-of-tokens F1 of normalized strings."""
    return max(_token_f1(prediction, g) for g in _gold_list(golds))


def squad_metrics(predictions: Sequence[str], references: Sequence) -> dict[str, float]:
    """{"exact_match", "f1"} in percent over paired predictions and lists of gold answers."""
    if len(predictions) != len(references):
        raise ValueError(f"predictions and references differ in length: {len(predictions)} != {len(references)}")
    if not predictions:
        raise ValueError("squad_metrics needs at least one prediction")
    em = [squad_exact_match(p, g) for p, g in zip(predictions, references)]
    f = [squad_f1(p, g) for p, g in zip(predictions, references)]
    return {"exact_match": 100.0 * sum(em) / len(em), "f1": 100.0 * sum(f) / len(f)}


# ----------------------------------------------------------------------------------------------- entity-level F1
def _split_tag(tag: str) -> tuple[str, str]:
    return tag[0], tag[1:].split("-", maxsplit=1)[-1] or "_"


def _chunk_ends(prev_tag: str, tag: str, prev_type: str, type_: str) -> bool:
    if prev_tag in ("E", "S"):
        return True
    if prev_tag in ("B", "I") and tag in ("B", "S", "O"):
        return True
    return prev_tag not in ("O", ".") and prev_type != type_


def _chunk_starts(prev_tag: str, tag: str, prev_type: str, type_: str) -> bool:
    if tag in ("B", "S"):
        return True
    if prev_tag in ("E", "S", "O") and tag in ("E", "I"):
        return True
    return tag not in ("O", ".") and prev_type != type_


def get_entities(tags: Sequence[str]) -> list[tuple[str, int, int]]:
    """(type, first, last) chunks of a BIO/IOBES tag sequence, with seqeval's default (lenient) rules."""
    prev_tag, prev_type, begin, chunks = "O", "", 0, []
    for i, chunk in enumerate([*tags, "O"]):
        tag, type_ = _split_tag(chunk)
        if _chunk_ends(prev_tag, tag, prev_type, type_):
            chunks.append((prev_type, begin, i - 1))
        if _chunk_starts(prev_tag, tag, prev_type, type_):
            begin = i
        prev_tag, prev_type = tag, type_
    return chunks


def _sentence_entities(sentences: Sequence[Sequence[str]]) -> set[tuple[int, str, int, int]]:
    return {(k, *e) for k, s in enumerate(sentences) for e in get_entities(list(s))}


def entity_scores(y_true: Sequence[Sequence[str]], y_pred: Sequence[Sequence[str]]) -> dict[str, float]:
    """Micro-averaged entity precision/recall/F1 over sentences of BIO tags (seqeval's default mode);
    0.0 where a ratio is undefined, as seqeval's zero_division='warn'."""
    if len(y_true) != len(y_pred):
        raise ValueError(f"y_true and y_pred hold different numbers of sentences: {len(y_true)} != {len(y_pred)}")
    for k, (t, p) in enumerate(zip(y_true, y_pred)):
        if len(t) != len(p):
            raise ValueError(f"sentence {k}: {len(t)} gold tags but {len(p)} predicted tags")
    if not y_true:
        raise ValueError("entity_scores needs at least one sentence")
    gold, pred = _sentence_entities(y_true), _sentence_entities(y_pred)
    tp = len(gold & pred)
    p = tp / len(pred) if pred else 0.0
    r = tp / len(gold) if gold else 0.0
    return {"precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r else 0.0}


def entity_f1(y_true, y_pred) -> float:
    """Micro entity-level F1 (see entity_scores)."""
    return entity_scores(y_true, y_pred)["f1"]
