"""A float32 against a bfloat16 KV cache, alternating in one process (docs/ENGINE.md §4):

1. the decode-attention kernel alone over 30 layers' caches in turn (as a forward reads them: each
   layer's keys from memory) and over one layer's 30 times (warm), 1 and 8 rows;
2. whole steps of the default model's layers (the engine `--dtype auto` builds), 1 and 8 tokens,
   and a prompt of each context's length into an empty cache (the prefill).

    .venv/bin/python scripts/kv_cache_bench.py [--threads 2] [--contexts 256,1024,1536] [--rounds 6]

Prints milliseconds, medians over the rounds. Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from kangaroo import attention

DTYPES = (torch.float32, torch.bfloat16)


def attention_only(contexts: list[int], rounds: int, layers: int = 30) -> None:
    H, Hkv, d, scale = 9, 3, 64, 64 ** -0.5  # SmolLM2's shapes
    gen = torch.Generator().manual_seed(0)
    flush = torch.empty(64 << 20, dtype=torch.uint8)  # larger than the L3 cache
    for ctx in contexts:
        caches = {dt: [] for dt in DTYPES}
        for _ in range(layers):
            k, v = torch.randn(Hkv, ctx + 16, d, generator=gen), torch.randn(Hkv, ctx + 16, d, generator=gen)
            for dt in DTYPES:
                caches[dt].append((k.to(dt), v.to(dt)))
        for T in (1, 8):
            q = torch.randn(T, H, d, generator=gen)
            begins, ends = [0] * T, [ctx + t + 1 for t in range(T)]
            times = {}
            for _ in range(rounds):
                for dt in DTYPES:
                    flush.add_(1)
                    t = time.perf_counter()
                    for k, v in caches[dt]:
                        attention.decode_attention(q, k, v, begins, ends, scale)
                    times.setdefault((dt, "streamed"), []).append(time.perf_counter() - t)
                    k, v = caches[dt][0]
                    t = time.perf_counter()
                    for _ in range(layers):
                        attention.decode_attention(q, k, v, begins, ends, scale)
                    times.setdefault((dt, "warm"), []).append(time.perf_counter() - t)
            cells = [f"{how} {' / '.join(f'{statistics.median(times[(dt, how)]) * 1e3:.2f}' for dt in DTYPES)}"
                     for how in ("streamed", "warm")]
            print(f"attention, {layers} layers, {ctx} keys, {T} rows (ms, float32 / bfloat16): " + ", ".join(cells))


def whole_steps(contexts: list[int], rounds: int, threads: int) -> None:
    from kangaroo.api import KangarooModel
    from kangaroo.kv_cache import KVCache

    km = KangarooModel.from_pretrained(threads=threads)
    engine, L = km.engine, km.engine.num_layers
    print(f"engine: {engine.describe()}")
    caches = {}
    for dt in DTYPES:
        engine.kv_dtype = dt
        for ctx in contexts:
            ids = torch.randint(100, 40000, (1, ctx), generator=torch.Generator().manual_seed(ctx))
            caches[dt, ctx] = KVCache(L, ctx + 64)
            engine.run_layers(0, L, engine.embed(ids), caches[dt, ctx], 0)
    new = {T: engine.embed(torch.randint(100, 40000, (1, T), generator=torch.Generator().manual_seed(T))) for T in (1, 8)}
    times = {}
    for _ in range(rounds):
        for ctx in contexts:
            ids = torch.randint(100, 40000, (1, ctx), generator=torch.Generator().manual_seed(ctx))
            for dt in DTYPES:
                engine.kv_dtype = dt
                t = time.perf_counter()
                engine.run_layers(0, L, engine.embed(ids), KVCache(L, ctx), 0)
                times.setdefault((ctx, "prefill", dt), []).append(time.perf_counter() - t)
            for T in (1, 8):
                for dt in DTYPES:
                    engine.kv_dtype, cache = dt, caches[dt, ctx]
                    best = float("inf")
                    for _ in range(5):
                        cache.crop(ctx)
                        t = time.perf_counter()
                        engine.run_layers(0, L, new[T], cache, ctx)
                        best = min(best, time.perf_counter() - t)
                    times.setdefault((ctx, T, dt), []).append(best)
    for ctx in contexts:
        for T in (1, 8, "prefill"):
            f, b = (statistics.median(times[ctx, T, dt]) * 1e3 for dt in DTYPES)
            what = f"prompt of {ctx} tokens" if T == "prefill" else f"whole step, {ctx} cached tokens, {T} tokens"
            print(f"{what}: float32 cache {f:.2f} ms, bfloat16 cache {b:.2f} ms ({f / b:.2f}x)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--contexts", default="256,1024,1536")
    p.add_argument("--rounds", type=int, default=6)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    if attention.load() is None:
        raise SystemExit(f"the kernel is unavailable: {attention.status()['reason']}")
    if not attention.bf16_cache_native():
        print("note: this build has no AVX512-BF16, so a bfloat16 cache is widened to float32 (no gain expected)")
    contexts = [int(c) for c in a.contexts.split(",")]
    attention_only(contexts, a.rounds)
    whole_steps(contexts, a.rounds, a.threads)


if __name__ == "__main__":
    main()
