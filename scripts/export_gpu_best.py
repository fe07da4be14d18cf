"""Turn a time-limited GPU training run's best checkpoint into an adapter folder (issue 12, stage 5).

usage: python scripts/export_gpu_best.py RUN_DIR ANSWERS DATA_DIR OUT_DIR NOTE

``RUN_DIR`` is a run brought back by scripts/gpu_adapter.sh that its time limit stopped before
``kangaroo train`` exported it: ``best-adapter.pt`` (the best checkpoint's adapter state),
``train_config.json`` and ``metrics.jsonl``. The adapter gets a config recording that run's
settings, data and best validation row (NOTE is its recipe), then the draft vocabulary the trainer
would have chosen at export, by ``python -m kangaroo.draft_vocab`` over the answers in the
self-distillation cache ``ANSWERS`` to the prompts under ``DATA_DIR``'s shards.
"""

import json
import sys
import tempfile
from pathlib import Path

import torch

from kangaroo.adapter import Adapter, AdapterConfig
from kangaroo.draft_vocab import main as draft_vocab
from kangaroo.loading import load_model
from kangaroo.model import Backbone
from kangaroo.training.data import read_conversations
from kangaroo.training.distill import answer_key, load_cache, prompt_messages

if len(sys.argv) != 6:
    sys.exit(__doc__.split("\n\n")[1])
run, answers, data, out, note = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]), sys.argv[5]
for needed in (run / "best-adapter.pt", run / "train_config.json", run / "metrics.jsonl", answers):
    if not needed.is_file():
        sys.exit(f"export_gpu_best: error: {needed} not found")
train = json.loads((run / "train_config.json").read_text())
rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
vals = [r for r in rows if "val_agreement" in r]
best = min(vals, key=lambda r: r["val_loss"])  # the trainer's "best": lowest validation loss
state = torch.load(run / "best-adapter.pt", map_location="cpu", weights_only=False)

model, tokenizer = load_model(train["config"]["model"])
bb = Backbone(model)
adapter = Adapter(bb, train["config"]["exit_layer"], train["config"]["kv_heads"],
                  state["down.weight"].shape[1] if "down.weight" in state else 0)
adapter.load_state_dict(state)
final = {k: best[k] for k in ("val_loss", "val_agreement", "val_accept", "val_tokens", "val_agreement_by_kind")}
final.update(best_step=best["step"], steps=max(r["step"] for r in rows), train_s=max(r.get("elapsed_s", 0) for r in rows))
config = AdapterConfig(
    base_model=train["config"]["model"], exit_layer=adapter.exit_layer, fingerprint=bb.fingerprint(),
    kv_heads=train["config"]["kv_heads"], mlp_hidden=adapter.mlp_hidden,
    training={"config": train["config"], "data": train["data"], "final_metrics": final,
              "adapter_parameters": adapter.num_parameters(),
              "model_parameters": sum(p.numel() for p in model.parameters()), "recipe": note})
adapter.float().save(out, config)

# the training answers, as conversations whose assistant turns kangaroo.draft_vocab counts
cache = load_cache(answers)
convs, _ = read_conversations(sorted(str(d) for d in data.glob("shard-*")), prompts_ok=True)
with tempfile.TemporaryDirectory() as tmp:
    texts = Path(tmp) / "self-distilled-answers.jsonl"
    with texts.open("w", encoding="utf-8") as f:
        for c in convs:
            row = cache.get(answer_key(prompt_messages(c)))
            if row and row["response"]:
                f.write(json.dumps({"conversations": [{"role": "assistant", "content": row["response"]}]}) + "\n")
    code = draft_vocab(["--adapter", str(out), "--model", train["config"]["model"], "--data", str(texts)])
print(f"{out}: best step {best['step']}, val agreement {best['val_agreement']:.4f}")
sys.exit(code)
