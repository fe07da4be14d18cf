#!/usr/bin/env bash
# The GPU adapter run (issue 12): self-distil the task-diverse prompts on the lent GPU, then train
# continuations of the shipped adapter (one per MLP width in SHIP_MLPS) and the adapter variants
# side by side, and bring back their metrics, weights and the answer cache. docs/TRAINING.md
# records the runs of it (stages 3-5).
#
# Prepared here (.gpu/ is in .git/info/exclude), run there (the device tool sends the repository
# and the carried paths, at most 64 MiB a call, so the 98 MB GGUF goes in two calls; the tracked
# tree is ~13 MB):
#   python scripts/prepare_gpu_data.py .gpu/b/data 2000 4 --more 3500 --to-english runs/gpu/distill.jsonl.xz
#   for d in .gpu/b/data/shard-*; do head -n 6500 $d/prompts.jsonl > $d/p && mv $d/p $d/prompts.jsonl; done
#                   # stage 5's prompts (stage 3: `prepare_gpu_data.py .gpu/b/data 2000 4`, not cut)
#   (cd .gpu/b && tar cJf data.tar.xz data && rm -r data)
#   mkdir -p .gpu/a && split -b 54000000 ~/.cache/kangaroo/gguf/SmolLM2-135M-Instruct.Q4_1.gguf .gpu/gguf.part.
#   mv .gpu/gguf.part.aa .gpu/a/ && mv .gpu/gguf.part.ab .gpu/b/
#   sha256sum ~/.cache/kangaroo/gguf/SmolLM2-135M-Instruct.Q4_1.gguf | cut -c1-64 > .gpu/b/gguf.sha256
#   cp runs/gpu/distill.jsonl.xz .gpu/b/prev-distill.jsonl.xz   # the answers so far (stage 3's run: stage 2's,
#                                              # xz -c runs/task-distill/*.jsonl; validation included)
#   pip download --no-deps gguf==0.19.0 -d .gpu/b
# call 1, carry .gpu/a:  cp .gpu/a/gguf.part.aa /root/gguf.part.aa
# call 2, carry .gpu/b, at once (the machine stays warm 30 s):  bash scripts/gpu_adapter.sh   (results in $OUT)
# call 3 (optional, at once), carry .gpu/c (Spec-Bench's question.jsonl, which lives outside the repository):
#   KANGAROO_SPEC_BENCH=$PWD/.gpu/c/question.jsonl bash scripts/gpu_bench.sh   (tune + the quick bench on the GPU)
#
# Environment (defaults are the GPU run's): PY, WORK, OUT, PART_A (the GGUF's first part),
# DATA_LIMIT (prompts per shard, 0 = all), DISTILL_S and TRAIN_S (time limits of the two phases),
# DBATCH (generation batch per process), BATCH (padded training tokens per batch), VAR_STEPS
# (steps of each variant), SHIP_STEPS and SHIP_LR (the continued adapters), SHIP_MLPS (their MLP
# widths: the shipped width continues it, a wider one widens it, new units silent at first),
# VARIANTS (random-start variants; stage 3 ran "base sharp mlp two-attn mha").
set -u
T0=$(date +%s)
PY=${PY:-python3}
W=${WORK:-/root/kg}
OUT=${OUT:-$W/out}
DATA_LIMIT=${DATA_LIMIT:-0}
DISTILL_S=${DISTILL_S:-170}
TRAIN_S=${TRAIN_S:-270}
DBATCH=${DBATCH:-256}
BATCH=${BATCH:-8192}
VAR_STEPS=${VAR_STEPS:-600}
SHIP_STEPS=${SHIP_STEPS:-2000}
SHIP_LR=${SHIP_LR:-1e-3}
SHIP_MLPS=${SHIP_MLPS:-1152 1728}
VARIANTS=${VARIANTS:-}
FEATURE_GB=${FEATURE_GB:-20}
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

# 2. self-distillation: one process per shard, each with its own copy of the answers so far
#    (the validation prompts' answers are there already)
for d in "$W"/data/shard-*; do
  i=${d##*-}
  mkdir -p "$W/dc-$i"
  xz -dc .gpu/b/prev-distill.jsonl.xz > "$W/dc-$i/smollm2-135m-instruct-greedy160-bfloat16-68e6d5b26eb7.jsonl"
  timeout -k 10 "$DISTILL_S" $PY -m kangaroo.cli -v train --data "$d" --val-size 0 --out "$W/d-$i" --distill-only \
    --distill-cache "$W/dc-$i" --distill-max-new-tokens 160 --distill-max-prompt-tokens 1024 --distill-batch "$DBATCH" \
    --precision bf16 --seq-len 1200 --no-progress > "$W/logs/distill-$i.log" 2>&1 &
done
wait
mkdir -p "$W/dc"
for f in "$W"/dc-0/*.jsonl; do  # the shards' caches, each answer once
  $PY - "$W/dc/$(basename "$f")" "$W"/dc-*/"$(basename "$f")" <<'PY'
import json, sys
rows = {}
for path in sys.argv[2:]:
    for line in open(path, encoding="utf-8"):
        try:
            rows.setdefault(json.loads(line)["key"], line if line.endswith("\n") else line + "\n")
        except (json.JSONDecodeError, KeyError):
            pass  # a torn last line
open(sys.argv[1], "w", encoding="utf-8").writelines(rows.values())
PY
done
stamp "self-distillation done: $(cat "$W"/dc/*.jsonl | wc -l) cached answers"
tail -n 3 "$W"/logs/distill-*.log

# 3. training, all runs at once: the continued adapter (the candidate to ship) and the variants
#    from a random start, same data, steps and schedule
DATA=$(ls -d "$W"/data/shard-* | tr '\n' ' ')
DATA_JSON=$(ls -d "$W"/data/shard-* | $PY -c 'import json,sys; print(json.dumps(sys.stdin.read().split()))')
for m in $SHIP_MLPS; do
  timeout -k 10 "$TRAIN_S" $PY -m kangaroo.cli -v train --data $DATA --val-data "$W/data/val" --self-distill --distill-cached-only \
    --distill-cache "$W/dc" --distill-max-new-tokens 160 --distill-max-prompt-tokens 1024 --precision bf16 --exit-layer 2 \
    --seq-len 1200 --batch-tokens "$BATCH" --init src/kangaroo/adapters/smollm2-135m-instruct --adapter-mlp "$m" \
    --lr "$SHIP_LR" --warmup-steps 50 --max-steps "$SHIP_STEPS" --val-every 200 --save-every 200 \
    --feature-cache-gb "$FEATURE_GB" --no-progress --out "$W/runs/ship-$m" > "$W/logs/ship-$m.log" 2>&1 &
done
for v in $VARIANTS; do
  timeout -k 10 "$TRAIN_S" $PY scripts/adapter_variants.py "$v" "{\"data\": $DATA_JSON, \"val_data\": [\"$W/data/val\"],
    \"out\": \"$W/runs/$v\", \"distill_cache\": \"$W/dc\", \"distill_cached_only\": true, \"init\": \"random\",
    \"lr\": 0.003, \"max_steps\": $VAR_STEPS, \"warmup_steps\": 50, \"val_every\": 100, \"save_every\": 100,
    \"batch_tokens\": $BATCH, \"threads\": null, \"draft_vocab\": 8192, \"feature_cache_gb\": $FEATURE_GB}" \
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
for r in runs/*; do  # parts of at most 15 MB (a returned file's limit is 16 MB)
  tar cf - --exclude=checkpoints --exclude=best "$r" | split -b 15000000 - "$OUT/run-$(basename "$r").tar.part-"
done
xz -T4 -c dc/*.jsonl > "$OUT/distill.jsonl.xz"
tar cJf "$OUT/logs.tar.xz" logs runs/*/train_config.json 2>/dev/null
ls -la "$OUT"
stamp "end"
