"""``kangaroo bench``: Spec-Bench with Kangaroo and its peers, on one machine, in one process.

    kangaroo bench --per-category 2 --max-new-tokens 64 --out runs/bench      # quick run, all methods
    kangaroo bench --methods ar-hf,ar,kangaroo --categories mt_bench,rag
    kangaroo bench --sweep --per-category 1 --sweep-thresholds 0.4,0.6 --sweep-max-steps 4,6

Every method answers the same questions with the same model object (one dtype, one thread setting),
the same ``max_new_tokens`` and EOS ids. Methods run interleaved, question by question (in a rotating
order), so that a slow spell of a shared machine hurts them alike; each method first generates once untimed (warm-up).
Each answer turn is timed around the method's generate call alone (tokenisation excluded, as in
Spec-Bench). MT-bench questions are answered turn by turn: the method's own first answer goes back
into the chat as the assistant's message before the second question.

Outputs in ``--out``: ``summary.json``, ``model_answer/<method>.jsonl`` (Spec-Bench's layout, so its
``evaluation/speed.py`` and ``equal.py`` read them), ``report.md`` and PNG plots. Metric definitions
are in :mod:`kangaroo.bench.metrics`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

from .errors import KangarooError

logger = logging.getLogger(__name__)

DEFAULT_METHODS = "ar-hf,ar-eager,ar,kangaroo,kangaroo-chain,kangaroo-tree,kangaroo+pld,kangaroo-full-vocab,lookup,early-exit,pld"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .cli import add_model_arguments

    add_model_arguments(p)
    g = p.add_argument_group("benchmark")
    g.add_argument("--questions", default=None, help="Spec-Bench question.jsonl (default: $KANGAROO_SPEC_BENCH, else shared/data/spec_bench/question.jsonl found above the working directory)")
    g.add_argument("--categories", default=None, help="comma-separated Spec-Bench tasks (mt_bench, translation, summarization, qa, math_reasoning, rag) or raw categories (default: all)")
    g.add_argument("--per-category", type=int, default=None, help="seeded random sample of K questions per task (default: all)")
    g.add_argument("--sample-seed", type=int, default=0, help="seed of the --per-category sample (default 0)")
    g.add_argument("--methods", default=DEFAULT_METHODS, help=f"comma-separated methods (default: {DEFAULT_METHODS})")
    g.add_argument("--max-new-tokens", type=int, default=128, help="most new tokens per answer turn (default 128)")
    g.add_argument("--out", default="runs/bench", help="output folder (default runs/bench)")
    g.add_argument("--warmup", type=int, default=1, help="untimed warm-up generations per method (default 1)")
    g.add_argument("--pld-tokens", type=int, default=10, help="pld: tokens proposed per lookup (default 10)")
    g.add_argument("--no-plots", action="store_true", help="skip the PNG plots (no matplotlib needed)")
    g.add_argument("--costs", action="store_true", help="also measure step costs (forward over 1-16 tokens, draft step, LM head) of the engine and of float32 eager: costs.json + a table in report.md")
    g.add_argument("--costs-only", action="store_true", help="measure the step costs only (no Spec-Bench questions)")
    s = p.add_argument_group("sweep")
    s.add_argument("--sweep", action="store_true", help="instead of the methods, run Kangaroo over an ℓ/η/γ grid against the autoregressive baselines and print the best setting")
    s.add_argument("--sweep-thresholds", default="0.4,0.6,0.8", help="η values (default 0.4,0.6,0.8)")
    s.add_argument("--sweep-max-steps", default="3,6", help="γ values (default 3,6)")
    s.add_argument("--sweep-adapters", default=None, help="comma-separated adapter folders, one per ℓ to try (default: the loaded adapter)")
    s.add_argument("--sweep-exit-layers", default=None, help="with --adapter random only: ℓ values to try with seeded random adapters")


def run(args) -> int:
    """``kangaroo bench``."""
    from .bench import methods as M
    from .bench.metrics import AR_BASELINES
    from .bench.questions import load_questions
    from .cli import load_from_args

    if args.max_new_tokens <= 0:
        raise KangarooError(f"--max-new-tokens must be > 0, got {args.max_new_tokens}")
    if args.warmup < 0:
        raise KangarooError(f"--warmup must be >= 0, got {args.warmup}")
    names = _csv(args.methods)
    if not names:
        raise KangarooError("--methods is empty")
    categories = _csv(args.categories) if args.categories else None
    # --costs-only needs no questions (a user without the Spec-Bench file can still measure costs)
    questions = None if args.costs_only else load_questions(args.questions, categories, args.per_category, args.sample_seed)
    out = Path(args.out)
    from .contention import ContentionMeter, busy, others_share

    before = others_share()  # 2 s with this process idle
    if busy(before):
        print(f"warning: other processes are using {before:.0%} of the CPUs: timings will be unreliable", file=sys.stderr)
    if args.device == "cpu" and args.engine != "eager":
        # the kernels' first compile on this machine (~80 s of compiler processes) is this run's own
        # work, done before any timing: it must not count as other processes competing with them
        from . import attention

        attention.load()
    load_before, meter = _loadavg(), ContentionMeter().start()

    km = load_from_args(args)
    costs = None
    if args.costs or args.costs_only:
        from .bench.costs import measure_run, table

        costs = measure_run(km)
        out.mkdir(parents=True, exist_ok=True)
        (out / "costs.json").write_text(json.dumps(costs, indent=2) + "\n")
        print(table(costs))
        if args.costs_only:
            print(f"\nwrote {out}/costs.json", file=sys.stderr)
            return 0
    options = M.Options(pld_tokens=args.pld_tokens)
    if args.sweep:
        methods = M.build([n for n in names if n in AR_BASELINES] or ["ar-hf", "ar"], km, options)
        methods += _sweep_variants(args, km, options)
    else:
        methods = M.build(names, km, options)
    if km.adapter_is_random and any(m.reports_drafts and m.name != "early-exit" for m in methods):
        print("note: Kangaroo runs with a seeded random adapter (no trained adapter given): few drafts are accepted", file=sys.stderr)

    answers, prompts = run_methods(km, methods, questions, args.max_new_tokens, args.warmup)
    # identity is promised against plain decoding on the same engine; HF's loops run other kernels
    # (and in float32 when the engine runs bfloat16), so their differences are reported, not required
    reference = next((b for b in ("ar", "ar-eager", "ar-hf") if b in answers), None)
    if reference:
        check_identical(km, answers, prompts, reference)

    from .bench.metrics import summarize

    summary = summarize(answers, {m.name: m.max_draft for m in methods})
    summary["reference"] = reference
    summary["config"] = _config(args, km, methods, questions)
    during = meter.stop()  # model loading, every method and the identity check
    summary["machine"] = _machine(args, km, load_before, _loadavg())
    summary["machine"].update(others_cpu_share_before=before, others_cpu_share_during=during)
    if busy(during):
        print(f"warning: other processes used {during:.0%} of the CPUs during the run: timings are unreliable", file=sys.stderr)
    if args.sweep:
        summary["sweep"] = _best(summary, [m.name for m in methods if m.name not in AR_BASELINES])
    if costs is not None:
        summary["costs"] = costs
    write_outputs(out, summary, answers)
    from .bench.report import print_table, write_report

    write_report(out, summary, plots=not args.no_plots)
    print_table(summary, sys.stdout)
    if args.sweep:
        best = summary["sweep"]["best"]
        print(f"\nbest setting on this machine: {best['method']} speedup {_x(best['speedup'])} (vs {summary['baseline']})" if best else "\nno setting ran")
    print(f"\nwrote {out}/summary.json, {out}/report.md, {out}/model_answer/*.jsonl" + ("" if args.no_plots else ", plots"), file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------- running
def run_methods(km, methods, questions, max_new_tokens: int, warmup: int = 1):
    """Answer every question with every method (interleaved per question).

    Returns:
        ``(answers, prompts)``: ``answers[method]`` = answer records (Spec-Bench layout, in question
        order); ``prompts[method][question_id]`` = the prompt ids of each turn (for the identity check).
    """
    import torch
    from tqdm import tqdm

    sync = torch.cuda.synchronize if km.backbone.device.type == "cuda" else (lambda: None)
    # warm-up: first calls pay for lazy initialisation, allocator growth and code paths not yet taken
    if warmup:
        ids = _encode(km, [{"role": "user", "content": questions[0]["turns"][0]}])
        for m in methods:
            for _ in range(warmup):
                m.generate(ids, min(16, max_new_tokens))
    answers = {m.name: [] for m in methods}
    prompts = {m.name: {} for m in methods}
    model_id = km.model_name
    bar = tqdm(questions, desc="bench", unit="q", disable=None, file=sys.stderr)
    for i, q in enumerate(bar):
        # rotate the order per question so that no method always runs first (or right after another)
        for m in methods[i % len(methods):] + methods[: i % len(methods)]:
            m.new_conversation()  # no prompt kept from the warm-up or the last question; turns may reuse
            messages, turns, new_tokens, wall, accept, drafts, token_ids, turn_prompts = [], [], [], [], [], [], [], []
            sources, cached, first = [], [], []
            for turn in q["turns"]:
                messages.append({"role": "user", "content": turn})
                ids = _encode(km, messages)
                sync()
                start = time.perf_counter()
                r = m.generate(ids, max_new_tokens)
                sync()
                wall.append(time.perf_counter() - start)
                text = km.decode(r.token_ids)
                messages.append({"role": "assistant", "content": text})
                turns.append(text)
                new_tokens.append(len(r.token_ids))
                accept.extend(r.accept_lengths)
                if r.draft_lengths is not None:
                    drafts.extend(r.draft_lengths)
                if r.draft_sources is not None:
                    sources.extend(r.draft_sources)
                token_ids.append(r.token_ids)
                turn_prompts.append(ids[0].tolist())
                cached.append(r.cached_tokens)
                first.append(r.first_token_s)
            choice = {"index": 0, "turns": turns, "new_tokens": new_tokens, "wall_time": wall, "accept_lengths": accept}
            if m.reports_drafts:
                choice["draft_lengths"] = drafts
            if sources:
                choice["draft_sources"] = sources
            if None not in first:
                choice["first_token_time"] = first
            choice["cached_tokens"] = cached  # ours: prompt tokens per turn kept from the turn before
            choice.update(token_ids=token_ids, identical=None, mismatch=None)
            answers[m.name].append({
                "question_id": q["question_id"],
                "category": q["category"],
                "answer_id": f"{q['question_id']}-{m.name}",
                "model_id": f"{model_id}-{m.name}",
                "choices": [choice],
                "tstamp": time.time(),
            })
            prompts[m.name][q["question_id"]] = turn_prompts
    return answers, prompts


def _encode(km, messages):
    """Chat template when the model has one; else the turns joined as plain text."""
    if km.has_chat_template:
        return km.encode(messages)
    return km.encode("\n\n".join(m["content"] for m in messages), chat=False)


def check_identical(km, answers: dict, prompts: dict, reference: str) -> None:
    """Mark each answer identical to the reference's or not; at the first differing token, record its
    turn, position, both tokens and the reference model's top-2 logit gap (untimed extra forward, on
    the reference's engine)."""
    import torch

    from .decoding import next_token_logits

    engine = km.engine if reference == "ar" else km.backbone
    ref = {a["question_id"]: a for a in answers[reference]}
    for name, rows in answers.items():
        for a in rows:
            choice = a["choices"][0]
            if name == reference:
                choice["identical"] = True
                continue
            ref_choice = ref[a["question_id"]]["choices"][0]
            choice["identical"] = choice["token_ids"] == ref_choice["token_ids"]
            if choice["identical"]:
                continue
            for turn, (mine, theirs) in enumerate(zip(choice["token_ids"], ref_choice["token_ids"])):
                if mine == theirs:
                    continue
                pos = next((i for i, (x, y) in enumerate(zip(mine, theirs)) if x != y), min(len(mine), len(theirs)))
                context = prompts[reference][a["question_id"]][turn] + theirs[:pos]
                logits = next_token_logits(engine, torch.tensor([context], device=engine.device))
                top2 = logits.topk(2).values
                choice["mismatch"] = {
                    "turn": turn,
                    "position": pos,
                    "reference_token": theirs[pos] if pos < len(theirs) else None,
                    "token": mine[pos] if pos < len(mine) else None,
                    "top2_logit_gap": float(top2[0] - top2[1]),
                }
                break


def _sweep_variants(args, km, options):
    """Kangaroo variants over (adapter ℓ) × γ × η. ℓ only where an adapter exists; random adapters only
    when ``--adapter random`` was asked for."""
    from .adapter import Adapter
    from .bench.methods import KangarooVariant
    from .config import KangarooConfig

    adapters = []  # (module, ℓ, label)
    if args.sweep_adapters:
        for path in _csv(args.sweep_adapters):
            module, cfg = Adapter.load(path, km.backbone)
            adapters.append((module, cfg.exit_layer, path))
    elif km.adapter_is_random:
        if args.adapter != "random":
            raise KangarooError("--sweep needs a trained adapter: pass --sweep-adapters DIR[,DIR] (or --adapter random to sweep random adapters)")
        layers = [int(x) for x in _csv(args.sweep_exit_layers)] if args.sweep_exit_layers else [km.config.exit_layer]
        for ℓ in layers:
            adapters.append((km.adapter if ℓ == km.config.exit_layer else Adapter.random(km.backbone, ℓ, seed=args.seed), ℓ, "random"))
    else:
        if args.sweep_exit_layers:
            raise KangarooError("--sweep-exit-layers needs --adapter random; for trained adapters pass --sweep-adapters DIR,DIR (one per ℓ)")
        adapters.append((km.adapter, km.config.exit_layer, km.adapter_source))
    try:
        thresholds = [float(x) for x in _csv(args.sweep_thresholds)]
        steps = [int(x) for x in _csv(args.sweep_max_steps)]
    except ValueError as exc:
        raise KangarooError(f"bad sweep grid: {exc}") from None
    variants = []
    for module, ℓ, label in adapters:
        for γ in steps:
            for η in thresholds:
                cfg = KangarooConfig(exit_layer=ℓ, max_steps=γ, threshold=η)
                variants.append(KangarooVariant(km, options, module, cfg, f"kangaroo[l={ℓ},g={γ},e={η:g}]", label))
    if not variants:
        raise KangarooError("the sweep grid is empty")
    return variants


def _best(summary: dict, names: list[str]) -> dict:
    rows = [(n, summary["methods"][n]["overall"]) for n in names]
    ranked = sorted(rows, key=lambda r: -(r[1].get("speedup") or 0.0))
    table = [{"method": n, **{k: m.get(k) for k in ("speedup", "tokens_per_s", "compression_rate", "acceptance_rate", "mean_draft_length", "identical_fraction")}} for n, m in ranked]
    return {"best": table[0] if table else None, "ranking": table}


# ---------------------------------------------------------------------------- outputs
def write_outputs(out: Path, summary: dict, answers: dict) -> None:
    """``summary.json`` and one Spec-Bench answer file per method."""
    answer_dir = out / "model_answer"
    answer_dir.mkdir(parents=True, exist_ok=True)
    for name, rows in answers.items():
        with open(answer_dir / f"{name}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(a, ensure_ascii=False) + "\n" for a in rows)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")


def _config(args, km, methods, questions) -> dict:
    from .bench.questions import default_question_file, task_of

    counts: dict[str, int] = {}
    for q in questions:
        counts[task_of(q["category"])] = counts.get(task_of(q["category"]), 0) + 1
    adapter_cfg = km.adapter_config
    return {
        "command": ("kangaroo " if Path(sys.argv[0]).name in ("kangaroo", "cli.py") else sys.argv[0] + " ") + " ".join(sys.argv[1:]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": km.model_name,
        "adapter": km.adapter_source,
        "adapter_exit_layer": km.config.exit_layer,
        "adapter_training": (adapter_cfg.training if adapter_cfg is not None else None),
        "exit_layer": km.config.exit_layer,
        "max_steps": km.config.max_steps,
        "threshold": km.config.threshold,
        "verify_low_confidence": km.config.verify_low_confidence,
        "engine": km.engine_info,
        "device": args.device,
        "max_new_tokens": args.max_new_tokens,
        "warmup": args.warmup,
        "questions_file": str(args.questions or default_question_file()),
        "categories": args.categories,
        "per_category": args.per_category,
        "sample_seed": args.sample_seed,
        "questions": len(questions),
        "questions_per_task": counts,
        "methods": {m.name: {"description": m.description, "max_draft": m.max_draft, **m.settings()} for m in methods},
    }


def _machine(args, km, load_before, load_after) -> dict:
    import torch
    import transformers

    from .calibration import machine

    m = machine()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() and args.device.startswith("cuda") else None
    return {
        "cpu": m["cpu"],
        "cpu_flags": m["cpu_flags"],
        "cpu_count": m["cpu_count"],
        "gpu": gpu,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "threads_option": args.threads,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "engine": km.engine_info,
        "load_average_before": load_before,
        "load_average_after": load_after,
    }


def _loadavg() -> float | None:
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return None


def _csv(text: str | None) -> list[str]:
    return [x.strip() for x in (text or "").split(",") if x.strip()]


def _x(v) -> str:
    return "n/a" if v is None else f"{v:.2f}x"
