"""A/B of the compiled layer loop's one-region chain steps against its op-by-op path, in one process
(docs/ENGINE.md §2): the module switch ``layer_stack_region`` alternates between calls, so both
sides see the same minutes of a drifting machine.

    .venv/bin/python scripts/region_ab.py [--threads 2] [--rounds 4]

Prints forward times (all layers + the greedy head, 256 cached tokens) for 1-16 rows, then tokens/s
of plain greedy decoding and of Kangaroo over scripts/prompts.json (128 new tokens each, the four
combinations shuffled per prompt). Both paths give the same bits; it checks that too.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

from kangaroo import KangarooModel
from kangaroo import attention as attn_kernel
from kangaroo.bench.costs import _interleaved_ms
from kangaroo.kv_cache import KVCache

ROWS = (1, 2, 4, 8, 16)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=4)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    km = KangarooModel.from_pretrained()
    engine, module = km.engine, attn_kernel.load()
    print(engine.describe())
    L, ctx = engine.num_layers, 256
    gen = torch.Generator().manual_seed(0)
    prompt, new = torch.randint(0, 49152, (1, ctx), generator=gen), torch.randint(0, 49152, (1, 16), generator=gen)
    cache = KVCache(L, ctx + 32)
    with torch.no_grad():
        engine.run_layers(0, L, engine.embed(prompt), cache, 0)
        outs = []
        for on in (True, False):
            module.layer_stack_region(on)
            cache.crop(ctx)
            outs.append(engine.run_layers(0, L, engine.embed(new[:, :8]), cache, ctx))
        print("same bits:", torch.equal(*outs))

        def forward(k, on):
            def run():
                module.layer_stack_region(on)
                cache.crop(ctx)
                engine.greedy(engine.run_layers(0, L, engine.embed(new[:, :k]), cache, ctx))
            return run
        ms = _interleaved_ms({(k, on): forward(k, on) for k in ROWS for on in (True, False)}, 20)
    print("forward ms, region / op by op: " + "  ".join(f"{k}: {ms[(k, True)]:.2f} / {ms[(k, False)]:.2f}" for k in ROWS))
    prompts = [text for _, text in json.loads((Path(__file__).parent / "prompts.json").read_text())]
    combos = [(on, kangaroo) for on in (True, False) for kangaroo in (False, True)]
    seconds, tokens, rng = dict.fromkeys(combos, 0.0), dict.fromkeys(combos, 0), random.Random(0)
    for _ in range(a.rounds):
        for text in prompts:
            rng.shuffle(combos)
            for on, kangaroo in combos:
                module.layer_stack_region(on)
                t = time.perf_counter()
                out = km.generate(text, max_new_tokens=128, kangaroo=kangaroo)
                seconds[(on, kangaroo)] += time.perf_counter() - t
                tokens[(on, kangaroo)] += len(out.result.token_ids)
    module.layer_stack_region(True)
    speed = {c: tokens[c] / seconds[c] for c in combos}
    for on in (True, False):
        print(f"{'region' if on else 'op by op'}: ar {speed[(on, False)]:.1f}, Kangaroo {speed[(on, True)]:.1f} tokens/s "
              f"= {speed[(on, True)] / speed[(on, False)]:.2f}x")


if __name__ == "__main__":
    main()
