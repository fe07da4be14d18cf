"""Turn a `kangaroo train` checkpoint into an adapter folder.

usage: python scripts/export_checkpoint.py RUN_DIR STEP OUT_DIR [NOTE]

The adapter config is the run's own final ``adapter_config.json`` with ``final_metrics`` replaced by
that step's validation row from ``metrics.jsonl`` and ``exported_checkpoint`` set to NOTE (default:
the step). The shipped SmolLM2 adapter is the step-1800 checkpoint of its run (docs/TRAINING.md).
"""

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

run, step, out = Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
note = sys.argv[4] if len(sys.argv) > 4 else f"checkpoint at step {step}"
ck = torch.load(run / "checkpoints" / f"step-{step:06d}" / "checkpoint.pt", map_location="cpu", weights_only=False)
cfg = json.loads((run / "adapter_config.json").read_text())
rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
val = [r for r in rows if "val_agreement" in r and r.get("step") == step][-1]
cfg["training"]["final_metrics"] = {k: val[k] for k in ("val_loss", "val_agreement", "val_accept", "val_tokens")} | {"steps": step}
cfg["training"]["exported_checkpoint"] = note
out.mkdir(parents=True, exist_ok=True)
save_file({k: v.float().contiguous() for k, v in ck["adapter"].items()}, str(out / "adapter.safetensors"), metadata={"format": "pt"})
(out / "adapter_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
print(cfg["training"]["final_metrics"])
