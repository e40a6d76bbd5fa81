#!/usr/bin/env bash
# The GPU path proven by one command, on a bare machine with one CUDA GPU (torch there; no Ray needed):
#
#   scripts/gpu_check.sh WHEEL_DIR [OUT_DIR]     # install WHEEL_DIR's wheels, then python -m bench.gpu_check
#   scripts/gpu_check.sh --dry-run [OUT_DIR]     # the same phases on CPU with tiny shapes (nothing installed)
#
# WHEEL_DIR holds megatron-core and pydantic with their wheels for the GPU machine's Python; make it here with
# `scripts/gpu_wheels.sh WHEEL_DIR`. The wheels go into a fresh folder under /tmp (--no-index --no-deps: no
# network needed) that is put first on PYTHONPATH; torch, numpy, sentencepiece, pyyaml, safetensors, psutil,
# pytest (and transformers, if present) come from the machine. Results: OUT_DIR, else $OUT, else bench/results/.
# Exit status: that of bench.gpu_check (0 when every phase passed), 2 for a bad command line or install.
set -uo pipefail
cd "$(dirname "$0")/.."

if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
usage() { sed -n 2,10p "$0" >&2; exit 2; }

[[ $# -ge 1 && $# -le 2 ]] || usage
if [[ $1 == --dry-run ]]; then
  args=(--dry-run)
else
  wheels=$1
  compgen -G "$wheels/*.whl" >/dev/null || { echo "gpu_check.sh: no wheels in '$wheels'" >&2; exit 2; }
  site=$(mktemp -d /tmp/gpu_check_site.XXXXXX)
  echo "installing $(ls "$wheels"/*.whl | wc -l) wheels from $wheels into $site"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "$wheels"/*.whl \
    || { echo "gpu_check.sh: installing the wheels of '$wheels' failed" >&2; exit 2; }
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  args=()
fi
out=${2:-${OUT:-}}
[[ -n $out ]] && args+=(--out "$out")
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
"$PY" -c 'import sys; print("python", sys.version.split()[0], sys.executable)'
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
exec "$PY" -W ignore -m bench.gpu_check "${args[@]}"
