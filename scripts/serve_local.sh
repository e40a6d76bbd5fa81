#!/usr/bin/env bash
# Serves a Serve config on a new local Ray instance (scripts/serve_local.py, like `serve run`) and prints a
# ready-to-paste curl once the service is ready. Ctrl-C or SIGTERM stops it gracefully: new requests get 503,
# the requests in flight get their answers (within the Router's graceful_shutdown_timeout_s), then it exits.
#
#   bash scripts/serve_local.sh [VENV] [CONFIG]        # defaults: .venv configs/local.yaml
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv}
CONFIG=${2:-configs/local.yaml}
export RAY_USAGE_STATS_ENABLED=0
URL=$("$VENV/bin/python" - "$CONFIG" <<'PY'
import sys

import yaml

http = yaml.safe_load(open(sys.argv[1])).get("http_options") or {}
print(f"http://{http.get('host', '127.0.0.1')}:{http.get('port', 8000)}")
PY
)
BODY='{"conversations": [{"messages": [{"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "The capital of France is Paris."}]}]}'

# A background job of a non-interactive shell starts with SIGINT ignored, and Python keeps an ignored SIGINT
# ignored, so a plain `... &` would never see Ctrl-C. Start it with SIGINT at its default and in its own
# process group (the terminal's Ctrl-C reaches only this script, which forwards exactly one SIGINT below).
"$VENV/bin/python" -c 'import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); os.setpgid(0, 0); os.execv(sys.argv[1], sys.argv[1:])' \
  "$VENV/bin/python" scripts/serve_local.py "$CONFIG" &
SERVE_PID=$!

stop() {
  trap '' INT TERM   # one graceful stop; a second Ctrl-C must not cut the drain short
  echo "stopping: in-flight requests finish first" >&2
  kill -INT "$SERVE_PID" 2>/dev/null || true
  wait "$SERVE_PID" 2>/dev/null || true
  exit 0
}
trap stop INT TERM

for _ in $(seq 1 300); do
  if ! kill -0 "$SERVE_PID" 2>/dev/null; then echo "the service exited; see the log above" >&2; exit 1; fi
  if curl -sf -m 10 "$URL/v2/health/ready" >/dev/null 2>&1; then
    cat <<CURL

The service is ready on $URL. Score a conversation from another shell:

curl -s $URL/v1/score -H 'Content-Type: application/json' -d '$BODY'

CURL
    break
  fi
  sleep 1
done
wait "$SERVE_PID"
