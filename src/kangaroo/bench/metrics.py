"""Every benchmark number, computed from answer records alone.

Answer records use Spec-Bench's ``model_answer`` layout (one JSON object per question and method)::

    {"question_id", "category", "model_id",
     "choices": [{"index": 0, "turns": [str], "new_tokens": [int], "wall_time": [float],
                  "accept_lengths": [int],                  # Spec-Bench: tokens per target forward
                  "draft_lengths": [int] | absent,          # ours: drafts verified per target forward
                  "cached_tokens": [int] | absent,          # ours: prompt tokens per turn kept from the turn before
                  "first_token_time": [float] | absent,     # ours: seconds from the call to each turn's first token
                  "token_ids": [[int]], "identical": bool | null, "mismatch": {...} | null}]}

Definitions (Spec-Bench's ``evaluation/speed.py`` for the first three):

- **tokens/s** of a method on a set of answers: the mean over answers of
  ``sum(new_tokens) / sum(wall_time)`` (an answer's turns pooled; warm-up excluded by the runner).
- **speedup**: tokens/s of the method ÷ tokens/s of the baseline on the same answers.
- **prefill share**: time to each turn's first token (the prefill, which every method pays alike)
  ÷ wall time, pooled; **decoding tokens/s**: the same mean as tokens/s over what follows the first
  token, ``(sum(new_tokens) - turns) / (sum(wall_time) - sum(first_token_time))``, and **decoding
  speedup** its ratio to the baseline's (methods that record first-token times only).
- **compression rate** (Spec-Bench's "#Mean accepted tokens"): the mean of all ``accept_lengths``
  pooled over answers = new tokens ÷ target forwards, the prefill forward and the bonus token
  counted. Autoregressive decoding has exactly 1.00.
- **acceptance rate**: accepted drafts ÷ drafts verified, pooled over rounds. A round with
  ``accept_length`` tokens accepted ``accept_length − 1`` drafts.
- **CTAR(w)**, w = 1..γ: among verification rounds that drafted at least ``w`` tokens, the fraction
  whose first ``w`` drafts were all accepted. (Rounds cut short by the second early exit do not count
  against longer ``w``; with η = 0, as in ``kangaroo-fixed``, every round drafts γ and this is the
  paper's consistent token acceptance rate.)
- **mean draft length**: drafts verified per verification round (the prefill forward excluded).
- **identical fraction**: answers whose token ids equal the reference autoregressive answer's in
  every turn (``mismatch`` records the first differing turn and position and the reference model's
  top-2 logit gap there: a tiny gap means a numerical near-tie, not a bug in acceptance).
"""

from __future__ import annotations

from statistics import mean

from .questions import task_of, task_order

AR_BASELINES = ("ar", "ar-eager", "ar-hf", "ar-hf-static")  # autoregressive baselines; the fastest that ran is the headline baseline


def answer_speed(answer: dict, after_first: bool = False) -> float:
    """new tokens / wall time of one answer, turns pooled (speed.py's per-answer speed); with
    ``after_first``, of what follows each turn's first token (the decoding, the prefill left out)."""
    c = answer["choices"][0]
    tokens, t = sum(c["new_tokens"]), sum(c["wall_time"])
    if after_first:
        tokens, t = tokens - len(c["new_tokens"]), t - sum(c["first_token_time"])
    return tokens / t if t > 0 else 0.0


def group_metrics(answers: list[dict], max_steps: int) -> dict:
    """Metrics of one method over a set of answers (see the module docstring)."""
    if not answers:
        return {}
    choices = [a["choices"][0] for a in answers]
    lengths = [n for c in choices for n in c["accept_lengths"]]
    has_drafts = all(c.get("draft_lengths") is not None for c in choices)
    m = {
        "answers": len(answers),
        "tokens_per_s": mean(answer_speed(a) for a in answers),
        "new_tokens": sum(sum(c["new_tokens"]) for c in choices),
        "wall_time": sum(sum(c["wall_time"]) for c in choices),
        "target_forwards": len(lengths),
        "compression_rate": mean(lengths) if lengths else None,
        "acceptance_rate": None,
        "ctar": None,
        "mean_draft_length": None,
    }
    if all(c.get("first_token_time") is not None for c in choices):
        first = sum(sum(c["first_token_time"]) for c in choices)
        m["prefill_share"] = first / m["wall_time"] if m["wall_time"] else None
        m["decode_tokens_per_s"] = mean(answer_speed(a, after_first=True) for a in answers)
    if has_drafts:
        rs = [r for c in choices for r in verification_rounds(c)]
        drafted = sum(d for d, _ in rs)
        m["acceptance_rate"] = sum(a for _, a in rs) / drafted if drafted else 0.0
        m["mean_draft_length"] = drafted / len(rs) if rs else 0.0
        m["ctar"] = ctar(rs, max_steps)
    hist: dict[int, int] = {}
    for c in choices:
        if c.get("draft_lengths") is not None:
            committed = [a + 1 for _, a in verification_rounds(c)]
        else:
            starts = set(_turn_starts(c))
            committed = [n for i, n in enumerate(c["accept_lengths"]) if i not in starts]
        for n in committed:
            hist[n] = hist.get(n, 0) + 1
    m["accept_length_histogram"] = {str(k): hist[k] for k in sorted(hist)}  # verification rounds only
    if all(c.get("draft_sources") is not None for c in choices):
        # share of the new tokens that were accepted drafts of each source (the rest: the target's own)
        shares: dict[str, int] = {}
        for c in choices:
            for source, n in zip(c["draft_sources"], c["accept_lengths"]):
                if source:
                    shares[source] = shares.get(source, 0) + n - 1
        m["accepted_from"] = {k: v / m["new_tokens"] for k, v in sorted(shares.items())} if m["new_tokens"] else {}
    flags = [c.get("identical") for c in choices if c.get("identical") is not None]
    m["identical_fraction"] = mean(1.0 if f else 0.0 for f in flags) if flags else None
    return m


def verification_rounds(choice: dict) -> list[tuple[int, int]]:
    """``(drafted, accepted)`` per verification round of one answer. Each turn's prefill (its first
    forward, when it verified no drafts) is left out; transformers' assisted generation verifies
    candidates in its first forward already, and such a round counts."""
    drafts, lengths = choice["draft_lengths"], choice["accept_lengths"]
    starts = set(_turn_starts(choice))
    return [(d, n - 1) for i, (d, n) in enumerate(zip(drafts, lengths)) if not (i in starts and d == 0)]


def _turn_starts(choice: dict) -> list[int]:
    """Index in ``accept_lengths`` of each turn's prefill forward (turns' lengths sum to new_tokens)."""
    starts, i = [], 0
    lengths = choice["accept_lengths"]
    for n in choice["new_tokens"]:
        starts.append(i)
        total = 0
        while i < len(lengths) and total < n:
            total += lengths[i]
            i += 1
    return starts


def ctar(rounds_: list[tuple[int, int]], max_steps: int) -> list[float | None]:
    """CTAR(w) for w = 1..max_steps over ``(drafted, accepted)`` rounds; None where no round drafted ≥ w."""
    out = []
    for w in range(1, max_steps + 1):
        eligible = [a for d, a in rounds_ if d >= w]
        out.append(sum(a >= w for a in eligible) / len(eligible) if eligible else None)
    return out


def summarize(answers: dict[str, list[dict]], max_steps: int | dict[str, int]) -> dict:
    """``{"baseline": NAME | None, "methods": {NAME: {"overall": M, "by_category": {TASK: M}}}}``.

    ``max_steps``: the largest CTAR ``w`` (γ), one for all methods or per method name.
    Speedups are against the fastest (overall tokens/s) of the autoregressive baselines that ran
    (``speedup``), and against ``ar-hf`` and ``ar`` individually when they ran.
    """
    tasks = task_order({task_of(a["category"]) for rows in answers.values() for a in rows})
    methods: dict[str, dict] = {}
    for name, rows in answers.items():
        w = max_steps.get(name, 0) if isinstance(max_steps, dict) else max_steps
        methods[name] = {
            "overall": group_metrics(rows, w),
            "by_category": {t: group_metrics([a for a in rows if task_of(a["category"]) == t], w) for t in tasks},
        }
        methods[name]["overall"]["mismatches"] = [
            {"question_id": a["question_id"], "category": a["category"], **a["choices"][0]["mismatch"]}
            for a in rows
            if a["choices"][0].get("mismatch")
        ]
    ran = [b for b in AR_BASELINES if b in methods]
    baseline = max(ran, key=lambda b: methods[b]["overall"]["tokens_per_s"]) if ran else None
    for name, entry in methods.items():
        for m in (entry["overall"], *entry["by_category"].values()):
            for b, key, rate in ((baseline, "speedup", "tokens_per_s"), ("ar-hf", "speedup_vs_ar_hf", "tokens_per_s"),
                                 ("ar", "speedup_vs_ar", "tokens_per_s"), (baseline, "decode_speedup", "decode_tokens_per_s")):
                ref = None
                if b in methods:
                    ref = methods[b]["overall"] if m is entry["overall"] else _same_task(methods[b], entry, m)
                mine, theirs = m.get(rate), (ref or {}).get(rate)
                m[key] = mine / theirs if mine is not None and theirs else None
    return {"baseline": baseline, "tasks": tasks, "methods": methods}


def _same_task(base_entry: dict, entry: dict, m: dict) -> dict | None:
    for task, value in entry["by_category"].items():
        if value is m:
            return base_entry["by_category"].get(task)
    return None
