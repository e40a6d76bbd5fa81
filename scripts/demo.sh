#!/usr/bin/env bash
# Sets everything up, writes the demo model if missing and serves it on http://127.0.0.1:8000.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export RAY_USAGE_STATS_ENABLED=0
.venv/bin/python -m sharding.demo_model --if-missing --out .demo/nemotron4-tiny-reward
cat <<'CURL'

When "Deployed app 'reward' successfully" appears below, score a conversation from another shell:

curl -s http://127.0.0.1:8000/v1/score -H 'Content-Type: application/json' -d '{"conversations": [{"messages": [{"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "The capital of France is Paris."}]}]}'

CURL
exec .venv/bin/serve run configs/local.yaml
