#!/usr/bin/env bash
# The GPU adapter run (issue 12): self-distil the task-diverse prompts on the lent GPU, then train
# the shipped adapter's continuation and the adapter variants side by side, and bring back their
# metrics, weights and the answer cache. docs/TRAINING.md records a run of it.
#
# Prepared here (.gpu/ is in .git/info/exclude), run there (the device tool sends the repository;
# one call carries at most 64 MiB, so the 98 MB GGUF goes in two calls):
#   python scripts/prepare_gpu_data.py .gpu/b/data 2000 4        # prompts + the stage-2 validation set
#   (cd .gpu/b && tar cJf data.tar.xz data && rm -r data)
#   mkdir -p .gpu/a && split -b 60000000 ~/.cache/kangaroo/gguf/SmolLM2-135M-Instruct.Q4_1.gguf .gpu/gguf.part.
#   mv .gpu/gguf.part.aa .gpu/a/ && mv .gpu/gguf.part.ab .gpu/b/
#   sha256sum ~/.cache/kangaroo/gguf/SmolLM2-135M-Instruct.Q4_1.gguf | cut -c1-64 > .gpu/b/gguf.sha256
#   xz -c runs/task-distill/*.jsonl > .gpu/b/stage2-distill.jsonl.xz   # stage 2's answers (validation included)
#   pip download --no-deps gguf==0.19.0 -d .gpu/b
# call 1, carry .gpu/a:  cp .gpu/a/gguf.part.aa /root/gguf.part.aa
# call 2, carry .gpu/b, at once (the machine stays warm 30 s):  bash scripts/gpu_adapter.sh   (results in $OUT)
#
# Environment (defaults are the GPU run's): PY, WORK, OUT, PART_A (the GGUF's first part),
# DATA_LIMIT (prompts per shard, 0 = all), DISTILL_S and TRAIN_S (time limits of the two phases),
# DBATCH (generation batch per process), BATCH (padded training tokens per batch), VAR_STEPS
# (steps of each variant), SHIP_STEPS (steps of the continued adapter), VARIANTS.
set -u
T0=$(date +%s)
PY=${PY:-python3}
W=${WORK:-/root/kg}
OUT=${OUT:-$W/out}
DATA_LIMIT=${DATA_LIMIT:-0}
DISTILL_S=${DISTILL_S:-180}
TRAIN_S=${TRAIN_S:-240}
DBATCH=${DBATCH:-256}
BATCH=${BATCH:-8192}
VAR_STEPS=${VAR_STEPS:-600}
SHIP_STEPS=${SHIP_STEPS:-1200}
VARIANTS=${VARIANTS:-base sharp mlp two-attn mha}
GGUF=SmolLM2-135M-Instruct.Q4_1.gguf
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false KANGAROO_CACHE=$W/cache
mkdir -p "$W/logs" "$OUT" "$KANGAROO_CACHE/gguf"
stamp() { echo "[$(( $(date +%s) - T0 )) s] $*"; }

# 1. the model (the GGUF's two parts, checked), the gguf package, the prompts
if [ ! -f "$KANGAROO_CACHE/gguf/$GGUF" ]; then
  PART_A=${PART_A:-/root/gguf.part.aa}
  [ -f "$PART_A" ] || PART_A=.gpu/a/gguf.part.aa
  cat "$PART_A" .gpu/b/gguf.part.ab > "$KANGAROO_CACHE/gguf/$GGUF" || exit 3
fi
[ "$(sha256sum "$KANGAROO_CACHE/gguf/$GGUF" | cut -c1-64)" = "$(cat .gpu/b/gguf.sha256)" ] || { echo "GGUF checksum mismatch"; exit 3; }
$PY -m pip install -q --no-index --no-deps --no-compile --target "$W/site" .gpu/b/gguf-*.whl || exit 3
export PYTHONPATH=$W/site:$PWD/src:$PWD/scripts
tar xJf .gpu/b/data.tar.xz -C "$W" || exit 3
if [ "$DATA_LIMIT" != 0 ]; then
  for d in "$W"/data/shard-*; do head -n "$DATA_LIMIT" "$d/prompts.jsonl" > "$d/p" && mv "$d/p" "$d/prompts.jsonl"; done
  head -n "$DATA_LIMIT" "$W/data/val/task-val.jsonl" > "$W/v" && mv "$W/v" "$W/data/val/task-val.jsonl"
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
$PY -c "from kangaroo.loading import load_model; load_model('smollm2-135m-instruct')" || exit 4
stamp "model converted"

# 2. self-distillation: one process per shard, each with its own copy of the stage-2 answer cache
#    (the validation prompts' answers and the stage-2 training prompts' are there already)
for d in "$W"/data/shard-*; do
  i=${d##*-}
  mkdir -p "$W/dc-$i"
  xz -dc .gpu/b/stage2-distill.jsonl.xz > "$W/dc-$i/smollm2-135m-instruct-greedy160-bfloat16-68e6d5b26eb7.jsonl"
  timeout -k 10 "$DISTILL_S" $PY -m kangaroo.cli -v train --data "$d" --val-size 0 --out "$W/d-$i" --distill-only \
    --distill-cache "$W/dc-$i" --distill-max-new-tokens 160 --distill-max-prompt-tokens 1024 --distill-batch "$DBATCH" \
    --precision bf16 --seq-len 1200 --no-progress > "$W/logs/distill-$i.log" 2>&1 &
done
wait
mkdir -p "$W/dc"
for f in "$W"/dc-0/*.jsonl; do cat "$W"/dc-*/"$(basename "$f")" > "$W/dc/$(basename "$f")"; done
stamp "self-distillation done: $(cat "$W"/dc/*.jsonl | wc -l) cached rows (with duplicates)"
tail -n 3 "$W"/logs/distill-*.log

# 3. training, all runs at once: the continued adapter (the candidate to ship) and the variants
#    from a random start, same data, steps and schedule
DATA=$(ls -d "$W"/data/shard-* | tr '\n' ' ')
DATA_JSON=$(ls -d "$W"/data/shard-* | $PY -c 'import json,sys; print(json.dumps(sys.stdin.read().split()))')
timeout -k 10 "$TRAIN_S" $PY -m kangaroo.cli -v train --data $DATA --val-data "$W/data/val" --self-distill --distill-cached-only \
  --distill-cache "$W/dc" --distill-max-new-tokens 160 --distill-max-prompt-tokens 1024 --precision bf16 --exit-layer 2 \
  --seq-len 1200 --batch-tokens "$BATCH" --init src/kangaroo/adapters/smollm2-135m-instruct --lr 1e-3 --warmup-steps 50 \
  --max-steps "$SHIP_STEPS" --val-every 200 --save-every 200 --feature-cache-gb 7 --no-progress --out "$W/runs/ship" \
  > "$W/logs/ship.log" 2>&1 &
for v in $VARIANTS; do
  timeout -k 10 "$TRAIN_S" $PY scripts/adapter_variants.py "$v" "{\"data\": $DATA_JSON, \"val_data\": [\"$W/data/val\"],
    \"out\": \"$W/runs/$v\", \"distill_cache\": \"$W/dc\", \"distill_cached_only\": true, \"init\": \"random\",
    \"lr\": 0.003, \"max_steps\": $VAR_STEPS, \"warmup_steps\": 50, \"val_every\": 100, \"save_every\": 100,
    \"batch_tokens\": $BATCH, \"threads\": null, \"draft_vocab\": 8192, \"feature_cache_gb\": 7}" \
    > "$W/logs/$v.log" 2>&1 &
done
wait
stamp "training done"

# 4. results: each run's metrics and weights (an unfinished run: its best checkpoint's adapter state)
$PY - "$W/runs" <<'PY'
import json, sys
from pathlib import Path
import torch
for run in sorted(Path(sys.argv[1]).iterdir()):
    rows = [json.loads(l) for l in open(run / "metrics.jsonl")] if (run / "metrics.jsonl").exists() else []
    vals = [r for r in rows if "val_agreement" in r]
    best = run / "best" / "checkpoint.pt"
    if best.exists() and not (run / "adapter.safetensors").exists():
        torch.save(torch.load(best, map_location="cpu", weights_only=False)["adapter"], run / "best-adapter.pt")
    for v in vals:
        print(run.name, "step", v["step"], "agreement %.4f" % v["val_agreement"], "accept %.4f" % v["val_accept"],
              "loss %.3f" % v["val_loss"], v.get("val_agreement_by_kind"))
    print(run.name, "exported" if (run / "adapter.safetensors").exists() else "NOT exported",
          "last train row", [r for r in rows if "loss" in r and "val_loss" not in r][-1:] )
PY
cd "$W"
for r in runs/*; do
  tar cf "$OUT/run-$(basename "$r").tar" --exclude=checkpoints --exclude=best "$r"
done
xz -T4 -c dc/*.jsonl > "$OUT/distill.jsonl.xz"
tar cJf "$OUT/logs.tar.xz" logs runs/*/train_config.json 2>/dev/null
ls -la "$OUT"
stamp "end"
