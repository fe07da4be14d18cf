"""A/B of the compiled layer loop's one-region steps against its op-by-op path, in one process
(docs/ENGINE.md §2): the module switch ``layer_stack_region`` alternates between calls, so both
sides see the same minutes of a drifting machine.

    .venv/bin/python scripts/region_ab.py [--threads 2] [--rounds 4 (0: forwards only)] [--trees]

Prints forward times (all layers + the greedy head, 256 cached tokens) for 1-16 rows, then tokens/s
of plain greedy decoding and of Kangaroo over scripts/prompts.json (128 new tokens each, the
combinations shuffled per prompt). With ``--trees``: also token trees against chains of as many rows,
and two tree settings end to end: the adapter's tree (``kangaroo-tree``: up to 2 siblings at the first
position, no lookup) and lookup + adapter as two branches (``kangaroo+pld``). Both paths give the
same bits; it checks that too (every method, both paths: the same tokens).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import replace
from pathlib import Path

import torch

from kangaroo import KangarooModel
from kangaroo import attention as attn_kernel
from kangaroo.bench.costs import _interleaved_ms
from kangaroo.decoding import KangarooDecoder
from kangaroo.kv_cache import KVCache
from kangaroo.tree import TreeLayout

ROWS = (1, 2, 4, 8, 16)
TREES = {  # rows: (chain, tree of as many rows)
    3: (TreeLayout.chain(2), TreeLayout.of([0, 0])),
    7: (TreeLayout.chain(6), TreeLayout.of([0, 1, 2, 3, 0, 0])),
    9: (TreeLayout.chain(8), TreeLayout.of([0, 1, 2, 3, 0, 5, 6, 7])),
}
TREE_SETTINGS = {"kangaroo-tree": {"lookup_tokens": 0, "tree_width": 3}, "kangaroo+pld": {"lookup_branch": True}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--trees", action="store_true", help="also token trees, and two tree settings end to end")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    km = KangarooModel.from_pretrained()
    engine, module = km.engine, attn_kernel.load()
    print(engine.describe(), km.config)
    L, ctx = engine.num_layers, 256
    gen = torch.Generator().manual_seed(0)
    prompt, new = torch.randint(0, 49152, (1, ctx), generator=gen), torch.randint(0, 49152, (1, 16), generator=gen)
    cache = KVCache(L, ctx + 32)
    shapes = {f"{k} rows": TreeLayout.chain(k - 1) for k in ROWS}
    if a.trees:
        shapes.update({f"{k} rows, {kind}": s for k, pair in TREES.items() for kind, s in zip(("chain", "tree"), pair)})
    with torch.no_grad():
        engine.run_layers(0, L, engine.embed(prompt), cache, 0)
        outs = []
        for on in (True, False):
            module.layer_stack_region(on)
            cache.crop(ctx)
            outs.append(engine.run_layers(0, L, engine.embed(new[:, :8]), cache, ctx))
        print("same bits:", torch.equal(*outs))

        def forward(layout, on):
            def run():
                module.layer_stack_region(on)
                cache.crop(ctx)
                tree = None if layout.is_chain else layout
                engine.greedy(engine.run_layers(0, L, engine.embed(new[:, :layout.rows]), cache, ctx, tree))
            return run
        ms = _interleaved_ms({(name, on): forward(s, on) for name, s in shapes.items() for on in (True, False)}, 20)
    print("forward ms, region / op by op: " + "  ".join(f"{name}: {ms[(name, True)]:.2f} / {ms[(name, False)]:.2f}"
                                                        for name in shapes))
    if not a.rounds:  # --rounds 0: the forward times only
        return
    prompts = [text for _, text in json.loads((Path(__file__).parent / "prompts.json").read_text())]
    decoders = {"ar": km.baseline, "kangaroo": km.decoder}
    if a.trees:
        decoders.update({name: KangarooDecoder(engine, km.adapter, replace(km.config, **o)) for name, o in TREE_SETTINGS.items()})
    combos = [(on, name) for on in (True, False) for name in decoders]
    seconds, tokens, answers, rng = dict.fromkeys(combos, 0.0), dict.fromkeys(combos, 0), {}, random.Random(0)
    for _ in range(a.rounds):
        for i, text in enumerate(prompts):
            ids = km.encode(text)
            rng.shuffle(combos)
            for on, name in combos:
                module.layer_stack_region(on)
                t = time.perf_counter()
                out = decoders[name].generate(ids, 128, km.eos_token_ids)
                seconds[(on, name)] += time.perf_counter() - t
                tokens[(on, name)] += len(out.token_ids)
                assert out.token_ids == answers.setdefault(i, out.token_ids), (on, name, i)
    module.layer_stack_region(True)
    speed = {c: tokens[c] / seconds[c] for c in combos}
    for name in decoders:
        print(f"{name}: region {speed[(True, name)]:.1f}, op by op {speed[(False, name)]:.1f} tokens/s; "
              f"vs ar {speed[(True, name)] / speed[(True, 'ar')]:.2f}x / {speed[(False, name)] / speed[(False, 'ar')]:.2f}x")


if __name__ == "__main__":
    main()
