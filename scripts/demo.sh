#!/usr/bin/env bash
# Set up (if needed) and run the main job: Kangaroo generation on the embedded default model,
# compared against plain greedy decoding of the same model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PROMPT=${PROMPT:-"Explain in three sentences why the sky is blue."}
.venv/bin/kangaroo generate --prompt "$PROMPT" --max-new-tokens "${MAX_NEW_TOKENS:-128}" --compare "$@"
