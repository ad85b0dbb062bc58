"""GLUE loaders on fixture files in the official formats, task metrics, scores and submission files."""
import json
import logging
from pathlib import Path

import pytest

from fastllm.eval import glue
from fastllm.eval import metrics as M

DATA = Path(__file__).parent / "data" / "glue"


def test_nine_tasks_and_their_metrics():
    assert sorted(glue.TASKS) == ["cola", "mnli", "mrpc", "qnli", "qqp", "rte", "sst2", "stsb", "wnli"]
    want = {"cola": ("mcc",), "sst2": ("accuracy",), "mrpc": ("f1", "accuracy"), "stsb": ("pearson", "spearman"),
            "qqp": ("f1", "accuracy"), "mnli": ("accuracy",), "qnli": ("accuracy",), "rte": ("accuracy",),
            "wnli": ("accuracy",)}
    assert {k: t.metrics for k, t in glue.TASKS.items()} == want
    assert glue.get_task("SST-2") is glue.TASKS["sst2"] and glue.get_task("STS-B").is_regression
    assert glue.TASKS["mnli"].num_labels == 3 and glue.TASKS["stsb"].num_labels == 1
    with pytest.raises(ValueError, match="unknown GLUE task 'foo'"):
        glue.get_task("foo")


def test_cola_headerless_train_and_headed_test():
    train = glue.load_tsv(DATA, "cola", "train")
    assert [e.label for e in train] == [1, 0, 1]
    assert train[0].text_a.startswith("Our friends won't") and train[0].text_b is None
    test = glue.load_tsv(DATA, "cola", "test")
    assert [(e.guid, e.label) for e in test] == [("0", None), ("1", None)]


def test_quote_none_keeps_quotes_mrpc():
    ex = glue.load_tsv(DATA, "mrpc", "train")[0]
    assert ex.label == 1 and '" the witness "' in ex.text_a and ex.text_b.startswith("Referring")
    assert glue.load_tsv(DATA / "MRPC", "mrpc", "test")[0].guid == "0"  # the task folder itself also works


def test_stsb_scores_and_qqp_malformed_rows(caplog):
    dev = glue.load_tsv(DATA, "stsb", "dev")
    assert [e.label for e in dev] == [5.0, 4.75, 0.2] and dev[1].text_b == "A child is riding a horse."
    assert glue.load_tsv(DATA, "stsb", "test")[0].label is None
    with caplog.at_level(logging.WARNING, logger="fastllm"):
        qqp = glue.load_tsv(DATA, "qqp", "train")
    assert [e.label for e in qqp] == [0, 1] and "skipped 1 QQP rows" in caplog.text
    assert glue.load_tsv(DATA, "qqp", "test")[0].text_b.startswith("Find the remainder")


def test_mnli_two_dev_sets_and_labels():
    task = glue.TASKS["mnli"]
    assert [e.label for e in glue.load_tsv(DATA, task, "train")] == [1, 0]  # neutral, entailment
    m = glue.load_tsv(DATA, task, "dev_matched")
    assert [task.label_values[e.label] for e in m] == ["neutral", "contradiction"]
    assert len(glue.load_tsv(DATA, task, "dev_mismatched")) == 1
    assert glue.load_tsv(DATA, task, "test_mismatched")[0].text_b == "We have no system."
    with pytest.raises(ValueError, match="no split 'dev'"):
        glue.load_tsv(DATA, task, "dev")


@pytest.mark.parametrize("name,labels", [("qnli", [1, 1]), ("rte", [1, 0]), ("wnli", [1, 1]), ("sst2", [0, 0, 1])])
def test_pair_and_single_tasks(name, labels):
    assert [e.label for e in glue.load_tsv(DATA, name, "train")] == labels
    assert all(e.label is None for e in glue.load_tsv(DATA, name, "test"))


def test_diagnostic_ax():
    ax = glue.load_tsv(DATA, "ax", "test")
    assert [e.guid for e in ax] == ["0", "1"] and ax[0].text_b == "The cat did not sit on the mat."


def test_bad_files_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="SST-2.*train.tsv"):
        glue.load_tsv(tmp_path, "sst2", "train")
    (tmp_path / "SST-2").mkdir()
    (tmp_path / "SST-2" / "train.tsv").write_text("text\tlabel\nfine\t1\n")
    with pytest.raises(ValueError, match="column 'sentence' not found"):
        glue.load_tsv(tmp_path, "sst2", "train")
    (tmp_path / "SST-2" / "train.tsv").write_text("sentence\tlabel\nfine\t1\nbad\tpositive\n")
    with pytest.raises(ValueError, match=r"train.tsv:3: label 'positive' is not in the SST-2 label set"):
        glue.load_tsv(tmp_path, "sst2", "train")
    (tmp_path / "SST-2" / "train.tsv").write_text("sentence\tlabel\nshort row\n")
    with pytest.raises(ValueError, match="train.tsv:2: row has 1 fields"):
        glue.load_tsv(tmp_path, "sst2", "train")


def test_local_csv_and_json_with_column_mapping(tmp_path):
    csv_path = tmp_path / "d.csv"
    csv_path.write_text('review,stars\n"good, really",1\nbad,0\n')
    ex = glue.load_local(csv_path, "sst2", {"text_a": "review", "label": "stars"})
    assert [(e.text_a, e.label) for e in ex] == [("good, really", 1), ("bad", 0)]
    js = tmp_path / "d.json"
    js.write_text(json.dumps([{"p": "a", "h": "b", "y": 2}, {"p": "c", "h": "d", "y": "entailment"}]))
    ex = glue.load_local(js, "mnli", {"text_a": "p", "text_b": "h", "label": "y"})
    assert [e.label for e in ex] == [2, 0]
    with pytest.raises(ValueError, match="column 'hyp'"):
        glue.load_local(js, "mnli", {"text_a": "p", "text_b": "hyp", "label": "y"})
    with pytest.raises(ValueError, match="needs 'text_b'"):
        glue.load_local(js, "mnli", {"text_a": "p", "label": "y"})
    js.write_text(json.dumps([{"p": "a", "h": "b", "y": 7}]))
    with pytest.raises(ValueError, match="label 7 is not in the MNLI label set"):
        glue.load_local(js, "mnli", {"text_a": "p", "text_b": "h", "label": "y"})


def test_compute_metrics_use_the_official_metric():
    y, p = [0, 1, 1, 0, 1], [0, 1, 0, 0, 1]
    assert glue.compute_metrics("cola", p, y) == {"mcc": M.matthews_corrcoef(y, p)}
    assert glue.compute_metrics("mrpc", p, y) == {"f1": M.f1(y, p), "accuracy": 0.8}
    s = glue.compute_metrics("stsb", [0.1, 2.0, 3.5], [0.0, 2.5, 4.0])
    assert set(s) == {"pearson", "spearman"} and s["spearman"] == pytest.approx(1.0, abs=1e-12)


def test_glue_average_follows_leaderboard():
    res = {"mrpc": {"dev": {"f1": 0.9, "accuracy": 0.8}}, "cola": {"dev": {"mcc": 0.5}},
           "mnli": {"dev_matched": {"accuracy": 0.8}, "dev_mismatched": {"accuracy": 0.7}}}
    entries = glue.leaderboard_entries(res)
    assert entries == pytest.approx({"MRPC": 85.0, "CoLA": 50.0, "MNLI-m": 80.0, "MNLI-mm": 70.0})
    assert glue.glue_average(res) == pytest.approx((85 + 50 + 80 + 70) / 4)


def test_submission_files(tmp_path):
    names = {}
    for name in glue.TASKS:
        task = glue.TASKS[name]
        for split in task.test_splits:
            ex = glue.load_tsv(DATA, task, split)
            preds = [0.0 if task.is_regression else task.num_labels - 1 for _ in ex]
            names[(name, split)] = glue.write_submission(tmp_path, task, split, [e.guid for e in ex], preds).name
    names["ax"] = glue.write_submission(tmp_path, "ax", "test", ["0", "1"], [0, 2]).name
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["CoLA.tsv", "SST-2.tsv", "MRPC.tsv", "STS-B.tsv", "QQP.tsv", "MNLI-m.tsv", "MNLI-mm.tsv", "QNLI.tsv",
         "RTE.tsv", "WNLI.tsv", "AX.tsv"])
    assert (tmp_path / "MNLI-mm.tsv").read_text() == "index\tprediction\n0\tcontradiction\n"
    assert (tmp_path / "RTE.tsv").read_text() == "index\tprediction\n0\tnot_entailment\n"
    assert (tmp_path / "CoLA.tsv").read_text() == "index\tprediction\n0\t1\n1\t1\n"
    assert (tmp_path / "STS-B.tsv").read_text() == "index\tprediction\n0\t0.000\n"
    assert (tmp_path / "AX.tsv").read_text() == "index\tprediction\n0\tentailment\n1\tcontradiction\n"
