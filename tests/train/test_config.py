"""Run config: typed --section.key overrides, TOML/YAML files, unknown keys with a suggestion, --help."""
import pytest

from fastllm.models import ConfigError
from fastllm.train.config import all_keys, help_text, parse_args


def test_documented_spellings_and_types():
    cfg = parse_args(["--out", "d", "--train.max_steps", "7", "--train.seed=3", "--checkpoint.every", "2",
                      "--resume", "auto", "--model.preset", "gpt-nano", "--model.dropout", "0.0",
                      "--data.corpus", "x.txt", "--train.batch_size", "16", "--train.micro_batch_size", "4",
                      "--data.whole_word_mask", "true"])
    assert (cfg.out, cfg.train.max_steps, cfg.train.seed, cfg.checkpoint.every, cfg.resume) == ("d", 7, 3, 2, "auto")
    assert (cfg.model.preset, cfg.model.dropout, cfg.data.corpus) == ("gpt-nano", 0.0, "x.txt")
    assert (cfg.train.batch_size, cfg.train.micro_batch_size, cfg.data.whole_word_mask) == (16, 4, True)


def test_unknown_key_suggests_the_closest():
    with pytest.raises(ConfigError, match="did you mean 'train.max_steps'"):
        parse_args(["--train.max_step", "5"])
    with pytest.raises(ConfigError, match="expected int"):
        parse_args(["--train.max_steps", "five"])
    with pytest.raises(ConfigError, match="train.precision"):
        parse_args(["--train.precision", "fp8"])


def test_toml_and_yaml_files_with_cli_precedence(tmp_path):
    (tmp_path / "c.toml").write_text('out = "o"\n[train]\nmax_steps = 9\nseed = 4\n')
    cfg = parse_args(["--config", str(tmp_path / "c.toml"), "--train.seed", "5"])
    assert (cfg.out, cfg.train.max_steps, cfg.train.seed) == ("o", 9, 5)
    (tmp_path / "c.yaml").write_text("optim:\n  lr: 0.01\n  schedule: cosine\n")
    cfg = parse_args(["--config", str(tmp_path / "c.yaml")])
    assert (cfg.optim.lr, cfg.optim.schedule) == (0.01, "cosine")
    (tmp_path / "bad.toml").write_text("[optim]\nlearning_rate = 1.0\n")
    with pytest.raises(ConfigError, match="optim.learning_rate"):
        parse_args(["--config", str(tmp_path / "bad.toml")])


def test_help_lists_every_option_with_doc_and_default():
    text = help_text()
    for key, f in all_keys().items():
        assert f"--{key} " in text and f.metadata["doc"] in text
    assert "[default: 200]" in text


def test_sequence_parallel_needs_tp_and_a_divisible_sequence():
    with pytest.raises(ConfigError, match="parallel.sequence_parallel: needs parallel.tp > 1"):
        parse_args(["--parallel.sequence_parallel", "true"])
    with pytest.raises(ConfigError, match=r"max_seq_length \(130\) divisible by parallel.tp \(4\)"):
        parse_args(["--parallel.sequence_parallel", "true", "--parallel.tp", "4", "--data.max_seq_length", "130"])
    cfg = parse_args(["--parallel.sequence_parallel", "on", "--parallel.tp", "2", "--data.max_seq_length", "64"])
    assert cfg.parallel.sequence_parallel and cfg.parallel.tp == 2
