#!/usr/bin/env bash
# Sets everything up and runs the unit and integration tests (the GPU tier skips itself without CUDA).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export RAY_USAGE_STATS_ENABLED=0
exec .venv/bin/python -m pytest tests -q --durations=15 "$@"
