#!/usr/bin/env bash
# Creates .venv (Python 3.11 or 3.12) with the project installed in editable mode, plus test extras.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  for cand in python3.11 python3.12 python3; do
    if command -v "$cand" >/dev/null 2>&1; then PY=$cand; break; fi
  done
fi
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[test]"
# PyTriton's client for the tests (see pyproject.toml: --no-deps keeps numpy 2; its requirements are in `test`).
.venv/bin/python -m pip install -q --no-deps "nvidia-pytriton==0.7.0"
