"""End to end through fastllm.pretrain.run on the KJV (tiny settings): loss falls for BERT and GPT; resume is
bit-exact (fp32 with dropout and accumulation, and bf16 autocast); bad input gives clear errors and writes nothing."""
import pytest
import torch
from safetensors.torch import load_file

from fastllm.pretrain import RunError, main, run
from fastllm.train import checkpoint as ck
from fastllm.train.config import parse_args


@pytest.fixture(scope="session")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


def _cfg(out, cache, *extra):
    return parse_args(_argv(out, cache, *extra))


def _argv(out, cache, *extra):
    return ["--out", str(out), "--data.cache_dir", cache, "--data.max_seq_length", "32", "--model.vocab_size", "1000",
            "--train.batch_size", "8", "--optim.warmup_steps", "5", "--logging.plot", "false",
            "--logging.tensorboard", "false", "--logging.progress", "false", "--logging.every", "1",
            "--train.eval_batches", "2", *extra]


@pytest.mark.parametrize("preset", ["bert-tiny", "gpt-nano"])
def test_loss_falls(tmp_path, cache, preset):
    s = run(_cfg(tmp_path, cache, "--model.preset", preset, "--train.max_steps", "30", "--optim.lr", "3e-3"))
    first, last = s["losses"][0], sum(s["losses"][-5:]) / 5
    assert last < first - 0.5, (first, last)
    assert s["checkpoint"].name == "step-00000030" and (tmp_path / "eval.json").is_file()
    rows = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 30 and all(k in rows[0] for k in ("tokens_per_s", "mfu", "grad_norm", "skipped_steps"))
    assert {"loss", "accuracy", "perplexity"} <= set(s["eval"]) and ("nsp_accuracy" in s["eval"]) == (preset[0] == "b")
    _model, tok, cfg = ck.load_pretrained(tmp_path)
    assert cfg.vocab_size == tok.vocab_size


def _state(ckpt):
    return load_file(str(ckpt / "model.safetensors")), load_file(str(ckpt / "shards" / "pp0-tp0.safetensors"))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_resume_is_bit_exact(tmp_path, cache, precision):
    args = ("--train.max_steps", "20", "--train.micro_batch_size", "4", "--model.dropout", "0.1",
            "--train.precision", precision, "--checkpoint.keep_last", "5")
    full = run(_cfg(tmp_path / "a", cache, *args))
    first = run(_cfg(tmp_path / "b", cache, *args, "--train.stop_at", "10"))
    assert len(first["losses"]) == 10 and first["checkpoint"].name == "step-00000010"
    second = run(_cfg(tmp_path / "b", cache, *args, "--resume", "auto"))
    assert second["losses"] == full["losses"][10:]  # bitwise: float equality of every step's loss
    (wa, oa), (wb, ob) = _state(full["checkpoint"]), _state(second["checkpoint"])
    assert all(torch.equal(wa[k], wb[k]) for k in wa) and wa.keys() == wb.keys()
    assert oa.keys() == ob.keys() and any(k.startswith("exp_avg_sq/") for k in oa)
    assert all(torch.equal(oa[k], ob[k]) for k in oa)  # parameters and AdamW moments
    assert ck.load_state(full["checkpoint"], "sampler.pt") == ck.load_state(second["checkpoint"], "sampler.pt")
    assert full["eval"] == second["eval"]


def test_bad_inputs_are_clear_errors_and_write_nothing(tmp_path, cache):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("one line\nanother line\n\nthird\n")
    cases = [(["--data.corpus", str(empty)], "empty"), (["--data.corpus", str(tmp_path / "no.txt")], "not found"),
             (["--data.corpus", str(tiny)], "fewer than one batch"), (["--model.preset", "bert-huge"], "unknown preset"),
             (["--model.preset", "gpt-nano", "--data.max_seq_length", "512"], "exceeds the model's 128 positions"),
             (["--parallel.tp", "2"], "does not equal the world size 1"),
             (["--train.micro_batch_size", "3"], "cannot be split into micro-batches of 3")]
    for extra, message in cases:
        with pytest.raises(RunError, match=message):
            run(_cfg(tmp_path / "out", cache, *extra))
        assert not (tmp_path / "out").exists()


def test_existing_run_and_foreign_checkpoint_are_refused(tmp_path, cache, capsys):
    s = run(_cfg(tmp_path / "r", cache, "--train.max_steps", "2"))
    before = sorted(p.name for p in (tmp_path / "r").rglob("*"))
    with pytest.raises(RunError, match="already holds checkpoints"):
        run(_cfg(tmp_path / "r", cache, "--train.max_steps", "4"))
    with pytest.raises(RunError, match="another model config.*hidden_size"):
        run(_cfg(tmp_path / "r2", cache, "--model.preset", "bert-mini", "--resume", str(s["checkpoint"]),
                 "--train.max_steps", "4"))
    assert sorted(p.name for p in (tmp_path / "r").rglob("*")) == before and not (tmp_path / "r2").exists()
    assert main(["--model.preset", "nope", "--out", str(tmp_path / "x")]) == 2
    assert "unknown preset 'nope'" in capsys.readouterr().err
    assert main(["--help"]) == 0 and "--train.micro_batch_size" in capsys.readouterr().out


def _torchrun(n, args):
    import os
    import subprocess
    import sys
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "-m", "fastllm.pretrain"]
    res = subprocess.run([*cmd, *args], check=False, env=env, timeout=300, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]


def _losses(out):
    import json
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
            if "eval_loss" not in line]


def test_torchrun_two_processes_match_one(tmp_path, cache):
    """dp=2 with ZeRO-2 gives one process's losses (global-batch weighting of the MLM loss), and its sharded
    checkpoint resumes in one process (resharded dp=2 -> dp=1): the next losses equal the uninterrupted run's."""
    common = ("--train.max_steps", "6", "--model.dropout", "0.0", "--train.micro_batch_size", "2")
    _torchrun(2, _argv(tmp_path / "two", cache, *common, "--parallel.zero", "2", "--train.stop_at", "4"))
    one = run(_cfg(tmp_path / "one", cache, *common))
    # fp32: the layouts differ only in summation order (~1e-7 relative per op; see tests/parallel)
    assert _losses(tmp_path / "two") == pytest.approx(one["losses"][:4], rel=1e-5)
    resumed = run(_cfg(tmp_path / "two", cache, *common, "--resume", "auto"))
    assert resumed["losses"] == pytest.approx(one["losses"][4:], rel=1e-5)
    assert resumed["eval"]["loss"] == pytest.approx(one["eval"]["loss"], rel=1e-5)


def test_torchrun_tensor_and_pipeline_parallel(tmp_path, cache):
    """GPT at tp=2 with sequence parallelism and BERT at pp=2 (1F1B, 4 micro-batches) follow the single-process
    losses."""
    for preset, layout in (("gpt-nano", ("--parallel.tp", "2", "--parallel.sequence_parallel", "true")),
                           ("bert-tiny", ("--parallel.pp", "2", "--parallel.micro_batches", "4"))):
        common = ("--model.preset", preset, "--train.max_steps", "4", "--model.dropout", "0.0")
        _torchrun(2, _argv(tmp_path / preset, cache, *common, *layout))
        one = run(_cfg(tmp_path / f"{preset}-one", cache, *common))
        assert _losses(tmp_path / preset) == pytest.approx(one["losses"], rel=1e-5), preset


def test_bf16_parameters_keep_fp32_masters_across_resume(tmp_path, cache):
    """--train.param_dtype bf16 (ZeRO-1 flat masters): the checkpoint holds the fp32 masters, model.safetensors is
    the fp32 master model, and a resumed run repeats the uninterrupted one exactly."""
    args = ("--train.max_steps", "8", "--train.param_dtype", "bf16", "--parallel.zero", "1", "--model.dropout", "0")
    full = run(_cfg(tmp_path / "a", cache, *args))
    run(_cfg(tmp_path / "b", cache, *args, "--train.stop_at", "4"))
    second = run(_cfg(tmp_path / "b", cache, *args, "--resume", "auto"))
    assert second["losses"] == full["losses"][4:]
    model, shards = _state(full["checkpoint"])
    masters = {k.split("/", 1)[1]: v for k, v in shards.items() if k.startswith("master/")}
    assert masters and all(v.dtype == torch.float32 for v in masters.values())
    assert all(shards[f"param/{n}"].dtype == torch.bfloat16 for n in masters)
    assert sum(n in model for n in masters) > 10
    assert all(torch.equal(model[n], masters[n]) for n in masters if n in model)
