"""End-to-end training throughput: fastllm models vs transformers with the same config, weights and inputs.

Times forward + backward (no optimizer step) of BertForPreTraining (bert-small, bert-base; seq 128, 15% masked
tokens + NSP labels) and GPT (gpt2-small, seq 256) against transformers' BertForPreTraining / GPT2LMHeadModel,
fp32 on CPU, both in training mode (dropout 0.1 everywhere, as the presets and HF defaults), each followed by
zero_grad(set_to_none=True) as optimizer.zero_grad() does.

Each implementation runs in its own subprocess: it builds the model, takes one warm-up step, times `repeats`
steps and reports them with its peak RSS (VmHWM: weights, grads and a step's activations). Two models stepping
in one process share one malloc heap, and memory that one keeps (fastllm's reused gradient buffers) or returns
changes how much of the other's allocations fault in fresh pages; measured that way, HF's bert-base step was
1.66 s next to the old fastllm code and 1.90 s next to the new. The parent alternates fastllm and HF
subprocesses for `rounds` rounds, so that machine drift hits both; the ratio is HF's median step time over
fastllm's, over all timed steps of this one run. Times, never asserts.
Usage: python benchmarks/bench_models.py [--quick] [--threads 2] [--repeats N] [--rounds R].
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


def run_child(case: str, which: str, quick: bool, threads: int, repeats: int) -> dict:
    """Step times (s) and peak RSS (MiB) of a subprocess that builds one model and times `repeats` steps."""
    cmd = [sys.executable, __file__, "--_child", case, which, "--threads", str(threads), "--repeats", str(repeats)]
    out = subprocess.run(cmd + (["--quick"] if quick else []), check=True, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": "."})
    return json.loads(out.stdout.strip().splitlines()[-1])


def _child(case: str, which: str, quick: bool, repeats: int) -> None:
    ours, theirs, inputs = build(case, quick, which)  # only the measured model is built
    model = ours if which == "fastllm" else theirs
    step(model, inputs)  # warm-up
    times = [step(model, inputs) for _ in range(repeats)]
    # VmHWM, not getrusage's ru_maxrss: on Linux the latter keeps the parent's RSS from before exec.
    with open("/proc/self/status") as status:
        hwm = next(line for line in status if line.startswith("VmHWM:"))
    print(json.dumps({"times": times, "rss_mib": int(hwm.split()[1]) / 1024}))


def measure(case: str, args, repeats: int, rounds: int) -> dict[str, tuple[float, float]]:
    """{which: (median step s, max peak RSS MiB)}, fastllm and HF subprocesses alternating for `rounds` rounds."""
    times, rss = {"fastllm": [], "hf": []}, {"fastllm": 0.0, "hf": 0.0}
    for _ in range(rounds):
        for which in ("fastllm", "hf"):
            res = run_child(case, which, args.quick, args.threads, repeats)
            times[which] += res["times"]
            rss[which] = max(rss[which], res["rss_mib"])
    return {w: (statistics.median(times[w]), rss[w]) for w in times}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="smaller batches, 2 repeats, bert-small and gpt2-small")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--rounds", type=int, default=None, help="fastllm/HF subprocess pairs per case (default 2)")
    p.add_argument("--_child", nargs=2, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args._child:
        return _child(*args._child, args.quick, args.repeats)
    run_table(args)


def run_table(args) -> None:
    cases = ["bert-small", "gpt2-small"] if args.quick else list(CASES)
    repeats = args.repeats or (2 if args.quick else 3)
    rounds = args.rounds or (1 if args.quick else 2)
    print(f"threads {args.threads}, torch {torch.__version__}, fp32, train mode (dropout 0.1), "
          f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '(default malloc)')}, one process per model, "
          f"median of {rounds} x {repeats} steps")
    print(f"{'model':<12} {'B x T':>8} {'fastllm tok/s':>14} {'HF tok/s':>10} {'ratio':>6} "
          f"{'fastllm MiB':>12} {'HF MiB':>8}")
    for case in cases:
        _, seq, batch, quick_batch = CASES[case]
        b = quick_batch if args.quick else batch
        res = measure(case, args, repeats, rounds)
        (t_ours, m_ours), (t_theirs, m_theirs) = res["fastllm"], res["hf"]
        print(f"{case:<12} {f'{b}x{seq}':>8} {b * seq / t_ours:>14,.0f} {b * seq / t_theirs:>10,.0f} "
              f"{t_theirs / t_ours:>5.2f}x {m_ours:>12,.0f} {m_theirs:>8,.0f}", flush=True)


if __name__ == "__main__":
    main()
