#!/usr/bin/env bash
# Set up (if needed) and run the main job: Kangaroo generation on the embedded default model,
# compared against plain greedy decoding of the same model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# a 128-token coding answer (PROMPT="..." for your own; short chat answers gain least, see README)
PROMPT=${PROMPT:-"Write a Python function that returns the n-th Fibonacci number, then explain it."}
.venv/bin/kangaroo generate --prompt "$PROMPT" --max-new-tokens "${MAX_NEW_TOKENS:-128}" --compare "$@"
