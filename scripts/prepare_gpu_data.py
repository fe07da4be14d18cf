"""usage: python scripts/prepare_gpu_data.py OUT_DIR [PER_KIND] [SHARDS] [--more N] [--to-english ANSWERS]
(also the CPU recipe's data: scripts/train_cpu_30min.sh)

Prompts for the GPU adapter run (scripts/gpu_adapter.sh, issue 12), built here, where the training
files are: ``PER_KIND`` task-diverse prompts of every kind (kangaroo.training.tasks, seed 0, default
1,500), minus every prompt that shares text with the stage-2 validation set; that validation set
(the 240 prompts stage 2 held out of runs/task-prompts: seed 0, --val-size 240) is written
unchanged to ``OUT_DIR/val/``, so the GPU runs and the shipped adapter are measured on the same
held-out prompts. The training prompts are shuffled (seed 0) and dealt into ``SHARDS`` files
``OUT_DIR/shard-<i>/prompts.jsonl`` (default 4), one per self-distillation process, so that a
time limit cuts every kind alike.

``--more N`` appends the prompts of a ``N``-per-kind build that the first set lacks (same filter),
after the first set, so a time-limited self-distillation answers the first set before them.
``--to-english ANSWERS`` (a self-distillation cache, ``.jsonl`` or ``.jsonl.xz``) builds
German/French/Spanish → English prompts whose source text is the target's own answer to one of the
first set's English → German/French/Spanish prompts: the training files hold English only, and
Spec-Bench's translations go from German into English. They come first in every shard.
"""
import argparse
import json
import lzma
import random
import re
import tempfile
from pathlib import Path

from kangaroo.training.data import read_conversations, split
from kangaroo.training.distill import answer_key
from kangaroo.training.tasks import LANGUAGES, build

TO_ENGLISH = ("Translate {lang} to English: {s}", "Translate the following {lang} text into English.\n\n{s}",
              "What does this mean in English? \"{s}\"", "Please translate this from {lang} into English: {s}")

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("out", type=Path)
ap.add_argument("per_kind", type=int, nargs="?", default=1500)
ap.add_argument("shards", type=int, nargs="?", default=4)
ap.add_argument("--more", type=int, default=0)
ap.add_argument("--to-english", type=Path)
args = ap.parse_args()
if args.to_english and not args.to_english.is_file():
    ap.error(f"--to-english: answer cache {args.to_english} not found")
out, per_kind, shards = args.out, args.per_kind, args.shards
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
dropped = 0


def held_out(r: dict) -> bool:
    contents = [m["content"] for m in r["conversations"]]
    return any(c in short for c in contents) or any(s in c for c in contents for s in snippets)


def kept(recs: list[dict]) -> list[dict]:
    global dropped
    good = [r for r in recs if not held_out(r)]
    dropped += len(recs) - len(good)
    return good


records = kept([r for recs in build(train_dir, per_kind, 0).values() for r in recs])
random.Random(0).shuffle(records)
seen = {json.dumps(r["conversations"]) for r in records}
more = []
if args.more:
    more = kept([r for recs in build(train_dir, args.more, 0).values() for r in recs
                 if json.dumps(r["conversations"]) not in seen])
    random.Random(1).shuffle(more)

to_english = []
if args.to_english:
    opener = lzma.open if args.to_english.suffix == ".xz" else open
    with opener(args.to_english, "rt", encoding="utf-8") as f:
        answers = {row["key"]: row for row in map(json.loads, f)}
    rng = random.Random(2)
    for r in records:
        if r["source"] != "task-translate":
            continue
        key = answer_key(r["conversations"])  # a prompt-only record: its messages are the prompt
        row, prompt = answers.get(key), r["conversations"][-1]["content"]
        lang = next((lang for lang in LANGUAGES if lang in prompt), None)
        if row is None or lang is None or not row.get("finished", True):
            continue
        text = row["response"].strip().strip('"').strip()
        # the target's translation, when it is one: no English preamble, one short paragraph
        if not 20 <= len(text) <= 600 or "\n" in text or re.search(r"\b(translat\w*|Here|Sure|English|German|French|Spanish|[Tt]he|is|and|of)\b", text):
            continue
        to_english.append({"id": f"{r['id']}-to-english", "source": "task-translate", "prompt_only": True,
                           "conversations": [{"role": "user", "content": rng.choice(TO_ENGLISH).format(lang=lang, s=text)}]})
    to_english = kept(to_english)

for i in range(shards):
    d = out / f"shard-{i}"
    d.mkdir(exist_ok=True)
    mine = to_english[i::shards] + records[i::shards] + more[i::shards]
    (d / "prompts.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in mine))
print(f"{len(val_records)} validation prompts; {len(to_english)} to-English + {len(records)} + {len(more)} more "
      f"training prompts in {shards} shards ({dropped} dropped for sharing text with the validation set)")
