"""``kangaroo tune``: choose γ, η and the lookup settings that are fastest on this machine.

Speed = tokens per round ÷ cost per round, and both depend on the machine and the adapter: how much a
draft step, a verification of ``k`` tokens and a plain step cost (``kangaroo.bench.costs``), and how
often the adapter's and prompt lookup's drafts are right. Greedy Kangaroo commits exactly the plain
greedy tokens, so every setting can be replayed without decoding again:

1. decode each tuning prompt once with plain greedy decoding;
2. at every position of that answer, record the adapter's chain of ``γ_max`` drafts with their
   top-1 probabilities (drafting from the committed prefix, as a real round does), and what prompt
   lookup would propose for each n-gram length;
3. replay each setting of the grid over those records (which tokens it drafts, how many verification
   accepts, how far it advances) and price its rounds with the measured step costs, plus what real
   decodes of a few of the prompts show a round and a plain step cost beyond those steps
   (:func:`calibrate`: the loop's own work; without it the model ran ~0.2x above measured speed-ups).

The setting with the most tokens per modelled second is written to ``$KANGAROO_CACHE/tuned/`` for
this machine, thread count, engine, model and adapter; :meth:`kangaroo.api.KangarooModel.from_pretrained`
uses it for every setting the caller leaves unset. Prompts: ``kangaroo/data/tune_prompts.json`` (chat,
maths, code, role play, summaries, passage QA, translation; none from Spec-Bench) or ``--prompts``.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import logging
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from .contention import ContentionMeter, busy
from .errors import KangarooError

logger = logging.getLogger(__name__)

THRESHOLDS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
MAX_STEPS = (1, 2, 3, 4, 5, 6, 8)
# short proposals too: verification is flat in rows only up to a few (docs/ENGINE.md §8)
LOOKUP_TOKENS = (0, 2, 3, 4, 6, 8, 10, 12)
BRANCH_LOOKUP_TOKENS = 6  # a lookup branch's length where the chain it is added to had none
LOOKUP_NGRAMS = (1, 2, 3)
VERIFY_LOW = (False, True)  # also verify the token that fell below η (its draft step is paid already)
TREE_WIDTHS = (1, 2, 3)  # the adapter's candidates at the first draft position (1 = a chain)
TREE_THRESHOLDS = (0.05, 0.1, 0.2)  # the draft probability a sibling needs


@dataclass
class Position:
    """What a round starting after committed position ``p`` would see."""

    chain: list[int]  # the adapter's greedy drafts d_1..d_γmax from this prefix
    confidences: list[float]  # their top-1 probabilities
    lookup: dict[int, list[int]]  # n-gram length -> proposal (longest matching n-gram >= n first)
    truth: list[int]  # the greedy tokens that follow
    siblings: list[tuple[int, float]] = ()  # the adapter's next candidates at depth 1, with probabilities


def record(km, ids, max_new_tokens: int, max_chain: int, max_lookup: int) -> list[Position]:
    """Steps 1 and 2 for one prompt ``ids`` ``[1, n]``."""
    import torch

    from .kv_cache import KVCache
    from .lookup import NgramIndex

    engine, ℓ = km.engine, km.config.exit_layer
    answer = km.baseline.generate(ids, max_new_tokens, km.eos_token_ids).token_ids
    seq = ids[0].tolist() + answer
    n0 = ids.shape[1]
    decoder = km.decoder
    drafter = decoder.drafter
    cache = KVCache(engine.num_layers, len(seq) + max_chain + 2)
    full = torch.tensor([seq], device=engine.device)
    with torch.no_grad():
        h = engine.run_layers(0, ℓ, engine.embed(full), cache, 0)  # exit states of every position
        drafter.start(h)
        engine.adapter_forward(km.adapter, h, drafter.cache, 0)  # the adapter's cache over all of them
    chain_config = replace(km.config, threshold=0.0, max_steps=max_chain, lookup_tokens=0,
                           tree_width=max(TREE_WIDTHS), tree_threshold=0.0, lookup_branch=False)
    indices = {n: NgramIndex(max_ngram=max(3, n), min_ngram=n) for n in LOOKUP_NGRAMS}
    for index in indices.values():
        index.reset(seq[:n0])
    positions = []
    saved = drafter.config
    drafter.config = chain_config
    try:
        for p in range(n0, len(seq)):  # the last committed token is seq[p - 1]... round after seq[:p+1]
            pos = p  # position of y0 = seq[p]
            cache.crop(pos)
            drafter.cache.crop(pos)
            drafter.pending = None
            d = drafter.draft(seq[p], pos, cache, max_chain, km.eos_token_ids)
            for index in indices.values():
                index.extend([seq[p]])
            tokens, leaves = d.tokens.tolist(), d.leaf_probs or []
            chain = tokens[: len(tokens) - len(leaves)]
            positions.append(Position(chain, d.confidences, {n: index.propose(max_lookup) for n, index in indices.items()},
                                      seq[p + 1:], list(zip(tokens[len(chain):], leaves))))
    finally:
        drafter.config = saved
    return positions


def _interp(table: dict, k: int) -> float:
    """Cost of a ``k``-row step from a ``{rows: ms}`` table (linear between measured row counts)."""
    keys = sorted(int(x) for x in table)
    vals = {int(x): v for x, v in table.items()}
    if k <= keys[0]:
        return vals[keys[0]]
    for a, b in zip(keys, keys[1:]):
        if k <= b:
            return vals[a] + (vals[b] - vals[a]) * (k - a) / (b - a)
    return vals[keys[-1]] * k / keys[-1]


def replay(positions: list[Position], config, costs: dict) -> tuple[int, int, float]:
    """Step 3 for one answer: ``(tokens, rounds, modelled ms)`` of ``config`` (a KangarooConfig)."""
    share = costs["exit_layer"] / costs["num_layers"]  # layers [0, ℓ) of a forward, LM head excluded

    def shallow_ms(rows: int) -> float:
        return (_interp(costs["forward_ms"], rows) - costs["lm_head_ms"]) * share

    def draft_ms(steps: int) -> float:  # a round's first step reloads the draft path's weights
        if not steps or "draft_first_ms" not in costs:
            return steps * costs["draft_step_ms"]
        return costs["draft_first_ms"] + (steps - 1) * costs["draft_next_ms"]

    def agree(drafts: list[int], truth: list[int]) -> int:
        m = 0
        while m < len(drafts) and m < len(truth) and drafts[m] == truth[m]:
            m += 1
        return m

    end = len(positions) - 1  # positions[-1] follows the last token: no round starts there
    p, tokens, rounds, ms = 0, 0, 0, 0.0
    while p < end:
        pos = positions[p]
        proposal = []
        if config.lookup_tokens:
            proposal = pos.lookup.get(config.lookup_ngram, [])[: config.lookup_tokens]
        rows, m, cost = 0, 0, 0.0
        branches, resident = 1, True  # tree branches verified, whether the accepted path is the last written
        if proposal:  # one shallow pass over y0 + proposal
            rows, m, cost = len(proposal), agree(proposal, pos.truth), shallow_ms(len(proposal) + 1)
        if not proposal or (config.lookup_branch and config.max_steps):
            # the adapter's chain (a second branch after a proposal, where it does not repeat its first token)
            avoid = proposal[0] if proposal else None
            drafts, steps, low = [], 0, False
            for tok, conf in zip(pos.chain[: config.max_steps], pos.confidences[: config.max_steps]):
                steps += 1
                if steps == 1 and tok == avoid:
                    break
                if conf < config.threshold:
                    low = True
                    if config.verify_low_confidence:
                        drafts.append(tok)
                    break
                drafts.append(tok)
            cost += draft_ms(steps) + (shallow_ms(1) if drafts and len(drafts) == steps else 0.0)
            if not proposal and not drafts and not low:
                cost += shallow_ms(1)  # y0's own exit state, when nothing was drafted
            leaves = [t for t, prob in pos.siblings[: config.tree_width - 1] if prob >= config.tree_threshold and t != avoid]
            if low and not drafts:
                leaves = []
            cost += len(leaves) * shallow_ms(1)
            rows += len(drafts) + len(leaves)
            branches += len(leaves) + int(bool(proposal and drafts))
            on_chain, on_leaf = agree(drafts, pos.truth), int(bool(pos.truth) and pos.truth[0] in leaves)
            if max(on_chain, on_leaf) > m:
                m, resident = max(on_chain, on_leaf), on_leaf > on_chain or not leaves
            elif m and drafts:
                resident = False  # the proposal's rows, overwritten by the adapter's branch
        if branches > 1:
            # each further branch is its own cache segment (costs["tree_extra_ms"]); an accepted path that
            # a later branch overwrote is copied back and its shallow layers recomputed
            cost += _interp(costs.get("tree_extra_ms") or {"1": 0.0}, branches - 1)
            cost += 0.0 if resident or not m else shallow_ms(m)
        ms += cost + _interp(costs["verify_ms"], rows + 1)
        rounds += 1
        advance = min(m + 1, end - p)
        tokens += advance
        p += advance
    return tokens, rounds, ms


#: prompts decoded for real to calibrate what the replay does not see
CALIBRATION_PROMPTS = 4


def calibrate(km, encoded: list, recorded: list[list[Position]], max_new_tokens: int, costs: dict) -> dict:
    """What a round and a plain step cost beyond the priced steps, from real decodes: ``{"round_ms",
    "step_ms"}``, each at least 0. The step costs are minima over repeats at one context length and
    leave out the loop's own work; on the AMD machine a round came to 0.89 ms more than its priced
    steps and a plain step to 0.27 ms more (18:10; the Python work itself is ~0.1 ms a round).

    The prompts ``encoded`` are decoded with plain greedy decoding and with Kangaroo at ``km.config``
    (after one untimed warm-up of each; the prefill left out); the replay of the same rounds (greedy
    Kangaroo commits the same tokens in the same rounds) gives what the step costs account for, and
    the rest, per round or per plain step, is charged to every setting alike."""
    decoder, baseline, eos = km.decoder, km.baseline, km.eos_token_ids
    real_ms = model_ms = plain_ms = 0.0
    rounds = steps = 0
    if encoded:  # warm-up
        decoder.generate(encoded[0], max_new_tokens, eos)
        baseline.generate(encoded[0], max_new_tokens, eos)
    for ids, positions in zip(encoded, recorded):
        kang = decoder.generate(ids, max_new_tokens, eos)
        plain = baseline.generate(ids, max_new_tokens, eos)
        _, replayed_rounds, ms = replay(positions, km.config, costs)
        real_ms += (kang.total_s - kang.prefill_s) * 1e3
        model_ms += ms
        rounds += replayed_rounds
        plain_ms += (plain.total_s - plain.prefill_s) * 1e3
        steps += plain.new_tokens - 1
    round_ms = max(0.0, (real_ms - model_ms) / rounds) if rounds else 0.0
    step_ms = max(0.0, plain_ms / steps - costs["forward_ms"]["1"]) if steps else 0.0
    return {"round_ms": round(round_ms, 3), "step_ms": round(step_ms, 3), "prompts": len(encoded), "config": asdict(km.config)}


def grid(base) -> list:
    """Stage 1: every (η, γ, lookup tokens, lookup n-gram, low-confidence verification) chain setting
    on top of ``base``; lookup-free settings once per (η, γ, low-confidence verification)."""
    out = []
    for η, γ, lt, ng, low in itertools.product(THRESHOLDS, MAX_STEPS, LOOKUP_TOKENS, LOOKUP_NGRAMS, VERIFY_LOW):
        if lt == 0 and ng != LOOKUP_NGRAMS[0]:
            continue
        out.append(replace(base, threshold=η, max_steps=γ, lookup_tokens=lt, lookup_ngram=ng if lt else base.lookup_ngram,
                           verify_low_confidence=low, tree_width=1, lookup_branch=False))
    return out


def tree_grid(best: list) -> list:
    """Stage 2: token trees around the best chain settings ``best``: siblings at depth 1 (count and
    probability threshold) and lookup as a branch beside the adapter (with and without lookup)."""
    out = []
    for config in best:
        for w, τ, branch in itertools.product(TREE_WIDTHS, TREE_THRESHOLDS, (False, True)):
            if (w == 1 and τ != TREE_THRESHOLDS[0]) or (w == 1 and not branch):
                continue
            for lt in {config.lookup_tokens, 0} if not branch else {config.lookup_tokens or BRANCH_LOOKUP_TOKENS}:
                out.append(replace(config, tree_width=w, tree_threshold=τ, lookup_branch=branch, lookup_tokens=lt))
    return out


def tuned_key(km) -> str:
    """What a tuned setting is valid for: machine, threads, engine, model and adapter."""
    from .calibration import machine

    m = machine()
    adapter = km.adapter_source
    try:
        adapter_id = hashlib.sha256(Path(adapter, "adapter.safetensors").read_bytes()).hexdigest()[:16]
    except OSError:
        adapter_id = adapter
    e = km.engine_info
    return "|".join([m["cpu"], ",".join(m["cpu_flags"]), f"{m['threads']} threads", m["torch"], km.model_name,
                     f"{e['engine']}/{e['dtype']}/{e['kernel']}" + (f"/{e['attention']}" if "attention" in e else "")
                     + ("/bfloat16 KV" if e.get("kv_dtype") == "bfloat16" else ""), adapter_id])


def tuned_file() -> Path:
    from .loading import cache_dir

    return cache_dir() / "tuned" / "settings.json"


def load_tuned(km) -> dict | None:
    """The tuned setting for this machine/engine/model/adapter, if ``kangaroo tune`` wrote one."""
    try:
        return json.loads(tuned_file().read_text()).get(tuned_key(km))
    except (OSError, ValueError):
        return None


def save_tuned(km, record: dict) -> Path:
    path = tuned_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        data = {}
    data[tuned_key(km)] = record
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)
    return path


def default_prompts() -> list[tuple[str, str]]:
    from importlib import resources

    return [tuple(x) for x in json.loads((resources.files("kangaroo") / "data" / "tune_prompts.json").read_text())]


def tune(km, prompts: list[tuple[str, str]], max_new_tokens: int = 128, costs: dict | None = None) -> dict:
    """Replay the grid on ``prompts`` and return the ranking and the best setting."""
    from tqdm import tqdm

    from .bench.costs import measure

    start, meter = time.perf_counter(), ContentionMeter().start()
    max_chain, max_lookup = max(MAX_STEPS), max(LOOKUP_TOKENS)
    answers, encoded = [], []
    for kind, prompt in tqdm(prompts, desc="recording drafts", unit="prompt", disable=None, file=sys.stderr):
        encoded.append(km.encode(prompt))
        answers.append((kind, record(km, encoded[-1], max_new_tokens, max_chain, max_lookup)))
    # the step costs are timed just before the real decodes that calibrate them: the machine's speed
    # drifts within minutes, and costs timed before the recording, ~20 s earlier, once came out slower
    # than the decodes (overheads clamped to 0, a different choice than the next run's)
    if costs is None:
        costs = measure(km.engine, km.adapter, km.config.exit_layer, repeats=9, best=True)
    costs = json.loads(json.dumps(costs))  # int row keys -> str, as in costs.json
    costs.update(num_layers=km.engine.num_layers, exit_layer=km.config.exit_layer)
    overhead = calibrate(km, encoded[:CALIBRATION_PROMPTS], [p for _, p in answers[:CALIBRATION_PROMPTS]], max_new_tokens, costs)
    plain_ms = costs["forward_ms"]["1"] + overhead["step_ms"]

    def score(configs: list) -> list[dict]:
        out = []
        for config in configs:
            tokens = rounds = 0
            ms = 0.0
            for _, positions in answers:
                t, r, m = replay(positions, config, costs)
                tokens, rounds, ms = tokens + t, rounds + r, ms + m
            ms += rounds * overhead["round_ms"]
            out.append({"config": asdict(config), "compression": tokens / max(rounds, 1),
                        "modelled_speedup": tokens * plain_ms / ms if ms else 0.0, "_config": config})
        return out

    results = sorted(score(grid(km.config)), key=lambda r: -r["modelled_speedup"])
    results += score(tree_grid([r["_config"] for r in results[:3]]))
    results.sort(key=lambda r: -r["modelled_speedup"])
    for r in results:
        del r["_config"]
    others = meter.stop()  # a busy neighbour distorts the costs and the recorded rounds alike
    return {"best": results[0], "top": results[:10], "ranking": results, "costs": costs, "overhead": overhead,
            "prompts": len(prompts), "others_share": None if others is None else round(others, 3),
            "max_new_tokens": max_new_tokens, "seconds": round(time.perf_counter() - start, 1),
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


TUNED_FIELDS = ("threshold", "max_steps", "lookup_tokens", "lookup_ngram", "tree_width", "tree_threshold", "lookup_branch",
                "verify_low_confidence")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .cli import add_model_arguments

    add_model_arguments(p)
    p.add_argument("--prompts", default=None, help="JSON list of [kind, prompt] pairs (default: the packaged tuning prompts)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="answer length per prompt (default 128)")
    p.add_argument("--out", default=None, help="also write the full result here (JSON)")


def run(args) -> int:
    """``kangaroo tune``."""
    from .cli import load_from_args

    if args.max_new_tokens <= 0:
        raise KangarooError(f"--max-new-tokens must be > 0, got {args.max_new_tokens}")
    prompts = default_prompts()
    if args.prompts:
        try:
            prompts = [tuple(x) for x in json.loads(Path(args.prompts).read_text())]
        except (OSError, ValueError, TypeError) as exc:
            raise KangarooError(f"cannot read --prompts {args.prompts}: {exc}") from None
    args.no_tuned = True
    km = load_from_args(args)
    if km.adapter_is_random:
        print("note: tuning with a seeded random adapter", file=sys.stderr)
    result = tune(km, prompts, args.max_new_tokens)
    best = result["best"]
    record = {"config": {k: best["config"][k] for k in TUNED_FIELDS}, "modelled_speedup": best["modelled_speedup"],
              "compression": best["compression"], "measured_at": result["measured_at"], "engine": km.engine_info,
              "others_share": result["others_share"]}
    if busy(result["others_share"]):
        print(f"warning: other processes used {100 * result['others_share']:.0f}% of the CPUs while tuning: the costs and "
              f"the choice may be off; run `kangaroo tune` again on a quiet machine", file=sys.stderr)
    path = save_tuned(km, record)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'η':>4} {'γ':>3} {'low':>4} {'lookup':>6} {'n-gram':>6} {'tree':>9} {'+branch':>7} {'compression':>11} {'modelled speed-up':>17}")
    for r in result["top"]:
        c = r["config"]
        tree = "chain" if c["tree_width"] == 1 else f"{c['tree_width']}@{c['tree_threshold']}"
        print(f"{c['threshold']:>4} {c['max_steps']:>3} {'yes' if c['verify_low_confidence'] else 'no':>4} {c['lookup_tokens']:>6} {c['lookup_ngram']:>6} {tree:>9} "
              f"{'yes' if c['lookup_branch'] else 'no':>7} {r['compression']:>11.2f} {r['modelled_speedup']:>16.2f}x")
    for label, pick in (("best token tree", lambda c: c["tree_width"] > 1), ("best with lookup as a branch", lambda c: c["lookup_branch"])):
        alt = next((r for r in result["ranking"] if pick(r["config"])), None)
        if alt:
            print(f"{label}: compression {alt['compression']:.2f}, modelled {alt['modelled_speedup']:.2f}x")
    o = result["overhead"]
    print(f"beyond the priced steps, measured on {o['prompts']} prompts: {o['round_ms']:.2f} ms a Kangaroo round, "
          f"{o['step_ms']:.2f} ms a plain step (charged to every setting)")
    c = best["config"]
    print(f"\nchosen: η={c['threshold']} γ={c['max_steps']} lookup_tokens={c['lookup_tokens']} lookup_ngram={c['lookup_ngram']} "
          f"tree_width={c['tree_width']} tree_threshold={c['tree_threshold']} lookup_branch={c['lookup_branch']} "
          f"verify_low_confidence={c['verify_low_confidence']} "
          f"(modelled {best['modelled_speedup']:.2f}x over plain decoding on this machine, {result['seconds']:.0f} s); "
          f"saved to {path}; generate uses it by default")
    return 0
