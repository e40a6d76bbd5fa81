#!/usr/bin/env bash
# Sets everything up, writes the demo model if missing, serves it on http://127.0.0.1:8000 and, once it
# answers, prints a ready-to-paste curl. Ctrl-C stops the service.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export RAY_USAGE_STATS_ENABLED=0
.venv/bin/python -m demo --if-missing --out .demo/nemotron4-tiny-reward
BODY='{"conversations": [{"messages": [{"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "The capital of France is Paris."}]}]}'
.venv/bin/serve run configs/local.yaml &
SERVE_PID=$!
trap 'kill -INT $SERVE_PID 2>/dev/null; wait $SERVE_PID' INT TERM
for _ in $(seq 1 150); do
  if ! kill -0 "$SERVE_PID" 2>/dev/null; then echo "serve run exited; see the log above" >&2; exit 1; fi
  if curl -sf -m 10 http://127.0.0.1:8000/v1/score -H 'Content-Type: application/json' -d "$BODY" >/dev/null 2>&1; then
    cat <<CURL

The service is ready on http://127.0.0.1:8000. Score a conversation from another shell:

curl -s http://127.0.0.1:8000/v1/score -H 'Content-Type: application/json' -d '$BODY'

CURL
    break
  fi
  sleep 2
done
wait "$SERVE_PID"
