"""The C++ core: default backend, Unicode tables, pre-tokenizers and normalizer against the Python reference,
and the pure-Python fallback when the core cannot be imported."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import unicodedata
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastllm.tokenizers import WordPieceTokenizer, _native
from fastllm.tokenizers._gen_unicode_tables import HEADER, _flags, render
from fastllm.tokenizers.normalization import NormalizerConfig, normalize
from fastllm.tokenizers.pretokenize import GPT2_PATTERN, bert_spans, gpt2_spans
from tests.tokenizers.conftest import SNIPPETS, require, require_core

ROOT = Path(__file__).resolve().parents[2]
text_strategy = st.text(max_size=50) | st.lists(
    st.sampled_from(list(" \n\t'sdtrevmlaZ1.中😀é\u0301\u00a0İΣ\x00\u200b") + ["'s", "'ll", "  "]),
    max_size=30,
).map("".join)
# the regex module knows newer Unicode than this Python: compare on code points assigned here
assigned_text = text_strategy.map(lambda t: "".join("?" if unicodedata.category(c) == "Cn" else c for c in t))


def test_core_is_the_default_backend():
    require_core()
    assert WordPieceTokenizer({"[UNK]": 0, "a": 1}).backend == "core"


def test_core_imports_without_torch():
    """The core is a plain pybind11 module: importing it must not need torch's shared libraries."""
    core = require_core()
    code = textwrap.dedent(f"""
        import importlib.util, sys
        spec = importlib.util.spec_from_file_location("fastllm.tokenizers._core", {core.__file__!r})
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)  # the .so alone: no fastllm package, no torch
        assert "torch" not in sys.modules
        print(module.UNICODE_VERSION)
    """)
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert run.returncode == 0, (
        f"{core.__file__} needs torch's libraries (link it without them):\n{run.stderr}"
    )


def _same_unicode_version(core) -> None:
    if core.UNICODE_VERSION != unicodedata.unidata_version:
        pytest.skip(
            f"unicode_tables.h is Unicode {core.UNICODE_VERSION}, this Python has "
            f"{unicodedata.unidata_version}; regenerate: python -m fastllm.tokenizers._gen_unicode_tables"
        )


def test_generated_header_is_up_to_date():
    _same_unicode_version(require_core())
    assert HEADER.read_text(encoding="utf-8") == render(), (
        "run python -m fastllm.tokenizers._gen_unicode_tables"
    )


def test_core_character_flags_equal_python():
    core = require_core()
    _same_unicode_version(core)
    checked = [*range(0, 0x30000, 1), *range(0xE0000, 0xE0200), 0x10FFFF]
    bad = [cp for cp in checked if not 0xD800 <= cp < 0xE000 and core.char_flags(cp) != _flags(cp)]
    assert bad == []


@settings(max_examples=300, derandomize=True, deadline=None)
@given(text=assigned_text)
def test_gpt2_scanner_equals_regex(text):
    regex = require("regex")
    expected = [m.span() for m in regex.finditer(GPT2_PATTERN, text)]
    assert gpt2_spans(text) == expected
    core = _native.load_core()
    if core is not None and core.UNICODE_VERSION == unicodedata.unidata_version:
        assert core.gpt2_spans(text) == expected


@pytest.mark.parametrize(
    "config",
    [
        NormalizerConfig(),
        NormalizerConfig(lowercase=False),
        NormalizerConfig(False, False, True, False),
        NormalizerConfig(strip_accents=False),
    ],
)
@settings(max_examples=200, derandomize=True, deadline=None)
@given(text=text_strategy)
def test_normalizer_and_bert_split_equal_python(config, text):
    core = require_core()
    _same_unicode_version(core)
    norm, align = normalize(text, config)
    got = core.bert_normalize(
        text, config.clean_text, config.handle_chinese_chars, config.do_strip_accents, config.lowercase
    )
    assert got == (norm, align)
    assert core.bert_spans(norm) == bert_spans(norm)


def test_normalizer_equals_python_on_every_code_point():
    core = require_core()
    _same_unicode_version(core)
    for config in (NormalizerConfig(), NormalizerConfig(lowercase=False)):
        flags = (config.clean_text, config.handle_chinese_chars, config.do_strip_accents, config.lowercase)
        bad = [
            hex(cp)
            for cp in range(0x30000)
            if not 0xD800 <= cp < 0xE000
            and core.bert_normalize(chr(cp), *flags) != normalize(chr(cp), config)
        ]
        assert bad == []


def test_normalizer_matches_huggingface_on_every_assigned_code_point():
    """Per code point, against HuggingFace's BertNormalizer, except the code points whose Unicode data differs
    (HuggingFace uses older tables for control/punctuation/marks: characters assigned after Unicode 10)."""
    tk = require("tokenizers")
    core = require_core()
    _same_unicode_version(core)
    hf = tk.normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=True
    )
    cps = [cp for cp in range(0x30000) if unicodedata.category(chr(cp)) not in ("Cn", "Cs")]
    differ = [cp for cp in cps if core.bert_normalize(chr(cp))[0] != hf.normalize_str(chr(cp))]
    assert len(differ) < 450 and {unicodedata.category(chr(cp)) for cp in differ} <= {"Mn", "Mc", "Cf"}, [
        hex(cp) for cp in differ[:20]
    ]


def test_canonical_ordering_and_offsets_of_expansions():
    core = require_core()
    text = "a\U0001d16d\U0001d165 İx Ω\u0345\u0301"  # combining classes 226, 216 then 240, 230
    for lowercase, strip in ((True, True), (True, False), (False, True)):
        config = NormalizerConfig(True, True, strip, lowercase)
        assert core.bert_normalize(text, True, True, strip, lowercase) == normalize(text, config)
    tok = WordPieceTokenizer({"[UNK]": 0, "i": 1, "##\u0307": 2, "x": 3, "##x": 4}, strip_accents=False)
    for backend in ("core", "python"):
        tok = WordPieceTokenizer(tok.get_vocab(), strip_accents=False, backend=backend)
        enc = tok.encode("İx", add_special_tokens=False)
        assert enc.tokens == ["i", "##\u0307", "##x"] and enc.offsets == [(0, 1), (0, 1), (1, 2)]


FALLBACK = textwrap.dedent("""
    import sys
    class Block:
        def find_spec(self, name, path=None, target=None):
            if name == "fastllm.tokenizers._core":
                raise ImportError("blocked for the test")
    sys.meta_path.insert(0, Block())
    from fastllm.tokenizers import ByteLevelBPETokenizer, WordPieceTokenizer, _native
    assert _native.load_core() is None
    tok = WordPieceTokenizer().train(["hello world, hello there"], 60, min_frequency=1, show_progress=False)
    assert tok.backend == "python", tok.backend
    assert tok.encode("hello world").tokens == ["[CLS]", "hello", "world", "[SEP]"]
    try:
        WordPieceTokenizer(tok.get_vocab(), backend="core")
    except ImportError as err:
        assert "blocked for the test" in str(err)
    else:
        raise AssertionError("backend='core' must fail without the core")
    print("fallback ok")
""")


def test_python_fallback_without_core():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    run = subprocess.run(
        [sys.executable, "-c", FALLBACK], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert run.returncode == 0 and run.stdout.strip() == "fallback ok", run.stderr
    assert "slow pure-Python backend" in run.stderr  # the one warning


def test_snippets_cover_the_hard_cases():
    """The mixed test corpus really holds what the exactness tests claim to cover."""
    joined = "".join(SNIPPETS)
    categories = {unicodedata.category(c)[0] for c in joined}
    assert {"L", "N", "P", "S", "Z", "M", "C"} <= categories
    assert any(0x4E00 <= ord(c) <= 0x9FFF for c in joined) and any(ord(c) > 0xFFFF for c in joined)
    assert "    " in joined and "\n\n" in joined and "'s" in joined
