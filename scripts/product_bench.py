"""Microbenchmark of a decoding step's products: every product kernel the engine can choose here, over
one step's worth of distinct weights (so that they stream from memory as in a real step, not from
cache), for 1 to 16 rows.

    .venv/bin/python scripts/product_bench.py [--threads 2] [--layers 30] [--rounds 4]

Shapes are SmolLM2-135M's (per layer QKV [960 x 576], O [576 x 576], gate/up [3072 x 576],
down [576 x 1536], then the LM head [49152 x 576]; 268 MB in bfloat16). Each (kernel, rows) cell is
the best over ``--rounds`` interleaved rounds of the median of 9 steps, in milliseconds; the memory
line says what streaming those bytes takes at the bandwidth a plain read reaches here. docs/ENGINE.md
§3 records its figures.
"""

from __future__ import annotations

import argparse
import torch

from kangaroo.attention import time_call
from kangaroo.kernels import Linear, kernel_available

SHAPES = ((960, 576), (576, 576), (3072, 576), (576, 1536))
LM_HEAD = (49152, 576)
ROWS = (1, 2, 4, 8, 11, 16)


def median_ms(fn, n: int = 9) -> float:
    return time_call(fn, n) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--rounds", type=int, default=4)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(n, k, generator=gen) * 0.05 for _ in range(a.layers) for n, k in SHAPES]
    weights.append(torch.randn(*LM_HEAD, generator=gen) * 0.05)
    total_bytes = sum(w.numel() for w in weights) * 2
    kernels = [k for k in ("packed", "dpbf16", "stock") if kernel_available(k, torch.bfloat16, "cpu")]
    steps = {k: [Linear(w, None, torch.bfloat16, k, check=False) for w in weights] for k in kernels}
    inputs = {(m, k): torch.randn(m, k, generator=gen).to(torch.bfloat16) for m in ROWS for k in (576, 1536)}

    def step(kernel, rows):
        for lin in steps[kernel]:
            lin(inputs[(rows, lin.in_features)])

    big = torch.randn(total_bytes // 2, generator=gen).to(torch.bfloat16)
    read_s = min(median_ms(lambda: big.sum(), 3) for _ in range(2)) / 1e3
    print(f"{a.threads} threads; {total_bytes / 1e6:.0f} MB of bfloat16 weights; a plain read of as many bytes "
          f"takes {read_s * 1e3:.2f} ms ({total_bytes / read_s / 1e9:.1f} GB/s)")
    print("rows  " + "  ".join(f"{k:>8}" for k in kernels) + "   (ms per step's products)")
    for rows in ROWS:
        best = {k: float("inf") for k in kernels}
        for _ in range(a.rounds):
            for k in kernels:
                best[k] = min(best[k], median_ms(lambda: step(k, rows)))
        print(f"{rows:>4}  " + "  ".join(f"{best[k]:8.2f}" for k in kernels))


if __name__ == "__main__":
    main()
