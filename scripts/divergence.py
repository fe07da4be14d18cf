"""How far the step engine's greedy output is from transformers' own, per dtype, and why.

usage: python scripts/divergence.py [N_PROMPTS] [MAX_NEW_TOKENS] [ENGINE ...]

ENGINE: dtype/kernel/HF dtype, e.g. bfloat16/q4_1_int8/float32 (default: float32/auto/float32 and
bfloat16/auto/bfloat16). For each it decodes the packaged tuning prompts (kangaroo/data/tune_prompts.json)
and the 6 prompts of scripts/prompts.json greedily twice: with transformers' ``generate`` on the model
loaded in that dtype (HF eager), and with our plain decoding on the fused engine of that dtype. It
prints the share of answers that are identical and, at each first differing token, the top-2 logit
gap of both implementations there (a small gap = a near-tie that rounding decided). Kangaroo itself
is identical to our plain decoding on the same engine by construction (tests/test_engine.py,
tests/test_real_model.py); this script measures the engine against another implementation.
"""

import json
import sys
from pathlib import Path

import torch

from kangaroo import KangarooModel
from kangaroo.calibration import build_engine
from kangaroo.config import EngineConfig
from kangaroo.decoding import AutoregressiveDecoder, next_token_logits
from kangaroo.model import Backbone
from kangaroo.tune import default_prompts

torch.set_num_threads(2)
n_prompts = int(sys.argv[1]) if len(sys.argv) > 1 else 18
max_new = int(sys.argv[2]) if len(sys.argv) > 2 else 128
prompts = [p for _, p in default_prompts()]
prompts += [p for _, p in json.loads(Path(__file__).with_name("prompts.json").read_text())]
prompts = prompts[:n_prompts]

engines = [e.split("/") for e in sys.argv[3:]] or [("float32", "auto", "float32"), ("bfloat16", "auto", "bfloat16")]
for dtype, kernel, hf_dtype in engines:
    km = KangarooModel.from_pretrained(engine="eager", dtype=hf_dtype)  # HF model in this dtype
    hf_model = km.model
    master = KangarooModel.from_pretrained(engine="eager", dtype="float32")  # fp32 master weights for the engine
    engine, info = build_engine(Backbone(master.model), EngineConfig(engine="fused", dtype=dtype, kernel=kernel))
    ours = AutoregressiveDecoder(engine)
    same, gaps = 0, []
    for prompt in prompts:
        ids = km.encode(prompt)
        with torch.no_grad():
            out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, do_sample=False,
                                    pad_token_id=hf_model.generation_config.eos_token_id)
        theirs = out[0, ids.shape[1]:].tolist()
        mine = ours.generate(ids, max_new, km.eos_token_ids).token_ids
        n = min(len(theirs), len(mine))
        k = next((i for i in range(n) if theirs[i] != mine[i]), None)
        if k is None and len(theirs) == len(mine):
            same += 1
            continue
        k = n if k is None else k
        context = torch.cat([ids, torch.tensor([mine[:k]], dtype=ids.dtype)], dim=1)
        g_ours = next_token_logits(engine, context).topk(2).values
        with torch.no_grad():
            g_hf = hf_model(context).logits[0, -1].float().topk(2).values
        gaps.append((k, round(float(g_ours[0] - g_ours[1]), 4), round(float(g_hf[0] - g_hf[1]), 4)))
    print(f"{dtype}: fused {info['kernel']} engine vs transformers generate ({hf_dtype} model): "
          f"{same}/{len(prompts)} answers identical ({max_new} tokens)")
    for k, a, b in gaps:
        print(f"   first difference at token {k}: top-2 logit gap ours {a}, HF {b}")
