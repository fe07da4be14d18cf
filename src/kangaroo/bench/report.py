"""``report.md``, PNG plots and ``BENCHMARKS.md`` from a ``summary.json`` (nothing typed by hand)."""

from __future__ import annotations

import shutil
from importlib import resources
from pathlib import Path
from string import Template
from typing import TextIO

from ..contention import BUSY_SHARE, busy
PLOTS = ("speedup_by_category.png", "accept_lengths.png", "ctar.png")
TASK_NAMES = {"mt_bench": "MT-bench", "translation": "Translation", "summarization": "Summarization", "qa": "QA",
              "math_reasoning": "Math", "rag": "RAG"}

# Published numbers (KANGAROO.md §5): Vicuna-7B-v1.3, A100 GPU, fp16, greedy, batch 1.
PAPER = [
    # method, overall speedup, mean accepted tokens (None: not published on the leaderboard)
    ("Kangaroo (paper, arXiv 2404.18911)", "up to 1.68", None),
    ("Kangaroo + tree drafting (NeurIPS version)", "up to 2.04", None),
    ("EAGLE-2", "2.36", "4.34"),
    ("EAGLE", "2.10", "3.58"),
    ("Hydra", "2.07", "3.26"),
    ("Medusa", "1.71", "2.31"),
    ("PLD", "1.66", "1.75"),
    ("SpS", "1.52", "2.28"),
    ("REST", "1.48", "1.82"),
    ("Lookahead", "1.34", "1.64"),
]


def _f(v, fmt="{:.2f}", none="–") -> str:
    return none if v is None else fmt.format(v)


def _x(v) -> str:
    return _f(v, "{:.2f}×")


def _pct(v) -> str:
    return _f(v, "{:.0%}")


def overall_table(summary: dict) -> str:
    base = summary.get("baseline")
    rows = [
        f"| Method | Tokens/s | Speedup vs {base or 'AR'} | Speedup vs ar-hf | Prefill share | Decoding speedup | Mean accepted tokens | Acceptance rate | Mean draft length | Identical to AR |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, entry in summary["methods"].items():
        m = entry["overall"]
        ident = "reference" if name == summary.get("reference") else _pct(m.get("identical_fraction"))
        rows.append(
            f"| `{name}` | {_f(m['tokens_per_s'])} | {_x(m.get('speedup'))} | {_x(m.get('speedup_vs_ar_hf'))} | "
            f"{_pct(m.get('prefill_share'))} | {_x(m.get('decode_speedup'))} | {_f(m.get('compression_rate'))} | {_pct(m.get('acceptance_rate'))} | {_f(m.get('mean_draft_length'))} | {ident} |"
        )
    return "\n".join(rows)


def category_table(summary: dict, key: str, fmt) -> str:
    tasks = summary["tasks"]
    rows = ["| Method | " + " | ".join(TASK_NAMES.get(t, t) for t in tasks) + " | Overall |",
            "|---|" + "---:|" * (len(tasks) + 1)]
    for name, entry in summary["methods"].items():
        cells = [fmt(entry["by_category"][t].get(key)) for t in tasks]
        rows.append(f"| `{name}` | " + " | ".join(cells) + f" | {fmt(entry['overall'].get(key))} |")
    return "\n".join(rows)


def ctar_table(summary: dict) -> str | None:
    rows = [(n, e["overall"]["ctar"]) for n, e in summary["methods"].items() if e["overall"].get("ctar")]
    if not rows:
        return None
    width = max(len(c) for _, c in rows)
    out = ["| Method | " + " | ".join(f"w={w}" for w in range(1, width + 1)) + " |", "|---|" + "---:|" * width]
    for name, c in rows:
        out.append(f"| `{name}` | " + " | ".join(_pct(v) for v in c) + " |")
    return "\n".join(out)


def mismatch_table(summary: dict) -> str | None:
    rows = [(n, mm) for n, e in summary["methods"].items() for mm in e["overall"].get("mismatches", [])]
    if not rows:
        return None
    out = ["| Method | Question | Category | Turn | Position | Reference token | Method token | AR top-2 logit gap |",
           "|---|---:|---|---:|---:|---:|---:|---:|"]
    for name, mm in rows:
        out.append(f"| `{name}` | {mm['question_id']} | {mm['category']} | {mm['turn'] + 1} | {mm['position']} | "
                   f"{mm['reference_token']} | {mm['token']} | {_f(mm['top2_logit_gap'], '{:.4f}')} |")
    return "\n".join(out)


def losses(summary: dict, method: str = "kangaroo") -> list[str]:
    """One line per task (and overall) where ``method`` is slower than the headline autoregressive
    baseline or than another method."""
    if method not in summary["methods"]:
        return []
    out = []
    entry = summary["methods"][method]
    for t in summary["tasks"] + ["overall"]:
        def pick(e: dict, t: str = t) -> dict:
            return e["overall"] if t == "overall" else e["by_category"][t]

        m = pick(entry)
        why = []
        if m.get("speedup") is not None and m["speedup"] < 1.0:
            why.append(f"slower than `{summary['baseline']}` ({_x(m['speedup'])})")
        faster = sorted(
            ((n, pick(e)["tokens_per_s"]) for n, e in summary["methods"].items()
             if n not in (method, "ar", "ar-hf", "ar-hf-static") and pick(e).get("tokens_per_s", 0) > m.get("tokens_per_s", 0)),
            key=lambda r: -r[1],
        )
        if faster:
            why.append("beaten by " + ", ".join(f"`{n}` ({v:.2f} vs {m['tokens_per_s']:.2f} tokens/s)" for n, v in faster))
        if why:
            out.append(f"{TASK_NAMES.get(t, t.capitalize())}: " + "; ".join(why) + ".")
    return out


def ar_note(summary: dict) -> str | None:
    """Says which autoregressive loop is fastest, and why that matters for the headline speedup."""
    ms = summary["methods"]
    if "ar" not in ms or "ar-hf" not in ms:
        return None
    tps = {n: ms[n]["overall"]["tokens_per_s"] for n in ("ar", "ar-hf", "ar-hf-static") if n in ms}
    others = ", ".join(f"`{n}` {v:.2f}" for n, v in tps.items() if n != "ar")
    ours = tps["ar"]
    if ours >= max(tps.values()):
        return (f"Our autoregressive loop `ar` ({ours:.2f} tokens/s) is at least as fast as transformers' `generate` "
                f"({others} tokens/s), so headline speedups are measured against `ar`, the hardest baseline.")
    best = max(tps, key=tps.get)
    return (f"Our autoregressive loop `ar` ({ours:.2f} tokens/s) is slower than transformers' `generate` ({others} "
            f"tokens/s; `ar` runs at {ours / tps[best]:.2f}× `{best}`): headline speedups are measured against `{best}`, "
            f"so the overhead of our layer-range forward (the code Kangaroo itself runs) counts against Kangaroo. All "
            f"run the same weights, dtype and threads; `ar` uses our preallocated KV cache, `ar-hf` transformers' "
            f"DynamicCache" + (", `ar-hf-static` its StaticCache." if "ar-hf-static" in tps else "."))


def header(summary: dict) -> str:
    c, mc = summary["config"], summary["machine"]
    qs = ", ".join(f"{TASK_NAMES.get(t, t)} {n}" for t, n in c["questions_per_task"].items())
    load = f"{_f(mc.get('load_average_before'))} before, {_f(mc.get('load_average_after'))} after"
    shares = [mc.get("others_cpu_share_before"), mc.get("others_cpu_share_during")]
    suspect = any(busy(x) for x in shares)
    if all(x is None for x in shares):  # summaries from before the meter existed, or no /proc/stat
        shares_line = f"- 1-minute load average: {load}"
    else:
        shares_line = (f"- CPU used by other processes: {_pct(shares[0])} of all CPUs in the 2 s before the run, "
                       f"{_pct(shares[1])} during it; 1-minute load average {load}, which lags and counts this run")
    return "\n".join([
        f"- Command: `{c['command']}`",
        f"- Date (UTC): {c['date']}",
        f"- Model: `{c['model']}`; adapter: `{c['adapter']}`; ℓ = {c['exit_layer']}, γ = {c['max_steps']}, η = {c['threshold']}",
        f"- Questions: {c['questions']} ({qs}); at most {c['max_new_tokens']} new tokens per turn; {c['warmup']} untimed warm-up generation(s) per method",
        f"- Machine: {mc['cpu']} ({mc['cpu_count']} logical CPUs{', GPU ' + mc['gpu'] if mc.get('gpu') else ''}); "
        f"torch threads {mc['torch_threads']}; engine {_engine(mc)}; torch {mc['torch']}, transformers {mc['transformers']}, Python {mc['python']}",
        shares_line + " (a busy machine slows multi-row matmuls on few cores and makes timings unreliable)",
        f"- Headline baseline: `{summary.get('baseline')}` (the faster autoregressive loop); identity reference: `{summary.get('reference')}`",
    ] + ([f"- **Warning: other processes used more than {BUSY_SHARE:.0%} of the CPUs around this run; treat the timings as unreliable.**"]
         if suspect else []))


DEFINITIONS = """\
- **Tokens/s**: mean over answers of new tokens ÷ wall time (an answer's turns pooled), as Spec-Bench's
  `evaluation/speed.py`; **speedup** is the ratio of those means on the same questions. Warm-up excluded; each turn is
  timed around the generate call only. (speed.py counts the baseline's tokens by re-tokenising its text; we count the
  generated ids for every method.)
- **Prefill share**: time to each turn's first token ÷ wall time (the prefill; the same work for every method on our
  engine). **Decoding speedup**: tokens after each turn's first ÷ the time after it, against the baseline's (our methods
  only: transformers' `generate` reports no first-token time).
- **Mean accepted tokens** (compression rate): new tokens ÷ target forwards, the prefill forward and the bonus token
  counted (Spec-Bench's `accept_lengths` pooled). Autoregressive = 1.00.
- **Acceptance rate**: accepted drafts ÷ drafts verified. **Mean draft length**: drafts verified per verification round.
- **CTAR(w)**: among verification rounds that drafted at least w tokens, the share whose first w drafts were all
  accepted (for `kangaroo-fixed`, η = 0, every round drafts γ: the paper's consistent token acceptance rate).
- **Identical to AR**: share of answers whose token ids equal the reference autoregressive answer in every turn; a
  mismatch lists the reference model's top-2 logit gap at the first differing token (≈ 0 means a float near-tie).
- `pld` runs transformers' assisted generation; its drafted counts come from wrapping transformers' prompt-lookup
  candidate generator, and its first round (prompt + candidates in one forward) counts as a verification round.
  A round where the lookup finds nothing drafts 0 tokens."""


def report_markdown(summary: dict, image_prefix: str = "") -> str:
    parts = ["# kangaroo bench report", "", header(summary), "", "## Overall", "", overall_table(summary), ""]
    note = ar_note(summary)
    if note:
        parts += [note, ""]
    parts += ["## Speedup by category", "", f"Against `{summary.get('baseline')}`.", "",
              category_table(summary, "speedup", _x), "",
              "## Tokens/s by category", "", category_table(summary, "tokens_per_s", _f), "",
              "## Mean accepted tokens by category", "", category_table(summary, "compression_rate", _f), ""]
    ct = ctar_table(summary)
    if ct:
        parts += ["## CTAR(w)", "", ct, ""]
    lost = losses(summary)
    if lost:
        parts += ["## Where Kangaroo loses", "", *[f"- {line}" for line in lost], ""]
    mm = mismatch_table(summary)
    parts += ["## Output identity", ""]
    parts += [mm, ""] if mm else ["Every answer of every method is token-identical to the reference.", ""]
    if summary.get("sweep"):
        parts += ["## Sweep", "", _sweep_table(summary["sweep"]), ""]
    if image_prefix is not None and summary.get("_plots"):
        parts += ["## Plots", ""] + [f"![{p}]({image_prefix}{p})" for p in summary["_plots"]] + [""]
    parts += ["## Definitions", "", DEFINITIONS, ""]
    return "\n".join(parts)


def _sweep_table(sweep: dict) -> str:
    out = ["| Setting | Speedup | Tokens/s | Mean accepted tokens | Acceptance rate | Mean draft length | Identical |",
           "|---|---:|---:|---:|---:|---:|---:|"]
    for r in sweep["ranking"]:
        out.append(f"| `{r['method']}` | {_x(r['speedup'])} | {_f(r['tokens_per_s'])} | {_f(r['compression_rate'])} | "
                   f"{_pct(r['acceptance_rate'])} | {_f(r['mean_draft_length'])} | {_pct(r['identical_fraction'])} |")
    return "\n".join(out)


def write_report(out: Path, summary: dict, plots: bool = True) -> None:
    summary = dict(summary)
    if plots:
        from .plots import make_plots

        summary["_plots"] = make_plots(out, summary)
    else:
        summary["_plots"] = []
    text = report_markdown(summary) + draft_sources_markdown(summary)
    if summary.get("costs"):
        from .costs import table

        text += "\n## Step costs (`--costs`)\n\n" + table(summary["costs"]) + "\n"
    (out / "report.md").write_text(text, encoding="utf-8")


def draft_sources_markdown(summary: dict) -> str:
    """Share of the new tokens that were accepted drafts from each source, per method and task."""
    rows = [(name, e) for name, e in summary["methods"].items() if e["overall"].get("accepted_from") is not None]
    if not rows:
        return ""
    tasks = summary.get("tasks", [])
    lines = ["", "## Where accepted tokens came from", "",
             "Share of each method's new tokens that were accepted drafts, by source (the rest are the target's own tokens).", "",
             "| Method | Source | Overall | " + " | ".join(tasks) + " |", "|---|---|---|" + "---|" * len(tasks)]
    for name, e in rows:
        for source in sorted(e["overall"]["accepted_from"]):
            cells = [_pct(e["by_category"].get(t, {}).get("accepted_from", {}).get(source, 0.0)) for t in tasks]
            lines.append(f"| {name} | {source} | {_pct(e['overall']['accepted_from'][source])} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def print_table(summary: dict, f: TextIO) -> None:
    """A plain-text leaderboard for the terminal."""
    base = summary.get("baseline")
    f.write(f"{'method':<28} {'tok/s':>7} {'speedup':>8} {'vs ar-hf':>8} {'decode':>7} {'MAT':>5} {'accept':>7} {'draft':>6} {'ident':>6}\n")
    for name, e in summary["methods"].items():
        m = e["overall"]
        f.write(f"{name:<28} {_f(m['tokens_per_s']):>7} {_x(m.get('speedup')):>8} {_x(m.get('speedup_vs_ar_hf')):>8} "
                f"{_x(m.get('decode_speedup')):>7} {_f(m.get('compression_rate')):>5} {_pct(m.get('acceptance_rate')):>7} {_f(m.get('mean_draft_length')):>6} "
                f"{_pct(m.get('identical_fraction')):>6}\n")
    f.write(f"(speedup against {base}; decode = the speedup after each turn's first token, the prefill left out; "
            f"MAT = mean accepted tokens per target forward)\n")


# ---------------------------------------------------------------------------- BENCHMARKS.md
TEMPLATE = "BENCHMARKS.template.md"  # the page's prose, next to this module; the numbers come from the run


def benchmarks_markdown(summary: dict, image_dir: str, script: str, sweep: dict | None = None, note: str | None = None) -> str:
    """BENCHMARKS.md: :data:`TEMPLATE` filled with one run's tables, plots and facts."""
    c, mc = summary["config"], summary["machine"]
    adapter = (
        "the **seeded random adapter** (no trained adapter was available when this was run: Kangaroo's numbers below "
        "show the machinery's cost, not the method's benefit)" if c["adapter"] == "random"
        else f"the adapter at `{_short_path(c['adapter'])}` (ℓ = {c['exit_layer']})"
    )
    k = summary["methods"].get("kangaroo", {}).get("overall", {})
    headline = (f"\nHeadline: `kangaroo` overall {_x(k.get('speedup'))} against `{summary.get('baseline')}`, "
                f"{_f(k.get('compression_rate'))} mean accepted tokens, acceptance rate {_pct(k.get('acceptance_rate'))}, "
                f"identical outputs {_pct(k.get('identical_fraction'))}.\n") if k else ""
    training = _training_summary(c.get("adapter_training"))
    training_line = ("\nAdapter training metadata (from its `adapter_config.json`): "
                     + ", ".join(f"{a} = {b}" for a, b in training.items()) + ".\n") if training else ""
    template = resources.files("kangaroo.bench").joinpath(TEMPLATE).read_text(encoding="utf-8")
    return Template(template).substitute(
        script=script, adapter=adapter, note=f"**Note:** {note}\n\n" if note else "", header=header(summary),
        results=_results(summary, image_dir), model=c.get("model", "?"), cpu_count=mc["cpu_count"], engine=_engine(mc),
        questions=c["questions"], max_new_tokens=c["max_new_tokens"], published=_published_table(summary),
        training=training_line, headline=headline, sweep=_sweep_section(sweep), definitions=DEFINITIONS,
        gains=gains_section(summary),
    )


def _results(summary: dict, image_dir: str) -> str:
    """The run's own tables and plots: overall, by category, CTAR, losses, identity."""
    parts = [overall_table(summary), ""]
    note = ar_note(summary)
    if note:
        parts += [note, ""]
    parts += ["### Speedup by category", "", f"Against `{summary.get('baseline')}`.", "",
              category_table(summary, "speedup", _x), "",
              "### Mean accepted tokens by category", "", category_table(summary, "compression_rate", _f), ""]
    ct = ctar_table(summary)
    if ct:
        parts += ["### CTAR(w)", "", ct, ""]
    lost = losses(summary)
    parts += ["### Where Kangaroo loses", ""]
    parts += [f"- {line}" for line in lost] if lost else ["Kangaroo is faster than every other method in every category of this run."]
    sources = draft_sources_markdown(summary)
    if sources:
        parts += [sources.replace("\n## ", "\n### ", 1)]
    parts += ["", "### Output identity", "",
              f"Reference: `{summary.get('reference')}`, plain greedy decoding on the engine Kangaroo runs on. "
              "Methods on other engines (`ar-eager`, `ar-hf`, `pld`: HF's float32 modules) round differently; where "
              "they differ, the table gives the reference's top-2 logit gap at the first differing token.", ""]
    mm = mismatch_table(summary)
    parts += [mm] if mm else ["Every answer of every method is token-identical to the autoregressive reference."]
    if summary.get("costs"):
        from .costs import table

        parts += ["", "### Step costs", "", "From `--costs` in the same run (milliseconds; medians).", "", table(summary["costs"])]
    parts += ["", "### Plots", ""] + [f"![{p}]({image_dir}/{p})" for p in summary.get("_plots", [])]
    return "\n".join(parts)


#: (what is compared, method with it, method without it): the run's own attribution of the gain
GAIN_PAIRS = (
    # "without" = the adapter-only method drafting in kangaroo's shape (gains_section picks it)
    ("prompt-lookup drafts (added to the adapter's drafts)", "kangaroo", "kangaroo-chain|kangaroo-tree"),
    ("the adapter's chain (added to lookup drafts)", "kangaroo", "lookup"),
    ("token trees: siblings at the first draft position (against the chain)", "kangaroo-tree", "kangaroo-chain"),
    ("token trees: the adapter's chain beside every lookup proposal (against choosing one)", "kangaroo+pld", "kangaroo"),
    ("the reduced draft vocabulary (against drafting over the whole vocabulary)", "kangaroo", "kangaroo-full-vocab"),
)


def gains_section(summary: dict) -> str:
    """Which part of the speed-up came from which piece, from pairs of methods in this run."""
    ms = summary["methods"]
    rows = ["| piece | with | without | speed-up with / without | mean accepted tokens with / without |",
            "|---|---|---|---:|---:|"]
    settings = summary.get("config", {}).get("methods", {})
    for what, a, b in GAIN_PAIRS:
        if "|" in b:  # the alternative with the same tree width as `a` (a chain when none matches)
            options = [o for o in b.split("|") if o in ms]
            width = settings.get(a, {}).get("tree_width")
            b = next((o for o in options if settings.get(o, {}).get("tree_width") == width), options[0] if options else b)
        if a in ms and b in ms:
            oa, ob = ms[a]["overall"], ms[b]["overall"]
            rows.append(f"| {what} | `{a}` | `{b}` | {_x(oa.get('speedup'))} / {_x(ob.get('speedup'))} | "
                        f"{_f(oa.get('compression_rate'))} / {_f(ob.get('compression_rate'))} |")
    if len(rows) == 2:
        return ""
    return "\n".join(["", "## Where the gain comes from", "",
                      "Each row compares two methods of this run that differ in one piece (speed-ups against "
                      f"`{summary.get('baseline')}`).", "", *rows, ""])


def _published_table(summary: dict) -> str:
    """The published speedups (:data:`PAPER`) next to this run's Kangaroo-like methods."""
    c, mc, ms = summary["config"], summary["machine"], summary["methods"]
    rows = ["| Method | Setting | Overall speedup | Mean accepted tokens |", "|---|---|---:|---:|"]
    rows += [f"| {name} | Vicuna-7B, A100, fp16 | {sp}× | {mat or '–'} |" for name, sp, mat in PAPER]
    setting = f"{c.get('model', '?')}, {mc['cpu_count']}-core CPU, {_engine(mc)}"
    for name in ("kangaroo", "kangaroo-fixed", "early-exit", "pld"):
        if name in ms:
            o = ms[name]["overall"]
            rows.append(f"| `{name}` (this run) | {setting} | {_x(o.get('speedup'))} | {_f(o.get('compression_rate'))} |")
    return "\n".join(rows)


def _sweep_section(sweep: dict | None) -> str:
    if not (sweep and sweep.get("sweep")):
        return ""
    sc, best = sweep["config"], sweep["sweep"]["best"]
    return "\n".join([
        "", "## Setting sweep", "",
        f"`{sc['command']}` ({sc['date']}; {sc['questions']} questions, at most {sc['max_new_tokens']} new tokens, "
        f"load average {_f(sweep['machine'].get('load_average_before'))}). Speedup against `{sweep.get('baseline')}`.",
        "", _sweep_table(sweep["sweep"]), "",
        f"Best on this machine: `{best['method']}` at {_x(best['speedup'])}." if best else "No setting ran.", "",
    ])


def _training_summary(t: dict | None) -> dict:
    """The few training facts worth a line: data, steps, time and held-out agreement."""
    if not t:
        return {}
    pick = {
        "train conversations": ("data", "train_conversations"),
        "train loss tokens": ("data", "train_loss_tokens"),
        "self-distilled": ("config", "self_distill"),
        "epochs": ("config", "epochs"),
        "steps": ("final_metrics", "steps"),
        "training seconds": ("final_metrics", "train_s"),
        "held-out top-1 agreement": ("final_metrics", "val_agreement"),
        "held-out expected acceptance": ("final_metrics", "val_accept"),
        "adapter parameters": ("adapter_parameters",),
    }
    out = {}
    for label, path in pick.items():
        v = t
        for key in path:
            v = v.get(key) if isinstance(v, dict) else None
        if v is not None:
            out[label] = round(v, 3) if isinstance(v, float) else v
    return out or _scalars(t)


def _scalars(d, prefix: str = "", limit: int = 16) -> dict:
    """Flatten the scalar leaves of a (nested) dict, for a one-line summary."""
    out: dict = {}
    for key, value in (d or {}).items():
        if isinstance(value, dict):
            out.update(_scalars(value, f"{prefix}{key}.", limit))
        elif isinstance(value, (int, float, str, bool)) and len(str(value)) < 80:
            out[f"{prefix}{key}"] = round(value, 4) if isinstance(value, float) else value
    return dict(list(out.items())[:limit])


def _short_path(path: str) -> str:
    p = str(path)
    i = p.find("src/kangaroo/")
    return p[i:] if i >= 0 else p


def write_benchmarks(summary: dict, run_dir: Path, md_path: Path, image_dir: Path, script: str, sweep: dict | None = None,
                     note: str | None = None) -> None:
    """Copy the run's plots into ``image_dir`` and write ``md_path`` (links relative to it)."""
    image_dir.mkdir(parents=True, exist_ok=True)
    plots = [p for p in PLOTS if (run_dir / p).is_file()]
    for p in plots:
        shutil.copyfile(run_dir / p, image_dir / p)
    summary = dict(summary, _plots=plots)
    rel = Path(image_dir).resolve().relative_to(Path(md_path).resolve().parent)
    md_path.write_text(benchmarks_markdown(summary, rel.as_posix(), script, sweep, note), encoding="utf-8")


def _engine(machine: dict) -> str:
    return engine_label(machine.get("engine") or {})


def engine_label(e: dict) -> str:
    """``fused bfloat16/q4_1 + kernel attention + …``: the engine, weight dtype, kernel and the choices
    around them that an engine's info dict (``KangarooModel.engine_info``) records."""
    label = f"{e.get('engine', '?')} {e.get('dtype', '?')}/{e.get('kernel', '?')}"
    label += f" + {e['attention']} attention" if "attention" in e else ""
    label += " + int8 prompt products" if e.get("prompt_product") == "int8" else ""
    tiles = {"bfloat16": " + bfloat16 prompt tiles", "amx": " + bfloat16 AMX prompt tiles"}
    label += tiles.get(e.get("prompt_tiles"), "")
    return label + (" + bfloat16 KV cache" if e.get("kv_dtype") == "bfloat16" else "")


def main(argv: list[str] | None = None) -> int:
    """``python -m kangaroo.bench.report RUN_DIR --md BENCHMARKS.md --images docs/benchmarks --script CMD``."""
    import argparse
    import json

    p = argparse.ArgumentParser(description="write BENCHMARKS.md from a kangaroo bench run folder")
    p.add_argument("run_dir", help="a kangaroo bench --out folder (summary.json + plots)")
    p.add_argument("--md", default="BENCHMARKS.md", help="markdown file to write (default BENCHMARKS.md)")
    p.add_argument("--images", default="docs/benchmarks", help="folder the plots are copied to (default docs/benchmarks)")
    p.add_argument("--script", default="scripts/make_benchmarks.sh", help="the command that produced the run, quoted in the page")
    p.add_argument("--sweep-dir", default=None, help="a kangaroo bench --sweep --out folder to add as a section")
    p.add_argument("--note", default=None, help="a paragraph to print at the top (e.g. where the adapter came from)")
    args = p.parse_args(argv)
    run_dir = Path(args.run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    sweep = json.loads((Path(args.sweep_dir) / "summary.json").read_text()) if args.sweep_dir else None
    write_benchmarks(summary, run_dir, Path(args.md), Path(args.images), args.script, sweep, args.note)
    print(f"wrote {args.md} and {args.images}/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
