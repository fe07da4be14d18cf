#!/usr/bin/env bash
# The quick bench on a lent GPU (issue 10, item 7): `kangaroo tune`, then `kangaroo bench --costs`
# on CUDA, results tarred into $OUT (a device call returns at most 8 files). Run it in the call
# right after scripts/gpu_adapter.sh, whose model conversion and gguf package it reuses (same WORK),
# with KANGAROO_SPEC_BENCH naming a carried copy of Spec-Bench's question.jsonl.
#
# Environment: PY, WORK, OUT, METHODS (the bench's methods), TUNE_S and BENCH_S (time limits).
set -u
T0=$(date +%s)
PY=${PY:-python3}
W=${WORK:-/root/kg}
OUT=${OUT:-$W/out}
METHODS=${METHODS:-ar-hf,ar,kangaroo,kangaroo-chain,lookup}
TUNE_S=${TUNE_S:-90}
BENCH_S=${BENCH_S:-200}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false KANGAROO_CACHE=$W/cache
export PYTHONPATH=$W/site:$PWD/src
mkdir -p "$OUT" "$W/bench"
stamp() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null
timeout -k 10 "$TUNE_S" $PY -m kangaroo.cli tune --device cuda --out "$W/bench/tune.json" > "$W/bench/tune.log" 2>&1
stamp "tune rc $?"; tail -n 12 "$W/bench/tune.log"
timeout -k 10 "$BENCH_S" $PY -m kangaroo.cli bench --device cuda --per-category 2 --max-new-tokens 128 --costs \
  --methods "$METHODS" --out "$W/bench/bench-cuda" > "$W/bench/bench.log" 2>&1
stamp "bench rc $?"; tail -n 40 "$W/bench/bench.log"
tar cJf "$OUT/bench-cuda.tar.xz" -C "$W" bench
ls -la "$OUT"
stamp "end"
