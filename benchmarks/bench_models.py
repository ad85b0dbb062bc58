"""End-to-end training throughput: fastllm models vs transformers with the same config, weights and inputs.

Times forward + backward (no optimizer step) of BertForPreTraining (bert-small, bert-base; seq 128, 15% masked
tokens + NSP labels) and GPT (gpt2-small, seq 256) against transformers' BertForPreTraining / GPT2LMHeadModel,
fp32 on CPU, both in training mode (dropout 0.1 everywhere, as the presets and HF defaults). Runs alternate
between the two implementations so that machine drift hits both; the ratio is fastllm / transformers
tokens per second in this one run. Peak memory: the max RSS of a fresh subprocess doing one warm-up and one
timed step of one implementation (so it includes the weights, grads and the step's activations).
Times, never asserts. Usage: python benchmarks/bench_models.py [--quick] [--threads 2].
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

CASES = {  # name: (preset, seq, batch, quick batch)
    "bert-small": ("bert-small", 128, 8, 4),
    "bert-base": ("bert-base", 128, 4, 2),
    "gpt2-small": ("gpt2-small", 256, 2, 1),
}


def _bert_pair(preset_name: str, which: str):
    import transformers

    from fastllm.models import BertForPreTraining, preset
    cfg = preset(preset_name)
    ours = BertForPreTraining(cfg).train() if which != "hf" else None
    hf_cfg = transformers.BertConfig(**{k: v for k, v in cfg.to_dict().items() if k not in ("kernels",)})
    theirs = transformers.BertForPreTraining(hf_cfg).train() if which != "fastllm" else None
    return ours, theirs, cfg.vocab_size


def _gpt_pair(preset_name: str, which: str):
    import transformers

    from fastllm.models import GPT, preset
    cfg = preset(preset_name)
    ours = GPT(cfg).train() if which != "hf" else None
    hf_cfg = transformers.GPT2Config(n_embd=cfg.n_embd, n_layer=cfg.n_layer, n_head=cfg.n_head,
                                     vocab_size=cfg.vocab_size, n_positions=cfg.n_positions)
    theirs = transformers.GPT2LMHeadModel(hf_cfg).train() if which != "fastllm" else None
    return ours, theirs, cfg.vocab_size


def build(case: str, quick: bool, which: str = "both"):
    preset_name, seq, batch, quick_batch = CASES[case]
    batch = quick_batch if quick else batch
    ours, theirs, vocab = (_gpt_pair if case.startswith("gpt") else _bert_pair)(preset_name, which)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)  # (B, T)
    if case.startswith("gpt"):
        inputs = {"input_ids": ids, "labels": ids}
    else:
        labels = torch.where(torch.rand(batch, seq, generator=g) < 0.15, ids, torch.full_like(ids, -100))
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids),
                  "labels": labels, "next_sentence_label": torch.randint(0, 2, (batch,), generator=g)}
    return ours, theirs, inputs


def step(model, inputs) -> float:
    start = time.perf_counter()
    model(**inputs).loss.backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def time_pair(ours, theirs, inputs, repeats: int) -> tuple[float, float]:
    step(ours, inputs), step(theirs, inputs)  # warm-up
    t_ours, t_theirs = [], []
    for _ in range(repeats):
        t_ours.append(step(ours, inputs))
        t_theirs.append(step(theirs, inputs))
    return statistics.median(t_ours), statistics.median(t_theirs)


def peak_rss_mib(case: str, which: str, quick: bool, threads: int) -> float:
    """Max RSS (MiB) of a subprocess building one model and stepping it twice."""
    cmd = [sys.executable, __file__, "--_memory", case, which, "--threads", str(threads)] + (["--quick"] if quick else [])
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": "."})
    return json.loads(out.stdout.strip().splitlines()[-1])["rss_mib"]


def _memory_child(case: str, which: str, quick: bool) -> None:
    ours, theirs, inputs = build(case, quick, which)  # only the measured model is built
    model = ours if which == "fastllm" else theirs
    step(model, inputs), step(model, inputs)
    # VmHWM, not getrusage's ru_maxrss: on Linux the latter keeps the parent's RSS from before exec.
    with open("/proc/self/status") as status:
        hwm = next(line for line in status if line.startswith("VmHWM:"))
    print(json.dumps({"rss_mib": int(hwm.split()[1]) / 1024}))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="smaller batches, 2 repeats, bert-small and gpt2-small")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--_memory", nargs=2, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args._memory:
        return _memory_child(*args._memory, args.quick)
    run_table(args)


def run_table(args) -> None:
    cases = ["bert-small", "gpt2-small"] if args.quick else list(CASES)
    repeats = args.repeats or (2 if args.quick else 3)
    print(f"threads {args.threads}, torch {torch.__version__}, fp32, train mode (dropout 0.1), "
          f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '(default malloc)')}, median of {repeats}")
    print(f"{'model':<12} {'B x T':>8} {'fastllm tok/s':>14} {'HF tok/s':>10} {'ratio':>6} "
          f"{'fastllm MiB':>12} {'HF MiB':>8}")
    for case in cases:
        ours, theirs, inputs = build(case, args.quick)
        b, t = inputs["input_ids"].shape
        t_ours, t_theirs = time_pair(ours, theirs, inputs, repeats)
        del ours, theirs
        mem = ("-", "-") if args.no_memory else tuple(
            f"{peak_rss_mib(case, w, args.quick, args.threads):,.0f}" for w in ("fastllm", "hf"))
        print(f"{case:<12} {f'{b}x{t}':>8} {b * t / t_ours:>14,.0f} {b * t / t_theirs:>10,.0f} "
              f"{t_theirs / t_ours:>5.2f}x {mem[0]:>12} {mem[1]:>8}", flush=True)


if __name__ == "__main__":
    main()
