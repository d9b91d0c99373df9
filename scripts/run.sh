#!/usr/bin/env bash
# Sets up .venv if needed, then streams text from the default model (SmolLM2-135M-Instruct).
# Extra arguments go to `python -m mlxq.generate`, e.g. --kv-bits 4 --prompt "Hello".
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m mlxq.generate "$@"
