#!/usr/bin/env bash
# Sets everything up, writes the demo model if missing, serves it on http://127.0.0.1:8000 and, once it is
# ready, prints a ready-to-paste curl. Ctrl-C stops the service after in-flight requests finish.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export RAY_USAGE_STATS_ENABLED=0
.venv/bin/python -m demo --if-missing --out .demo/nemotron4-tiny-reward
exec bash scripts/serve_local.sh .venv configs/local.yaml
