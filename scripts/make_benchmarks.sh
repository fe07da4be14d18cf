#!/usr/bin/env bash
# Regenerate BENCHMARKS.md (and docs/benchmarks/*.png) from one real `kangaroo bench` run:
# 2 seeded questions per Spec-Bench task, at most 128 new tokens per turn, every method, all cores,
# with the step costs (--costs).
#
#   scripts/make_benchmarks.sh                      # the default model with its shipped adapter
#   scripts/make_benchmarks.sh --adapter random     # extra options go to `kangaroo bench`
#   SWEEP=1 scripts/make_benchmarks.sh              # also sweep η × γ (1 question per task) and add the table
#   NOTE="..." scripts/make_benchmarks.sh           # a paragraph for the top of the page
#
# Run it on a quiet machine: on 2 cores, any other busy process slows torch's multi-threaded
# matmuls by up to ~30x for multi-token forwards (verification), which distorts every speedup.
# The run measures the CPU time other processes used before and during it; the page shows it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${OUT:-runs/bench-quick}
THREADS=${THREADS:-$(nproc)}
PER_CATEGORY=${PER_CATEGORY:-2}
MAX_NEW=${MAX_NEW:-128}

echo "load: $(cut -d' ' -f1-3 /proc/loadavg)  (busy processes below, if any)"
ps -eo pcpu,pid,args --sort=-pcpu | awk 'NR>1 && $1>20 {print "  " $0}' | cut -c1-120
$PY -m kangaroo.cli bench --per-category "$PER_CATEGORY" --max-new-tokens "$MAX_NEW" --threads "$THREADS" --costs --out "$OUT" "$@"
SWEEP_ARGS=()
if [ "${SWEEP:-0}" = 1 ]; then
  $PY -m kangaroo.cli bench --sweep --per-category 1 --max-new-tokens "$MAX_NEW" --threads "$THREADS" \
      --methods ar-hf,ar --sweep-thresholds 0.4,0.6,0.8 --sweep-max-steps 3,6 --no-plots --out "$OUT-sweep" "$@"
  SWEEP_ARGS=(--sweep-dir "$OUT-sweep")
fi
[ -n "${NOTE:-}" ] && SWEEP_ARGS+=(--note "$NOTE")
$PY -m kangaroo.bench.report "$OUT" --md BENCHMARKS.md --images docs/benchmarks "${SWEEP_ARGS[@]}" \
    --script "${SWEEP:+SWEEP=$SWEEP }scripts/make_benchmarks.sh${*:+ $*}  # = kangaroo bench --per-category $PER_CATEGORY --max-new-tokens $MAX_NEW --threads $THREADS --costs${*:+ $*}"
