"""usage: python scripts/plot_variants.py OUT.png RUN_DIR [RUN_DIR ...]

Held-out top-1 agreement against optimiser steps for several `kangaroo train` runs (their
metrics.jsonl), one line each, named by folder: the adapter-variant figure of docs/TRAINING.md
(runs of scripts/gpu_adapter.sh)."""
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

out, runs = Path(sys.argv[1]), [Path(p) for p in sys.argv[2:]]
fig, ax = plt.subplots(figsize=(7, 4.2))
for run in runs:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    val = [r for r in rows if "val_agreement" in r]
    ax.plot([r["step"] for r in val], [r["val_agreement"] for r in val], marker="o", ms=3, label=run.name)
ax.set_xlabel("optimiser step")
ax.set_ylabel("held-out top-1 agreement (240 task prompts)")
ax.grid(alpha=0.3)
ax.legend(fontsize=8)
fig.tight_layout()
fig.savefig(out, dpi=110)
print("wrote", out)
