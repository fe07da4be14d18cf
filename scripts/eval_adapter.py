"""Compression and speed of an adapter on 6 prompt kinds, for several (η, verify) settings, in one process.

usage: python scripts/eval_adapter.py ADAPTER_DIR [DTYPE] [SETTINGS_JSON]

SETTINGS_JSON is a list of [name, {KangarooConfig overrides}]; the default compares η = 0.6 with and
without verifying the low-confidence draft, η = 0.3 and η = 0. Each setting runs the prompts of
scripts/prompts.json (128 new tokens, 2 threads) against our autoregressive loop, timed in the same
process after a warm-up; the last column says whether the output equals greedy decoding.
"""

import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

from kangaroo import KangarooModel
from kangaroo.decoding import KangarooDecoder

torch.set_num_threads(2)
adapter = sys.argv[1]
dtype = sys.argv[2] if len(sys.argv) > 2 else "auto"
km = KangarooModel.from_pretrained(adapter=adapter, dtype=dtype, verify_low_confidence=True)
prompts = json.loads(Path(__file__).with_name("prompts.json").read_text())
settings = json.loads(sys.argv[3]) if len(sys.argv) > 3 else [
    ("η=0.6, verify low-confidence", {}), ("η=0.6", {"verify_low_confidence": False}),
    ("η=0.3, verify low-confidence", {"threshold": 0.3}), ("η=0 (always γ)", {"threshold": 0.0})]
km.baseline.generate(km.encode("Hello"), 16, km.eos_token_ids)  # warm-up
km.decoder.generate(km.encode("Hello"), 16, km.eos_token_ids)
greedy = {}
for kind, prompt in prompts:
    ids = km.encode(prompt)
    t = time.perf_counter()
    r = km.baseline.generate(ids, 128, km.eos_token_ids)
    greedy[kind] = (r.token_ids, time.perf_counter() - t)
for name, overrides in settings:
    decoder = KangarooDecoder(km.engine, km.adapter, dataclasses.replace(km.config, **overrides))
    rows = []
    for kind, prompt in prompts:
        ids = km.encode(prompt)
        t = time.perf_counter()
        r = decoder.generate(ids, 128, km.eos_token_ids)
        dt = time.perf_counter() - t
        ref, t_ar = greedy[kind]
        rows.append((kind, len(r.token_ids), round(r.compression_rate, 2), round(r.acceptance_rate, 2),
                     round(len(r.token_ids) / dt, 1), round(len(ref) / t_ar, 1), round(t_ar / dt, 2), r.token_ids == ref))
    print(f"{name}: mean compression {sum(r[2] for r in rows) / len(rows):.2f}, "
          f"mean speed-up {sum(r[6] for r in rows) / len(rows):.2f}", flush=True)
    print("    kind, tokens, compression, acceptance, kangaroo tok/s, greedy tok/s, speed-up, identical", flush=True)
    for r in rows:
        print("   ", r, flush=True)
