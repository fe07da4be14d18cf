"""usage: python scripts/prepare_gpu_data.py OUT_DIR [PER_KIND] [SHARDS]    (also the CPU recipe's data: scripts/train_cpu_30min.sh)

Prompts for the GPU adapter run (scripts/gpu_adapter.sh, issue 12), built here, where the training
files are: ``PER_KIND`` task-diverse prompts of every kind (kangaroo.training.tasks, seed 0, default
1,500), minus every prompt that shares text with the stage-2 validation set; that validation set
(the 240 prompts stage 2 held out of runs/task-prompts: seed 0, --val-size 240) is written
unchanged to ``OUT_DIR/val/``, so the GPU runs and the shipped adapter are measured on the same
held-out prompts. The training prompts are shuffled (seed 0) and dealt into ``SHARDS`` files
``OUT_DIR/shard-<i>/prompts.jsonl`` (default 4), one per self-distillation process, so that a
time limit cuts every kind alike.
"""
import json
import random
import sys
import tempfile
from pathlib import Path

from kangaroo.training.data import read_conversations, split
from kangaroo.training.tasks import build

out = Path(sys.argv[1])
per_kind = int(sys.argv[2]) if len(sys.argv) > 2 else 1500
shards = int(sys.argv[3]) if len(sys.argv) > 3 else 4
train_dir = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "train"

# the stage-2 validation prompts (built by `python -m kangaroo.training.tasks --per-kind 220`, as
# runs/task-train.sh did), held out exactly as that run did
with tempfile.TemporaryDirectory() as tmp:
    for kind, records in build(train_dir, 220, 0).items():
        (Path(tmp) / f"{kind}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    convs, _ = read_conversations([tmp], prompts_ok=True)
_, val = split(convs, 240, 0)
val_records = [{"id": f"val-{i}", "source": c.source, "prompt_only": True, "conversations": c.messages}
               for i, c in enumerate(val)]
(out / "val").mkdir(parents=True, exist_ok=True)
(out / "val" / "task-val.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in val_records))

# snippets of every validation text: a training prompt containing one is dropped
# (100 characters from inside every message of 140 or more; shorter messages must match whole)
texts = [m["content"] for r in val_records for m in r["conversations"]]
snippets = {t[40:140] for t in texts if len(t) >= 140}
short = {t for t in texts if len(t) < 140}
records, dropped = [], 0
for kind, recs in build(train_dir, per_kind, 0).items():
    for r in recs:
        contents = [m["content"] for m in r["conversations"]]
        if any(c in short for c in contents) or any(s in c for c in contents for s in snippets):
            dropped += 1
        else:
            records.append(r)
random.Random(0).shuffle(records)
for i in range(shards):
    d = out / f"shard-{i}"
    d.mkdir(exist_ok=True)
    (d / "prompts.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records[i::shards]))
print(f"{len(val_records)} validation prompts; {len(records)} training prompts in {shards} shards "
      f"({dropped} dropped for sharing text with the validation set)")
