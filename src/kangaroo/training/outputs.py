"""What a training run writes in its ``--out`` folder, and reads back on ``--resume``.

    <out>/checkpoints/step-000100/   checkpoint.pt (adapter, optimiser, scheduler, RNG, state), state.json
    <out>/best/                      the same, for the lowest validation loss so far
    <out>/metrics.jsonl              one row per log or validation
    <out>/curves.png                 drawn at the end

Checkpoint folders are filled under a temporary name and renamed into place, so a run killed at any
moment leaves only complete ones.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path

import torch

from ..adapter import _atomic_write

logger = logging.getLogger(__name__)


def checkpoints(ckpt_dir: Path) -> list[Path]:
    """The ``step-*`` checkpoint folders in ``ckpt_dir``, oldest first."""
    if not ckpt_dir.exists():
        return []
    return sorted(ckpt_dir.glob("step-*"), key=lambda p: int(p.name.split("-")[1]))


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    found = checkpoints(ckpt_dir)
    return found[-1] if found else None


def prune_checkpoints(ckpt_dir: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` step checkpoints."""
    for old in checkpoints(ckpt_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])


def save_checkpoint(path: Path, adapter, optimizer, scheduler, state: dict) -> None:
    """Write a checkpoint folder atomically: fill ``.tmp-<name>``, then rename it into place."""
    tmp = path.parent / f".tmp-{path.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.save({"adapter": adapter.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "rng": rng_state(), "state": state}, tmp / "checkpoint.pt")
    (tmp / "state.json").write_text(json.dumps(state, indent=2) + "\n")
    if path.exists():
        old = path.parent / f".old-{path.name}"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)


class MetricsLog:
    def __init__(self, path: Path, enabled: bool) -> None:
        self.path, self.enabled = path, enabled

    def write(self, row: dict) -> None:
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")


def truncate_metrics(path: Path, step: int) -> None:
    """After a resume, drop log rows written after the checkpoint (they will be written again)."""
    if not path.exists():
        return
    rows = [line for line in path.read_text().split("\n") if line.strip()]
    keep = []
    for line in rows:
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (json.JSONDecodeError, KeyError):
            continue
    _atomic_write(path, lambda p: p.write_text("".join(k + "\n" for k in keep)))


def plot_curves(metrics_path: Path, png: Path) -> None:
    """Training loss and validation metrics against steps (skipped if matplotlib is missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib not installed: no %s", png)
        return
    rows = [json.loads(line) for line in metrics_path.read_text().split("\n") if line.strip()]
    tr = [r for r in rows if "loss" in r]
    va = [r for r in rows if "val_loss" in r]
    kinds = sorted({k for r in va for k in r.get("val_agreement_by_kind", {})})
    fig, axes = plt.subplots(1, 3 if kinds else 2, figsize=(15 if kinds else 10, 4))
    ax1, ax2 = axes[0], axes[1]
    ax1.plot([r["step"] for r in tr], [r["loss"] for r in tr], label="train soft CE")
    ax1.plot([r["step"] for r in va], [r["val_loss"] for r in va], "o-", label="val soft CE")
    ax1.set_xlabel("step")
    ax1.legend()
    ax2.plot([r["step"] for r in va], [r["val_agreement"] for r in va], "o-", label="val top-1 agreement")
    ax2.plot([r["step"] for r in va], [r["val_accept"] for r in va], "s-", label="val Σ min(p, q)")
    ax2.plot([r["step"] for r in tr], [r["agreement"] for r in tr], alpha=0.4, label="train top-1 agreement")
    ax2.set_xlabel("step")
    ax2.set_ylim(0, 1)
    ax2.legend()
    if kinds:  # validation agreement per task kind (the held-out conversations' source)
        ax3 = axes[2]
        for kind in kinds:
            pts = [(r["step"], r["val_agreement_by_kind"][kind]) for r in va if kind in r.get("val_agreement_by_kind", {})]
            ax3.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=kind, markersize=3)
        ax3.set_xlabel("step")
        ax3.set_title("val top-1 agreement by task kind")
        ax3.set_ylim(0, 1)
        ax3.legend(fontsize=7)
    fig.tight_layout()
    tmp = png.with_name(f".{png.name}.tmp.png")
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    os.replace(tmp, png)
