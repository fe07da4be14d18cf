"""The PNG plots of a ``kangaroo bench`` run (matplotlib, imported only here)."""

from __future__ import annotations

import sys
from pathlib import Path

from .report import PLOTS, TASK_NAMES


def _save(fig, out: Path, name: str) -> str:
    """Write one figure as PNG into ``out``, free it, and return its file name."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(out / name, dpi=80)
    plt.close(fig)
    return name


def make_plots(out: Path, summary: dict) -> list[str]:
    """Write the PNG plots into ``out``; returns their file names."""
    try:
        import matplotlib
    except ImportError:
        print("note: matplotlib is not installed (pip install 'kangaroo-decoding[bench]'): no plots", file=sys.stderr)
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    methods = summary["methods"]
    tasks = summary["tasks"] + ["overall"]

    # 1. speedup per category per method
    fig, ax = plt.subplots(figsize=(9, 4))
    names = [n for n in methods if methods[n]["overall"].get("speedup") is not None]
    width = 0.8 / max(len(names), 1)
    for i, n in enumerate(names):
        vals = [(methods[n]["overall"] if t == "overall" else methods[n]["by_category"][t]).get("speedup") or 0.0 for t in tasks]
        ax.bar([x + i * width for x in range(len(tasks))], vals, width, label=n)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([x + width * (len(names) - 1) / 2 for x in range(len(tasks))])
    ax.set_xticklabels([TASK_NAMES.get(t, t.capitalize()) for t in tasks])
    ax.set_ylabel(f"speedup vs {summary.get('baseline')}")
    ax.set_title("Walltime speedup by Spec-Bench category")
    ax.legend(fontsize=7, ncol=3)
    made.append(_save(fig, out, PLOTS[0]))

    # 2. accepted length (tokens per verification round) histogram
    spec = [n for n in methods if (methods[n]["overall"].get("compression_rate") or 1.0) > 1.0 or methods[n]["overall"].get("ctar")]
    if spec:
        fig, ax = plt.subplots(figsize=(7, 4))
        top = max([int(k) for n in spec for k in methods[n]["overall"]["accept_length_histogram"]] or [1])
        width = 0.8 / len(spec)
        for i, n in enumerate(spec):
            h = methods[n]["overall"]["accept_length_histogram"]
            total = sum(h.values()) or 1
            ax.bar([k + i * width for k in range(1, top + 1)], [h.get(str(k), 0) / total for k in range(1, top + 1)], width, label=n)
        ax.set_xticks([k + width * (len(spec) - 1) / 2 for k in range(1, top + 1)])
        ax.set_xticklabels([str(k) for k in range(1, top + 1)])
        ax.set_xlabel("tokens committed per verification round (accepted drafts + 1)")
        ax.set_ylabel("share of rounds")
        ax.set_title("Accepted length per round")
        ax.legend(fontsize=7)
        made.append(_save(fig, out, PLOTS[1]))

    # 3. CTAR curves
    curves = [(n, methods[n]["overall"]["ctar"]) for n in methods if methods[n]["overall"].get("ctar")]
    if curves:
        fig, ax = plt.subplots(figsize=(6, 4))
        for n, c in curves:
            ws = [w for w, v in enumerate(c, 1) if v is not None]
            ax.plot(ws, [c[w - 1] for w in ws], marker="o", label=n)
        ax.set_xlabel("w (drafted tokens)")
        ax.set_ylabel("CTAR(w)")
        ax.set_ylim(0, 1.02)
        ax.set_title("Consistent token acceptance rate")
        ax.legend(fontsize=7)
        made.append(_save(fig, out, PLOTS[2]))
    return made
