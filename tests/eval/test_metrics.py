"""fastllm.eval.metrics against scikit-learn, scipy and seqeval on seeded random inputs and degenerate cases."""
import math
import warnings

import numpy as np
import pytest
import torch

from fastllm.eval import metrics as M

sk = pytest.importorskip("sklearn.metrics", reason="scikit-learn is the oracle ([test] extra)")
stats = pytest.importorskip("scipy.stats", reason="scipy is the oracle ([test] extra)")

TOL = 1e-12


def _close(a, b):
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    assert a.shape == b.shape
    assert np.all((np.isnan(a) & np.isnan(b)) | (np.abs(a - b) <= TOL)), (a, b)


def _random_labels(rng, n_classes):
    n = int(rng.integers(1, 40))
    return rng.integers(0, n_classes, n), rng.integers(0, n_classes, n)


@pytest.mark.filterwarnings("ignore:A single label was found:UserWarning")  # sklearn's, on one-class input
@pytest.mark.parametrize("n_classes", [1, 2, 3, 5])
def test_classification_equals_sklearn(n_classes):
    rng = np.random.default_rng(n_classes)
    for i in range(60):
        t, p = _random_labels(rng, n_classes)
        _close(M.accuracy(t, p), sk.accuracy_score(t, p))
        _close(M.matthews_corrcoef(t, p), sk.matthews_corrcoef(t, p))
        for avg in ("micro", "macro", "weighted", None):
            for zd in ((0, 1, np.nan)[i % 3],):
                ours = M.precision_recall_f1(t, p, average=avg, zero_division=zd)
                ref = sk.precision_recall_fscore_support(t, p, average=avg, zero_division=zd)[:3]
                for a, b in zip(ours, ref):
                    _close(a, b)


def test_binary_equals_sklearn_including_degenerate():
    rng = np.random.default_rng(7)
    for _ in range(120):
        n = int(rng.integers(1, 12))
        t, p = rng.integers(0, 2, n), rng.integers(0, 2, n)  # small n: many one-class / all-zero cases
        for zd in (0, 1, np.nan):
            ours = M.precision_recall_f1(t, p, average="binary", zero_division=zd)
            ref = sk.precision_recall_fscore_support(t, p, average="binary", zero_division=zd)[:3]
            for a, b in zip(ours, ref):
                _close(a, b)
        _close(M.f1(t, p, pos_label=0, zero_division=0), sk.f1_score(t, p, pos_label=0, zero_division=0))


def test_input_types_and_string_labels():
    t, p = ["a", "b", "a", "c"], ["a", "a", "a", "c"]
    _close(M.f1(t, p, average="macro"), sk.f1_score(t, p, average="macro"))
    _close(M.matthews_corrcoef(np.array(t), np.array(p)), sk.matthews_corrcoef(t, p))
    tt, tp = torch.tensor([1, 0, 1, 1]), torch.tensor([1, 1, 0, 1])
    _close(M.f1(tt, tp), sk.f1_score(tt.numpy(), tp.numpy()))
    _close(M.accuracy(tt, tp), 0.5)


@pytest.mark.filterwarnings("ignore:A single label was found:UserWarning")  # sklearn's, on one-class input
def test_zero_division_warns_like_sklearn():
    with pytest.warns(M.ZeroDivisionWarning):
        assert M.precision([1, 1], [0, 0]) == 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert M.precision([1, 1], [0, 0], zero_division=1) == 1.0
        ours = M.matthews_corrcoef([1, 1, 1], [1, 1, 1])
    assert ours == 0.0 == sk.matthews_corrcoef([1, 1, 1], [1, 1, 1])


def test_bad_classification_input():
    with pytest.raises(ValueError, match="empty"):
        M.accuracy([], [])
    with pytest.raises(ValueError, match="lengths"):
        M.accuracy([1, 2], [1])
    with pytest.raises(ValueError, match="multiclass"):
        M.f1([0, 1, 2], [0, 1, 1])
    with pytest.raises(ValueError, match="pos_label"):
        M.f1([2, 3], [2, 3])
    with pytest.raises(ValueError, match="continuous"):
        M.accuracy([0.5, 1.0], [1.0, 1.0])
    with pytest.raises(ValueError, match="average"):
        M.f1([0, 1], [0, 1], average="samples")


def test_correlations_equal_scipy():
    rng = np.random.default_rng(3)
    for i in range(400):
        n = int(rng.integers(2, 50))
        if i % 3 == 0:  # many ties
            x, y = rng.integers(0, 4, n).astype(float), rng.integers(0, 4, n).astype(float)
        else:
            x, y = rng.normal(size=n) * 10.0 ** rng.integers(-3, 4), rng.normal(size=n)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _close(M.pearson(x, y), stats.pearsonr(x, y).statistic)
            _close(M.spearman(x, y), stats.spearmanr(x, y).statistic)
        _close(M.rankdata(x), stats.rankdata(x))


def test_constant_correlation_is_nan_with_warning():
    with pytest.warns(M.ConstantInputWarning):
        assert math.isnan(M.pearson([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))
    with pytest.warns(M.ConstantInputWarning):
        assert math.isnan(M.spearman(torch.tensor([1.0, 2.0, 3.0]), [5, 5, 5]))
    with pytest.raises(ValueError, match="minimum of 2"):
        M.pearson([1.0], [2.0])


def test_perplexity():
    assert M.perplexity(0.0) == 1.0
    _close(M.perplexity(torch.tensor(2.5)), math.exp(2.5))
    assert M.perplexity(1000.0) == math.inf
    with pytest.raises(ValueError):
        M.perplexity(float("nan"))


def test_squad_official_normalization():
    assert M.normalize_answer("The  Quick, brown fox!") == "quick brown fox"
    assert M.normalize_answer("an apple a day") == "apple day"
    assert M.squad_exact_match("the Eiffel tower.", ["Eiffel Tower", "Paris"]) == 1.0
    _close(M.squad_f1("in Paris France", ["Paris", "the city of Paris"]), 2 * (1 / 3) * 1 / (1 / 3 + 1))
    assert M.squad_f1("", []) == 1.0 and M.squad_f1("x", [""]) == 0.0
    out = M.squad_metrics(["Paris", "London"], [["Paris"], ["Berlin"]])
    assert out == {"exact_match": 50.0, "f1": 50.0}


def _official_f1(prediction, truth):
    """The SQuAD v1.1 evaluate script's f1_score (nonempty answers), restated as the oracle."""
    from collections import Counter
    p, g = M.normalize_answer(prediction).split(), M.normalize_answer(truth).split()
    common = Counter(p) & Counter(g)
    same = sum(common.values())
    if same == 0:
        return 0
    pr, rc = 1.0 * same / len(p), 1.0 * same / len(g)
    return (2 * pr * rc) / (pr + rc)


def test_squad_f1_random_against_official():
    rng = np.random.default_rng(5)
    words = ["a", "the", "cat", "Cat,", "dog", "an", "red", "red.", "blue"]
    for _ in range(300):
        pred = " ".join(rng.choice(words, int(rng.integers(1, 6))))
        gold = [" ".join(rng.choice(words, int(rng.integers(1, 6)))) for _ in range(int(rng.integers(1, 3)))]
        want = max(_official_f1(pred, g) if M.normalize_answer(g) and M.normalize_answer(pred)
                   else float(M.normalize_answer(g) == M.normalize_answer(pred)) for g in gold)
        _close(M.squad_f1(pred, gold), want)


def test_entity_f1_equals_seqeval():
    seqeval = pytest.importorskip("seqeval.metrics", reason="seqeval is the oracle ([test] extra)")
    rng = np.random.default_rng(11)
    tags = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "I-ORG", "O"]
    for _ in range(300):
        sents_t, sents_p = [], []
        for _ in range(int(rng.integers(1, 4))):
            n = int(rng.integers(1, 8))
            sents_t.append(list(rng.choice(tags, n)))
            sents_p.append(list(rng.choice(tags, n)))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = (seqeval.precision_score(sents_t, sents_p), seqeval.recall_score(sents_t, sents_p),
                   seqeval.f1_score(sents_t, sents_p))
        ours = M.entity_scores(sents_t, sents_p)
        _close([ours["precision"], ours["recall"], ours["f1"]], ref)


def test_get_entities_known_cases():
    assert M.get_entities(["B-PER", "I-PER", "O", "I-LOC", "B-LOC", "I-ORG"]) == [
        ("PER", 0, 1), ("LOC", 3, 3), ("LOC", 4, 4), ("ORG", 5, 5)]
    with pytest.raises(ValueError, match="sentence 0"):
        M.entity_f1([["O", "O"]], [["O"]])
