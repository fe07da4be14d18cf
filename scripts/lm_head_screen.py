"""Probe for a screened greedy LM head (docs/ENGINE.md §3): how many tokens a cheap head must hand
back to the exact bfloat16 head so that the argmax stays exact.

The engine's screen as built (``kangaroo.screened_head``: int8 weights with one scale per token, rows
in int16) is run too, where this CPU has it: its tokens must be the exact argmax, and its survivors
are printed as "built".

For each position of a few greedy answers of the default model, logits from the LM head quantised
in blocks of 32 (int8 with a float16 scale as GGUF's Q8_0, or Q4_1) are compared with the bfloat16
head's. A token can be the exact argmax only if its screened logit plus its bound reaches the best
screened logit minus that token's bound; the bound per token is sum over blocks of
||x_b|| * ||W_b - Q_b|| (Cauchy-Schwarz per block) plus rounding slack. The script checks that the
exact argmax always survives and prints how many tokens survive.

    .venv/bin/python scripts/lm_head_screen.py [--tokens 64]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from kangaroo import quantized
from kangaroo.api import KangarooModel
from kangaroo.kv_cache import KVCache

PROMPTS = ("Write a short story about a robot who learns to paint.",
           "Explain how vaccines train the immune system.",
           "Translate to French: The weather is nice today and I want to go for a walk.")


def q8_blocks(w: torch.Tensor) -> torch.Tensor:
    """``w`` ``[N, K]`` through symmetric int8 blocks of 32 with float16 scales (Q8_0), in float32."""
    blocks = w.reshape(w.shape[0], -1, 32)
    scale = (blocks.abs().amax(2, keepdim=True) / 127).to(torch.float16).float()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return (torch.round(blocks / scale).clamp(-127, 127) * scale).reshape(w.shape)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=64)
    args = p.parse_args()
    km = KangarooModel.from_pretrained(threads=2)
    engine, L = km.engine, km.engine.num_layers
    head = engine.backbone.lm_head.weight.detach().float().to(torch.bfloat16).float()  # what the head computes with
    screens = {"q8_0": q8_blocks(head), "q4_1": quantized.dequantize(*quantized.quantize_q4_1(head))}
    block_norms = {name: (head - w).reshape(head.shape[0], -1, 32).norm(dim=2) for name, w in screens.items()}
    survivors = {name: [] for name in screens}
    built = engine.greedy_head  # the engine's own screen (None without AVX512-VNNI and BF16)
    if built is not None:
        survivors["built"] = []
    bounds = {name: [] for name in screens}
    for prompt in PROMPTS:
        ids = km.encode([{"role": "user", "content": prompt}])
        answer = km.baseline.generate(ids, args.tokens, km.eos_token_ids).token_ids
        seq = torch.cat([ids, torch.tensor([answer])], dim=1)
        with torch.no_grad():
            hidden = engine.run_layers(0, L, engine.embed(seq), KVCache(L, seq.shape[1] + 1), 0)
            x = engine.final_norm(hidden)[0, ids.shape[1] - 1:].to(torch.bfloat16).float()  # the head's input rows
        exact = x @ head.T
        if built is not None:
            logits = engine.lm_head(x).float()  # the bfloat16 head as the engine runs it
            assert torch.equal(built(x), logits.argmax(-1)), "the built screen missed the argmax"
            survivors["built"] += built.last_survivors.tolist()
        x_norms = x.reshape(x.shape[0], -1, 32).norm(dim=2)  # [T, K/32]
        for name, w in screens.items():
            approx = x @ w.T
            bound = x_norms @ block_norms[name].T + approx.abs() * 2 ** -7 + 1e-3  # + both heads' bfloat16 rounding
            best_low = (approx - bound).max(dim=1, keepdim=True).values
            alive = approx + bound >= best_low
            assert alive.gather(1, exact.argmax(1, keepdim=True)).all(), "the exact argmax was screened out"
            survivors[name] += alive.sum(dim=1).tolist()
            bounds[name] += bound.mean(dim=1).tolist()
    for name in survivors:
        s = np.array(survivors[name])
        bound = f"mean bound {np.mean(bounds[name]):.3f}; " if name in bounds else ""
        print(f"{name}: {bound}surviving tokens of {head.shape[0]}: "
              f"median {np.median(s):.0f}, 90th percentile {np.percentile(s, 90):.0f}, max {s.max()} "
              f"({len(s)} positions)")


if __name__ == "__main__":
    main()
