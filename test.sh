#!/usr/bin/env bash
# Run the test suite (installs into ./.venv first if needed). Extra args go to pytest,
# e.g. `bash test.sh -m "not slow"` or `bash test.sh tests/test_lora.py`.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
