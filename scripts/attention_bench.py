"""Microbenchmark of one layer's attention (SmolLM2's shapes by default: 9 query heads over 3 key/value
heads of 64): the decode-attention kernel for 1 / 8 / 16 rows at 256 and 1,024 cached keys, and a
causal prompt through the kernel in blocks of rows against SDPA's causal kernel.

    .venv/bin/python scripts/attention_bench.py [--threads 2] [--heads 9 --kv-heads 3 --head-dim 64]

Prints microseconds (the first quartile of 30 calls; milliseconds for prompts) and ns per key and query
head. Run it on a quiet machine; docs/ENGINE.md §4 records its figures.
"""

from __future__ import annotations

import argparse

import torch
from torch.nn import functional as F

from kangaroo import attention


def quartile_s(fn, repeats: int = 30) -> float:
    return attention.time_call(fn, repeats, quantile=0.25)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--heads", type=int, default=9)
    p.add_argument("--kv-heads", type=int, default=3)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--prompt", type=int, default=1487)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    if attention.load() is None:
        raise SystemExit(f"the kernel is unavailable: {attention.status()['reason']}")
    H, Hkv, d, scale = a.heads, a.kv_heads, a.head_dim, a.head_dim ** -0.5
    gen = torch.Generator().manual_seed(0)
    for ctx in (256, 1024):
        k, v = (torch.randn(Hkv, ctx + 16, d, generator=gen) for _ in range(2))
        cells = []
        for T in (1, 8, 16):
            q = torch.randn(T, H, d, generator=gen)
            s = quartile_s(lambda: attention.decode_attention(q, k, v, [0] * T, [ctx + t + 1 for t in range(T)], scale))
            cells.append(f"{T} rows {s * 1e6:.0f} us ({s * 1e9 / (T * H * ctx):.2f} ns/key-head)")
        print(f"{ctx} keys: " + "   ".join(cells))
    N = a.prompt
    q = torch.randn(N, H, d, generator=gen)
    k, v = (torch.randn(Hkv, N, d, generator=gen) for _ in range(2))

    def blocks(B):
        for s in range(0, N, B):
            e = min(N, s + B)
            attention.decode_attention(q[s:e], k, v, [0] * (e - s), list(range(s + 1, e + 1)), scale)

    def sdpa():
        F.scaled_dot_product_attention(q.transpose(0, 1)[None], k[None], v[None], is_causal=True, scale=scale,
                                       enable_gqa=H != Hkv)

    print(f"causal prompt of {N}: SDPA {quartile_s(sdpa, 5) * 1e3:.1f} ms; kernel in blocks of "
          + ", ".join(f"{B}: {quartile_s(lambda: blocks(B), 5) * 1e3:.1f} ms" for B in (32, 64, 128)))


if __name__ == "__main__":
    main()
