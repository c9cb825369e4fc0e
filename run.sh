#!/usr/bin/env bash
# The main job: the toy study (scripts/study.py). Every method of the repo on the toy world, chained as the model
# card Jarrodbarnes/qwen3-0.6B-interleaved-thinking chains its study: online DPO on documents (Phase 3), raw and
# thinking SFT on the base and on the Phase-3 model, RLMT from both thinking arms, the reward gate and the reasoning
# evaluation over the four arms, then GRPO (verifiable, continuation), GKD and the Karcher merge; then the tables.
# About 23 minutes on a 2-core CPU, after the install into ./.venv. Runs go to ./runs/study (RUNS=dir to move them).
#   bash run.sh          the whole study
#   bash run.sh quick    thinking SFT on the toy world alone (about 3 minutes): the first command to try
#   bash run.sh tour     the short tour: thinking SFT, then GRPO from its adapter (about 11 minutes)
#   bash run.sh real     the real-model tour: thinking SFT, then GRPO, on SmolLM2-135M-Instruct (offline)
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
case "${1:-study}" in
  study) exec .venv/bin/python scripts/study.py --runs "${RUNS:-runs}/study" ;;
  quick) exec .venv/bin/python sft_think.py --out "${RUNS:-runs}/sft_think" ;;
  tour) exec .venv/bin/python scripts/study.py --quick --runs "${RUNS:-runs}" ;;
  real) exec .venv/bin/python scripts/real_tour.py --runs "${RUNS:-runs}/real" ;;
  *) echo "usage: bash run.sh [quick|tour|real]" >&2; exit 2 ;;
esac
