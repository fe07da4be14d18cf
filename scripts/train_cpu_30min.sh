#!/usr/bin/env bash
# The 30-minute 2-core CPU recipe (docs/TRAINING.md): task-diverse prompts, self-distillation from an
# empty answer cache, an adapter with a residual MLP from a random start, validated on stage 2's
# 240 held-out prompts. On the AMD machine of 2026-11-27: 26.4 minutes, held-out agreement 0.349.
#
#   bash scripts/train_cpu_30min.sh [OUT]        # OUT defaults to runs/cpu30
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${1:-runs/cpu30}
$PY scripts/prepare_gpu_data.py "$OUT-data" 150 1    # 1,081 prompts + the 240 validation prompts
$PY -m kangaroo.cli -v train --data "$OUT-data/shard-0" --val-data "$OUT-data/val" --out "$OUT" --seed 0 \
  --self-distill --distill-cache "$OUT-distill" --distill-max-new-tokens 160 --distill-max-prompt-tokens 1024 \
  --distill-batch 32 --precision bf16 --threads 2 --exit-layer 2 --adapter-mlp 1152 --init random --lr 3e-3 \
  --warmup-steps 30 --epochs 5 --seq-len 1200 --batch-tokens 4096 --val-every 150 --save-every 150
