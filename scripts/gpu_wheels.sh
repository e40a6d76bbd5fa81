#!/usr/bin/env bash
# Downloads the wheels scripts/gpu_check.sh installs on the GPU machine (which has torch, numpy,
# sentencepiece, pyyaml, safetensors, psutil, pytest and transformers, but neither megatron-core nor
# pydantic): megatron-core as pinned in pyproject.toml, pydantic and what pydantic needs.
#
#   scripts/gpu_wheels.sh WHEEL_DIR [PYTHON_VERSION]     # PYTHON_VERSION of the GPU machine, default 3.12
#
# megatron-core ships compiled wheels per Python version, so PYTHON_VERSION must be the GPU machine's
# (`python3 -V` there). About 5.5 MB.
set -euo pipefail
[[ $# -ge 1 && $# -le 2 ]] || { sed -n 2,9p "$0" >&2; exit 2; }
dir=$1
pyver=${2:-3.12}
if [[ -x "$(dirname "$0")/../.venv/bin/python" ]]; then PY="$(dirname "$0")/../.venv/bin/python"; else PY=python3; fi
mkdir -p "$dir"
"$PY" -m pip download --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$dir" \
  megatron-core==0.16.1 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
  typing-extensions==4.16.0
ls -l "$dir"
