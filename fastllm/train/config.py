"""Typed run configuration of `fastllm.pretrain`: one dataclass per section, a CLI and TOML/YAML loader.

Invariants:
- Every option is a typed dataclass field with a doc string in `metadata["doc"]`; `--help` lists all of them.
- Overrides come as `--section.key value` (or `--section.key=value`), from a TOML/YAML file (`--config`), and
  the CLI wins over the file. An unknown key is a ConfigError that names the closest valid key (difflib).
- Values are parsed to the field's type; a bad value is a ConfigError naming the key.
- No globals: `parse_args(argv)` returns a fresh RunConfig.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from fastllm.models.config import ConfigError


def opt(default, doc: str):
    """A config field with its documentation."""
    return field(default=default, metadata={"doc": doc})


@dataclass
class ModelSection:
    preset: str = opt("bert-tiny", "model preset (fastllm.models.PRESETS): bert-tiny, bert-mini, gpt-nano, ...")
    dropout: float | None = opt(None, "dropout probability for every dropout of the model (None: preset's)")
    vocab_size: int = opt(8000, "vocabulary size of the tokenizer trained on the corpus (sets the model's)")


@dataclass
class DataSection:
    corpus: str = opt("kjv", "built-in name (kjv, wordnet), a local file/folder (.txt/.json/.jsonl/.parquet) "
                             "or a HuggingFace hub dataset name")
    text_field: str = opt("text", "field holding the text in JSON/JSONL/parquet/hub datasets")
    max_seq_length: int = opt(128, "tokens per sequence (special tokens included)")
    mlm_probability: float = opt(0.15, "fraction of tokens selected for MLM (BERT)")
    short_seq_prob: float = opt(0.1, "probability of a shorter target length (BERT)")
    whole_word_mask: bool = opt(False, "mask whole words (all ## pieces of a word together) (BERT)")
    eval_fraction: float = opt(0.02, "fraction of documents held out for evaluation")
    cache_dir: str = opt("~/.cache/fastllm", "where trained tokenizers and tokenized corpora are cached")
    prefetch: int = opt(4, "batches prepared ahead by the background loader thread (0: none)")


@dataclass
class OptimSection:
    lr: float = opt(1e-3, "peak learning rate")
    weight_decay: float = opt(0.01, "AdamW weight decay (never on biases and norms)")
    beta1: float = opt(0.9, "AdamW beta1")
    beta2: float = opt(0.98, "AdamW beta2")
    eps: float = opt(1e-6, "AdamW epsilon")
    warmup_steps: int = opt(30, "linear warm-up steps")
    schedule: str = opt("linear", "decay after warm-up: linear | cosine | constant")
    min_lr_ratio: float = opt(0.0, "final learning rate as a fraction of the peak")
    clip_grad_norm: float = opt(1.0, "gradient clipping max norm (0: off)")


@dataclass
class TrainSection:
    max_steps: int = opt(200, "optimizer steps")
    seed: int = opt(0, "seed of model init, data order, masking and dropout")
    batch_size: int = opt(32, "global sequences per optimizer step")
    micro_batch_size: int = opt(0, "sequences per forward/backward per process (0: batch_size / world size)")
    precision: str = opt("fp32", "fp32 | bf16 (autocast) | fp16 (autocast + dynamic loss scaling)")
    param_dtype: str = opt("fp32", "fp32 | bf16 | fp16: storage of parameters and gradients; bf16/fp16 keep fp32 "
                                   "master weights in the optimizer (sharded under ZeRO); fp16 adds loss scaling")
    activation_checkpointing: bool = opt(False, "recompute each layer's activations in backward")
    device: str = opt("auto", "auto | cpu | cuda")
    stop_at: int = opt(0, "stop (with a checkpoint) after this step, keeping the schedule of max_steps (0: off)")
    eval_every: int = opt(0, "evaluate every N steps (0: only at the end)")
    eval_batches: int = opt(20, "held-out batches per evaluation")
    threads: int = opt(0, "torch CPU threads (0: auto: 1 for models under 20M parameters on CPU, where threads "
                              "cost more than they give on small or shared machines; else torch's default)")
    loss_scale_init: float = opt(2.0 ** 16, "fp16: initial loss scale")
    loss_scale_window: int = opt(200, "fp16: clean steps before the loss scale doubles")


@dataclass
class CheckpointSection:
    every: int = opt(0, "save every N steps (0: only at the end)")
    keep_last: int = opt(3, "checkpoints kept (older ones deleted)")


@dataclass
class LoggingSection:
    every: int = opt(10, "write metrics.jsonl every N steps")
    tensorboard: bool = opt(True, "also log to TensorBoard when it is installed")
    plot: bool = opt(True, "save loss_curve.png at the end (needs matplotlib)")
    progress: bool = opt(True, "show the tqdm progress bar")
    peak_flops: float = opt(0.0, "assumed peak FLOP/s per process for MFU (0: a guess from the device)")


@dataclass
class KernelsSection:
    backend: str = opt("auto", "fastllm.ops backends: auto | cpu | reference | cuda | triton | op=backend,...")


@dataclass
class ParallelSection:
    dp: int = opt(0, "data-parallel degree (0: world size / (tp x pp))")
    tp: int = opt(1, "tensor-parallel degree (Megatron: heads, MLP and vocabulary split)")
    pp: int = opt(1, "pipeline-parallel stages")
    zero: int = opt(0, "ZeRO stage over dp: 0 DDP | 1 optimizer states | 2 + gradients | 3 + parameters")
    pipeline_schedule: str = opt("1f1b", "gpipe | 1f1b")
    sequence_parallel: bool = opt(False, "split LayerNorm/dropout regions along the sequence across tp ranks "
                                         "(needs tp > 1)")
    micro_batches: int = opt(0, "micro-batches per dp rank per step (0: batch_size / (dp x micro_batch_size)); "
                                "sets micro_batch_size when that is 0")


@dataclass
class RunConfig:
    out: str = opt("", "run folder (everything goes there); default runs/<preset>-<timestamp>")
    resume: str = opt("", "auto (newest complete checkpoint in --out) | PATH of a checkpoint | '' (fresh)")
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    kernels: KernelsSection = field(default_factory=KernelsSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> RunConfig:
        cfg = cls()
        apply_overrides(cfg, flatten(data))
        return cfg


SECTIONS = ("model", "data", "optim", "train", "checkpoint", "logging", "kernels", "parallel")


def all_keys(cfg: RunConfig | None = None) -> dict[str, dataclasses.Field]:
    """Every dotted key ("train.max_steps", "out") with its dataclass field."""
    cfg = cfg or RunConfig()
    keys = {f.name: f for f in dataclasses.fields(cfg) if f.name not in SECTIONS}
    for s in SECTIONS:
        for f in dataclasses.fields(getattr(cfg, s)):
            keys[f"{s}.{f.name}"] = f
    return keys


def flatten(data: dict, prefix: str = "") -> dict[str, object]:
    out = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _unknown(key: str, valid) -> ConfigError:
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"unknown config key {key!r}{hint} (see --help)")


def _base_type(tp):
    if isinstance(tp, str):
        tp = eval(tp, {"float": float, "int": int, "str": str, "bool": bool, "None": type(None)})
    args = [a for a in typing.get_args(tp) if a is not type(None)] if isinstance(tp, types.UnionType) else [tp]
    return args[0], isinstance(tp, types.UnionType)


def convert(key: str, f: dataclasses.Field, value):
    """Parses `value` (a string from the CLI or a typed value from a file) to the field's type."""
    tp, optional = _base_type(f.type)
    if optional and (value is None or (isinstance(value, str) and value.lower() in ("none", "null"))):
        return None
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("1", "true", "yes", "on"):
                return True
            if str(value).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if tp is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        return tp(float(value)) if tp is int and isinstance(value, str) and "e" in value.lower() else tp(value)
    except (TypeError, ValueError):
        raise ConfigError(f"--{key}: expected {tp.__name__}, got {value!r}") from None


def apply_overrides(cfg: RunConfig, flat: dict[str, object]) -> None:
    keys = all_keys(cfg)
    for key, value in flat.items():
        if key not in keys:
            raise _unknown(key, keys)
        parts = key.split(".")
        target = cfg if len(parts) == 1 else getattr(cfg, parts[0])
        setattr(target, parts[-1], convert(key, keys[key], value))


def load_file(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--config: file not found: {p}")
    if p.suffix == ".toml":
        import tomllib
        return tomllib.loads(p.read_text())
    if p.suffix in (".yaml", ".yml"):
        import yaml  # lazy: only for YAML configs
        return yaml.safe_load(p.read_text()) or {}
    if p.suffix == ".json":
        return json.loads(p.read_text())
    raise ConfigError(f"--config: {p} must be .toml, .yaml/.yml or .json")


def help_text(prog: str = "python -m fastllm.pretrain") -> str:
    lines = [f"usage: {prog} [--config FILE.toml|yaml] [--section.key VALUE ...]", "", "options:",
             "  --help                 this message", ("  --config FILE          TOML/YAML/JSON file of options "
             "(CLI overrides it)")]
    for key, f in all_keys().items():
        default = f.default if f.default is not dataclasses.MISSING else None
        lines.append(f"  --{key:<28} {f.metadata.get('doc', '')} [default: {default!r}]")
    return "\n".join(lines)


def _cli_pairs(argv: list[str]) -> tuple[str | None, list[tuple[str, str]]]:
    pairs, config_file, i = [], None, 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}: options are --section.key VALUE (see --help)")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(argv):
                raise ConfigError(f"--{key} needs a value")
            value, i = argv[i + 1], i + 1
        if key == "config":
            config_file = value
        else:
            pairs.append((key, value))
        i += 1
    return config_file, pairs


def parse_args(argv: list[str]) -> RunConfig:
    """RunConfig from argv (without the program name). Raises ConfigError; `--help` is handled by the caller."""
    config_file, pairs = _cli_pairs(argv)
    cfg = RunConfig()
    if config_file:
        apply_overrides(cfg, flatten(load_file(config_file)))
    keys = all_keys(cfg)
    for key, _ in pairs:
        if key not in keys:
            raise _unknown(key, keys)
    apply_overrides(cfg, dict(pairs))
    validate(cfg)
    return cfg


def validate(cfg: RunConfig) -> None:
    t, o, d = cfg.train, cfg.optim, cfg.data
    checks = [
        (t.max_steps > 0, "train.max_steps", "must be > 0"), (t.batch_size > 0, "train.batch_size", "must be > 0"),
        (t.micro_batch_size >= 0, "train.micro_batch_size", "must be >= 0"),
        (t.precision in ("fp32", "bf16", "fp16"), "train.precision", "must be fp32, bf16 or fp16"),
        (t.param_dtype in ("fp32", "bf16", "fp16"), "train.param_dtype", "must be fp32, bf16 or fp16"),
        (o.schedule in ("linear", "cosine", "constant"), "optim.schedule", "must be linear, cosine or constant"),
        (o.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0"), (o.lr > 0, "optim.lr", "must be > 0"),
        (0 < d.mlm_probability < 1, "data.mlm_probability", "must be in (0, 1)"),
        (0 <= d.eval_fraction < 1, "data.eval_fraction", "must be in [0, 1)"),
        (d.max_seq_length >= 8, "data.max_seq_length", "must be >= 8"),
        (cfg.checkpoint.keep_last >= 1, "checkpoint.keep_last", "must be >= 1"),
        (cfg.model.dropout is None or 0 <= cfg.model.dropout < 1, "model.dropout", "must be in [0, 1)"),
        *_parallel_checks(cfg.parallel),
        (not cfg.parallel.sequence_parallel or d.max_seq_length % cfg.parallel.tp == 0, "parallel.sequence_parallel",
         f"needs data.max_seq_length ({d.max_seq_length}) divisible by parallel.tp ({cfg.parallel.tp})"),
    ]
    for ok, key, rule in checks:
        if not ok:
            raise ConfigError(f"--{key}: {rule}")


def _parallel_checks(p: ParallelSection) -> list[tuple[bool, str, str]]:
    return [(p.dp >= 0, "parallel.dp", "must be >= 0 (0: the rest of the world)"),
            (p.tp >= 1, "parallel.tp", "must be >= 1"), (p.pp >= 1, "parallel.pp", "must be >= 1"),
            (p.zero in (0, 1, 2, 3), "parallel.zero", "must be 0, 1, 2 or 3"),
            (p.pipeline_schedule in ("gpipe", "1f1b"), "parallel.pipeline_schedule", "must be gpipe or 1f1b"),
            (p.micro_batches >= 0, "parallel.micro_batches", "must be >= 0"),
            (not p.sequence_parallel or p.tp > 1, "parallel.sequence_parallel", "needs parallel.tp > 1")]
