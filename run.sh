#!/usr/bin/env bash
# The main job: the toy pipeline. Toy base (shipped in toy/base) -> thinking SFT (sft_think.py)
# -> GRPO with verifiable rewards from the SFT adapter (grpo.py), then a table of the held-out
# metric before and after each stage. Installs into ./.venv first if needed. About 11 minutes
# on a 2-core CPU. Runs go to ./runs (override with RUNS=dir).
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh
PY=.venv/bin/python
RUNS=${RUNS:-runs}
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
$PY sft_think.py --out "$RUNS/sft_think"
$PY grpo.py --init-adapter "$RUNS/sft_think" --out "$RUNS/grpo"
echo
$PY scripts/results_table.py "$RUNS/sft_think" "$RUNS/grpo"
