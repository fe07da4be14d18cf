"""What one step of each kind costs on this machine: the numbers Kangaroo's speed follows from.

Speed-up = tokens per round ÷ (draft steps × draft cost + verification cost), in units of a one-token
target step. ``kangaroo bench --costs`` measures, for the engine the run uses (after 256 cached
positions, and again after :data:`LONG_CONTEXT` where the model's context allows: long prompts'
steps, whose attention and cache reads grow with it) and for the float32 eager engine (HF's own
modules):

* ``forward_ms[k]``: one greedy target forward over ``k`` new tokens (every layer, final norm, the
  head's argmax as greedy decoding finds it: :meth:`~kangaroo.engine.FusedEngine.greedy`) after
  ``context`` cached positions, k = 1, 2, 4, 8, 16;
* ``verify_ms[k]``: what Kangaroo's greedy verification runs: layers ``[ℓ, L)`` + greedy head over
  ``k`` tokens, k = 1 .. 9 and 16 (:data:`VERIFY_ROWS`);
* ``draft_step_ms``: one drafted token: layers ``[0, ℓ)`` + adapter + draft head (the adapter's
  draft vocabulary, if it has one) + top-1, the mean of :data:`DRAFT_STEPS` steps in a row;
  ``draft_first_ms`` / ``draft_next_ms``: the first of them, right after a forward that evicted the
  draft path's weights from the caches, and each later one (what :mod:`kangaroo.tune` prices a
  round's drafting with);
* ``lm_head_ms``: the greedy head on one row (the screened argmax, :mod:`kangaroo.screened_head`,
  where it runs); ``full_head_ms``: the whole LM head's logits on one row (what sampling runs);
* ``tree_extra_ms[n]``: what verifying a token tree with ``n`` more branches costs beyond a chain of
  as many rows (a 3-token chain plus ``n`` siblings at depth 1; engines with trees only): each branch
  is written to the cache and attended as its own segment, and :mod:`kangaroo.tune` prices trees
  with it;
* ``prefill_ms``: a fresh ``context``-token prompt through every layer + the greedy head (what a
  question's first token costs before any step; the median of 3 after one untimed call);
* ``build_s``: building the engine (weight packing, row-invariance checks, loading the attention kernel);
* ``compile s`` (in the table): what the decode-attention kernel's first compile on this machine took
  (:mod:`kangaroo.attention`; later runs load it from the cache).

Each figure is the median of ``repeats`` timed calls after two untimed ones, every kind of call timed
once per round in turn (the machine's speed drifts; interleaved, the ratios between calls hold).
"""

from __future__ import annotations

import time

import torch

from .. import attention as native
from ..kv_cache import KVCache
from ..tree import TreeLayout

ROWS = (1, 2, 4, 8, 16)
#: verification is timed at every row count up to 9 (what the tuner's γ and lookup lengths verify):
#: its cost is flat while streaming the weights bounds it and grows steeply after (Zen 4, layers [2,
#: 30) over 1 / 4 / 5 / 8 rows: 2.89 / 3.07 / 3.35 / 4.96 ms), which a line from 4 to 8 rows misprices
VERIFY_ROWS = (*range(1, 10), 16)
#: drafting is timed as a round does it: this many steps in a row (the first finds the shallow layers,
#: adapter and draft head evicted by the forward before it, the others in cache), per step
DRAFT_STEPS = 4


def _interleaved_ms(calls: dict, repeats: int, best: bool = False) -> dict:
    """Median (or, with ``best``, minimum) milliseconds of each call, timed round-robin: every round
    times each call once, after two untimed rounds. Interleaving keeps ratios between calls honest on
    a machine whose speed drifts (memory bandwidth here varied by ~20% between minutes)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    times = {name: [] for name in calls}
    for i in range(repeats + 2):
        for name, fn in calls.items():
            sync()
            t = time.perf_counter()
            fn()
            sync()
            if i >= 2:
                times[name].append(time.perf_counter() - t)
    out = {}
    for name, ts in times.items():
        ts.sort()
        out[name] = (ts[0] if best else ts[len(ts) // 2]) * 1e3
    return out


@torch.no_grad()
def measure(engine, adapter, exit_layer: int, context: int = 256, repeats: int = 15, best: bool = False) -> dict:
    """Step costs of ``engine`` (a fused engine or the eager Backbone) with ``adapter`` at ℓ: medians,
    or minima with ``best`` (robust to other processes' bursts when only ratios matter)."""
    L, device = engine.num_layers, engine.device
    gen = torch.Generator().manual_seed(0)
    vocab = engine.config.vocab_size
    prompt = torch.randint(0, vocab, (1, context), generator=gen).to(device)
    new = torch.randint(0, vocab, (1, max(ROWS)), generator=gen).to(device)
    cache = KVCache(L, context + 2 * max(ROWS))
    h_prompt = engine.run_layers(0, exit_layer, engine.embed(prompt), cache, 0)
    engine.run_layers(exit_layer, L, h_prompt, cache, 0)

    def forward(k):
        def run():
            cache.crop(context)
            engine.greedy(engine.run_layers(0, L, engine.embed(new[:, :k]), cache, context))
        return run

    h_new = engine.run_layers(0, exit_layer, engine.embed(new), cache, context)

    def verify(k):
        def run():
            cache.crop(context)
            engine.greedy(engine.run_layers(exit_layer, L, h_new[:, :k], cache, context))
        return run

    def verify_tree(parents):
        layout = TreeLayout.of(parents)

        def run():
            cache.crop(context)
            engine.greedy(engine.run_layers(exit_layer, L, h_new[:, :len(parents) + 1], cache, context, layout))
        return run

    a_cache = KVCache(1, context + 8)
    engine.adapter_forward(adapter, h_prompt, a_cache, 0)
    token = new[:, :1]
    head, vocab = engine.draft_head(adapter)

    def draft_steps(n):  # a round's drafting: n steps in a row, the first after a forward
        def run():
            cache.crop(context)
            a_cache.crop(context)
            for i in range(n):
                h = engine.run_layers(0, exit_layer, engine.embed(token), cache, context + i)
                out = engine.adapter_forward(adapter, h, a_cache, context + i)
                native.top1_prob(head(out))  # as the drafter's second early exit reads it
        return run

    x = torch.randn(1, 1, engine.config.hidden_size, device=device)
    calls = {("forward", k): forward(k) for k in ROWS}
    calls[("draft", 1)] = draft_steps(1)  # after the 16-token forward: the draft path's weights evicted
    calls.update({("verify", k): verify(k) for k in VERIFY_ROWS})
    calls.update({("draft", DRAFT_STEPS): draft_steps(DRAFT_STEPS), ("lm_head", 0): lambda: engine.greedy(x),
                  ("full_head", 0): lambda: engine.logits(x)})
    tree_rows = {n: [0, 1, 2] + [0] * n for n in (1, 2)}  # a 3-token chain and n siblings of its first token
    if engine.supports_trees:
        calls.update({("tree", n): verify_tree(parents) for n, parents in tree_rows.items()})
        calls.update({("verify", len(p) + 1): verify(len(p) + 1) for p in tree_rows.values()})
    ms = _interleaved_ms(calls, repeats, best)

    def prefill():
        fresh = KVCache(L, context + 1)
        engine.greedy(engine.run_layers(0, L, engine.embed(prompt), fresh, 0, last=1))
    prefill_ms = _interleaved_ms({"prefill": prefill}, 3, best)["prefill"]
    trees = {"tree_extra_ms": {n: round(max(ms[("tree", n)] - ms[("verify", len(p) + 1)], 0.0), 3)
                               for n, p in tree_rows.items()}} if engine.supports_trees else {}
    return {
        "context": context,
        "exit_layer": exit_layer,
        "forward_ms": {k: round(ms[("forward", k)], 3) for k in ROWS},
        "verify_ms": {k: round(ms[("verify", k)], 3) for k in VERIFY_ROWS},
        "draft_step_ms": round(ms[("draft", DRAFT_STEPS)] / DRAFT_STEPS, 3),
        "draft_first_ms": round(ms[("draft", 1)], 3),
        "draft_next_ms": round(max(ms[("draft", DRAFT_STEPS)] - ms[("draft", 1)], 0.0) / (DRAFT_STEPS - 1), 3),
        "draft_vocab": None if vocab is None else int(vocab.numel()),
        "lm_head_ms": round(ms[("lm_head", 0)], 3),
        "prefill_ms": round(prefill_ms, 3),
        "full_head_ms": round(ms[("full_head", 0)], 3),
        **trees,
    }


LONG_CONTEXT = 1024  # the chosen engine measured again here (summarisation and RAG prompts are ~700-1,500 tokens)


def measure_run(km, repeats: int = 15) -> dict:
    """``costs.json``: the costs of the engine ``km`` runs on and of the float32 eager engine, with
    the configuration and the machine."""
    from ..calibration import machine

    ℓ = km.config.exit_layer
    chosen = {**measure(km.engine, km.adapter, ℓ, repeats=repeats), "engine": km.engine_info}
    entries = {"chosen": chosen}
    limit = km.engine.max_positions
    if limit is None or limit >= LONG_CONTEXT + 2 * max(ROWS) + 8:  # room for the steps after the context
        entries[f"chosen, {LONG_CONTEXT} cached tokens"] = {**measure(km.engine, km.adapter, ℓ, context=LONG_CONTEXT,
                                                                      repeats=repeats), "engine": km.engine_info}
    if getattr(km.engine, "attention", None) == "kernel":  # the same engine attending row by row, for comparison
        km.engine.attention = "sdpa"
        try:
            info = {k: v for k, v in km.engine_info.items() if not k.startswith("attention")}
            entries["chosen, per-row SDPA"] = {**measure(km.engine, km.adapter, ℓ, repeats=repeats),
                                               "engine": {**info, "attention": "sdpa", "kv_dtype": "float32"}}  # SDPA rows keep float32
        finally:
            km.engine.attention = "kernel"
    if km.engine is not km.backbone and km.backbone.dtype == torch.float32:
        eager = measure(km.backbone, km.adapter, ℓ, repeats=max(3, repeats // 3))
        entries["float32 eager"] = {**eager, "engine": {"engine": "eager", "dtype": "float32", "kernel": "hf", "build_s": 0.0}}
    for e in entries.values():
        f = e["forward_ms"]
        e["forward_ratio_8_to_1"] = round(f[8] / f[1], 3)
        e["draft_to_forward"] = round(e["draft_step_ms"] / f[1], 3)
    return {"machine": machine(), "adapter": km.adapter_source, **entries}


def table(costs: dict) -> str:
    """The Markdown table of ``costs.json`` (one row per engine)."""
    from .report import engine_label

    rows = ["| engine | forward ms (1 / 2 / 4 / 8 / 16 tokens) | 8 ÷ 1 | verify ms (1 / 8 tokens) | tree +1 / +2 branches ms | draft step ms (first / next) | draft ÷ forward | LM head ms (greedy / full) | prefill ms | build s | compile s |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, e in costs.items():
        if not isinstance(e, dict) or "forward_ms" not in e:
            continue
        cfg = e["engine"]
        # row counts are ints when measured, strings once read back from JSON
        f, v = ({int(k): ms for k, ms in e[key].items()} for key in ("forward_ms", "verify_ms"))
        compiled = cfg.get("attention_compile_s") or 0  # the kernel's first compile on this machine
        tree = {int(k): ms for k, ms in e.get("tree_extra_ms", {}).items()}
        tree = f"{tree[1]:.2f} / {tree[2]:.2f}" if tree else "–"
        head = f"{e['lm_head_ms']:.2f}" + (f" / {e['full_head_ms']:.2f}" if "full_head_ms" in e else "")
        prefill = f"{e['prefill_ms']:.0f} ({e['context']} tokens)" if "prefill_ms" in e else "–"  # older files have none
        draft = f"{e['draft_step_ms']:.2f}" + (f" ({e['draft_first_ms']:.2f} / {e['draft_next_ms']:.2f})" if "draft_first_ms" in e else "")
        rows.append(f"| {name}: {engine_label(cfg)} | {' / '.join(f'{f[k]:.1f}' for k in ROWS)} | "
                    f"{e['forward_ratio_8_to_1']:.2f} | {v[1]:.1f} / {v[8]:.1f} | {tree} | {draft} | "
                    f"{e['draft_to_forward']:.2f} | {head} | {prefill} | {cfg.get('build_s', 0):.1f} | {compiled:.0f} |")
    return "\n".join(rows)
