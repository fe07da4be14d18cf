"""A/B of token trees in the compiled layer loop's one parallel region against its op-by-op path, in
one process (docs/ENGINE.md §2): the module switch ``layer_stack_region`` alternates between calls,
so both sides see the same minutes of a drifting machine.

    .venv/bin/python scripts/tree_region_ab.py [--threads 2] [--rounds 3]

Prints forward times (all layers + the greedy head, 256 cached tokens) for chains and trees of the
same row counts, then tokens/s over scripts/prompts.json (128 new tokens each, shuffled per prompt)
of plain greedy decoding and of three Kangaroo settings: as tuned (``kangaroo``), the adapter's tree
(``kangaroo-tree``: up to 2 siblings at the first position, no lookup) and lookup + adapter as two
branches (``kangaroo+pld``). Both paths give the same bits; it checks the tokens too.
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

SHAPES = {  # rows: (chain, tree of as many rows)
    "3 rows": (TreeLayout.chain(2), TreeLayout.of([0, 0])),
    "7 rows": (TreeLayout.chain(6), TreeLayout.of([0, 1, 2, 3, 0, 0])),
    "9 rows": (TreeLayout.chain(8), TreeLayout.of([0, 1, 2, 3, 0, 5, 6, 7])),
}
SETTINGS = {"kangaroo": {}, "kangaroo-tree": {"lookup_tokens": 0, "tree_width": 3}, "kangaroo+pld": {"lookup_branch": True}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    km = KangarooModel.from_pretrained()
    engine, module = km.engine, attn_kernel.load()
    print(engine.describe(), km.config)
    L, ctx = engine.num_layers, 256
    gen = torch.Generator().manual_seed(0)
    prompt, new = torch.randint(0, 49152, (1, ctx), generator=gen), torch.randint(0, 49152, (1, 16), generator=gen)
    cache = KVCache(L, ctx + 32)
    with torch.no_grad():
        engine.run_layers(0, L, engine.embed(prompt), cache, 0)

        def forward(layout, on):
            def run():
                module.layer_stack_region(on)
                cache.crop(ctx)
                tree = None if layout.is_chain else layout
                engine.greedy(engine.run_layers(0, L, engine.embed(new[:, :layout.rows]), cache, ctx, tree))
            return run
        cases = {(name, kind, on): forward(shape, on) for name, shapes in SHAPES.items()
                 for kind, shape in zip(("chain", "tree"), shapes) for on in (True, False)}
        ms = _interleaved_ms(cases, 20)
    for name in SHAPES:
        print(f"{name}: chain {ms[(name, 'chain', True)]:.2f} / {ms[(name, 'chain', False)]:.2f} ms, "
              f"tree {ms[(name, 'tree', True)]:.2f} / {ms[(name, 'tree', False)]:.2f} ms (region / op by op)")
    prompts = [text for _, text in json.loads((Path(__file__).parent / "prompts.json").read_text())]
    decoders = {name: KangarooDecoder(engine, km.adapter, replace(km.config, **o)) for name, o in SETTINGS.items()}
    combos = [(on, name) for on in (True, False) for name in ("ar", *SETTINGS)]
    seconds, tokens, answers, rng = dict.fromkeys(combos, 0.0), dict.fromkeys(combos, 0), {}, random.Random(0)
    for _ in range(a.rounds):
        for i, text in enumerate(prompts):
            ids = km.encode(text, None)
            rng.shuffle(combos)
            for on, name in combos:
                module.layer_stack_region(on)
                decoder = km.baseline if name == "ar" else decoders[name]
                t = time.perf_counter()
                out = decoder.generate(ids, 128, km.eos_token_ids)
                seconds[(on, name)] += time.perf_counter() - t
                tokens[(on, name)] += len(out.token_ids)
                answers.setdefault(i, out.token_ids)
                assert out.token_ids == answers[i], (on, name, i)  # every method, both paths: the same tokens
    module.layer_stack_region(True)
    speed = {c: tokens[c] / seconds[c] for c in combos}
    for name in ("ar", *SETTINGS):
        print(f"{name}: region {speed[(True, name)]:.1f}, op by op {speed[(False, name)]:.1f} tokens/s; "
              f"vs ar {speed[(True, name)] / speed[(True, 'ar')]:.2f}x / {speed[(False, name)] / speed[(False, 'ar')]:.2f}x")


if __name__ == "__main__":
    main()
