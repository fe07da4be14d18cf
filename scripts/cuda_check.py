"""Device check: greedy Kangaroo == HF greedy on tiny models of every architecture (eager engine),
greedy Kangaroo == plain greedy on the fused step engine in float32 and bfloat16 (the device's
stock kernel), then the default model in float32 and bfloat16 with speeds (our AR loop, HF
generate, Kangaroo).

usage: python scripts/cuda_check.py [DEVICE] [quick]      # DEVICE defaults to cuda; quick = 1 prompt

Run from the repository root (it imports tests/tiny.py). Each line is printed as soon as it is measured.
"""

import itertools
import json
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, "tests")
from tiny import ARCHITECTURES, VOCAB, hf_greedy, passthrough_adapter, tiny_model  # noqa: E402

from kangaroo import KangarooModel  # noqa: E402
from kangaroo.adapter import Adapter  # noqa: E402
from kangaroo.config import KangarooConfig  # noqa: E402
from kangaroo.decoding import AutoregressiveDecoder, KangarooDecoder  # noqa: E402
from kangaroo.engine import FusedEngine  # noqa: E402
from kangaroo.model import Backbone  # noqa: E402

dev = sys.argv[1] if len(sys.argv) > 1 else "cuda"
quick = len(sys.argv) > 2


def sync():
    if dev.startswith("cuda"):
        torch.cuda.synchronize()


print("device", dev, torch.cuda.get_device_name() if dev.startswith("cuda") else "", "torch", torch.__version__, flush=True)
rng = random.Random(0)
cases = bad = 0
for arch in ARCHITECTURES:
    for friendly in (False, True):
        model = tiny_model(arch, seed=1 + friendly, damp_from=1 if friendly else None).to(dev)
        bb = Backbone(model)
        for ℓ, η, γ in itertools.product((1, 2, 3), (0.0, 0.5), (1, 4)):
            adapter = Adapter.random(bb, ℓ, seed=rng.randrange(1000))
            if friendly:
                passthrough_adapter(adapter)
            decoder = KangarooDecoder(bb, adapter, KangarooConfig(exit_layer=ℓ, max_steps=γ, threshold=η))
            n = rng.choice([1, rng.randrange(3, 60), rng.randrange(60, 150)])
            ids = torch.randint(0, VOCAB, (1, n), generator=torch.Generator().manual_seed(rng.randrange(10**6))).to(dev)
            m = rng.randrange(1, 30)
            cases += 1
            bad += decoder.generate(ids, m).token_ids != hf_greedy(model, ids, m)
print(f"tiny models on {dev}: {cases} cases, {bad} differ from HF greedy", flush=True)

cases = bad = 0
for arch, dtype in itertools.product(ARCHITECTURES, (torch.float32, torch.bfloat16)):
    model = tiny_model(arch, seed=2, damp_from=1).to(dev)
    engine = FusedEngine(Backbone(model), dtype, "stock")
    for ℓ, γ in ((1, 4), (2, 8)):
        adapter = passthrough_adapter(Adapter.random(engine.backbone, ℓ, seed=ℓ))
        decoder = KangarooDecoder(engine, adapter, KangarooConfig(exit_layer=ℓ, max_steps=γ, threshold=0.0))
        ids = torch.randint(0, VOCAB, (1, 70), generator=torch.Generator().manual_seed(ℓ)).to(dev)
        cases += 1
        bad += decoder.generate(ids, 40).token_ids != AutoregressiveDecoder(engine).generate(ids, 40).token_ids
print(f"fused engine on {dev}: {cases} cases, {bad} differ from plain greedy on the same engine", flush=True)

prompts = json.loads(Path(__file__).with_name("prompts.json").read_text())[: 1 if quick else None]
print("real model: dtype, kind, tokens, compression, AR tok/s, HF generate tok/s, Kangaroo tok/s, "
      "identical to our AR, identical to HF generate", flush=True)
for dtype in ("float32", "bfloat16"):
    km = KangarooModel.from_pretrained(dtype=dtype, device=dev)
    km.decoder.generate(km.encode("Hello"), 16, km.eos_token_ids)  # warm-up
    km.baseline.generate(km.encode("Hello"), 16, km.eos_token_ids)
    for kind, prompt in prompts:
        ids = km.encode(prompt)
        sync(); t = time.perf_counter(); ar = km.baseline.generate(ids, 128, km.eos_token_ids); sync(); t_ar = time.perf_counter() - t
        sync(); t = time.perf_counter(); kg = km.decoder.generate(ids, 128, km.eos_token_ids); sync(); t_kg = time.perf_counter() - t
        sync(); t = time.perf_counter()
        hf = km.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=128, do_sample=False)[0, ids.shape[1]:].tolist()
        sync(); t_hf = time.perf_counter() - t
        hf = [x for x in hf if x not in km.eos_token_ids]
        print("  ", dtype, kind, len(kg.token_ids), round(kg.compression_rate, 2), round(len(ar.token_ids) / t_ar, 1),
              round(len(hf) / t_hf, 1), round(len(kg.token_ids) / t_kg, 1), kg.token_ids == ar.token_ids,
              kg.token_ids == hf, flush=True)
    del km
