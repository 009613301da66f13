#!/usr/bin/env bash
# The accelerator check (issue 19): kernels vs their references on the device and the engine's speed there, one
# JSON summary. Here first (where the model file is): `bash scripts/device_check.sh --prepare` writes .devcheck/
# (SmolLM2's config and tokenizer) and .whl/ (the wheels the device's image lacks). On the device machine, from
# the repository root with .devcheck and .whl carried: `bash scripts/device_check.sh [OUT_DIR]`. No network there.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--prepare" ]; then
  py=.venv/bin/python
  "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl gguf==0.19.0 || exit 1
  exec "$py" scripts/device_check.py --prepare
fi
out="${1:-${OUT:-.}}"
mkdir -p "$out"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/devcheck_site \
    .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/devcheck_site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
python3 scripts/device_check.py --out "$out/device_check.json" --budget-s "${DEVICE_CHECK_BUDGET_S:-360}" 2>&1 |
  tee "$out/device_check.log"
