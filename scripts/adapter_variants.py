"""usage: python scripts/adapter_variants.py base|sharp|mlp|two-attn|mha ['{"TrainConfig field": value, ...}']

Adapter variants (issue 12), trained the same way on the same data so that only the variant differs:

* ``base``: the paper's adapter (RMSNorm -> attention -> residual -> RMSNorm), soft cross-entropy;
* ``sharp``: the same adapter, target ``(p̃ + onehot(top-1)) / 2`` (``--hard-weight 0.5``);
* ``mlp``: + a residual SiLU-gated MLP after the attention (576 -> 1,152 -> 576, zero-initialised
  output, so a continued adapter starts as itself; 2.1% of SmolLM2-135M): ``--adapter-mlp 1152``;
* ``two-attn``: a second attention block (norm, attention, residual) before the final norm, its
  output projection zero-initialised (1.3%);
* ``mha``: full multi-head attention, ``kv_heads = num_attention_heads`` (a wider key/value layout,
  0.99%); a continued grouped adapter has its key/value heads repeated, the same function.

With no JSON the run is the CPU continuation of scripts/probe_common.py (150 steps from the
shipped adapter on the stage-2 data); the JSON overrides any TrainConfig field (the GPU script
scripts/gpu_adapter.sh passes its data, steps and output). ``two-attn`` exports weights that
kangaroo's loader does not read (its metrics are the result); the others export adapter folders.
"""
import json
import sys
from dataclasses import replace

import torch
from torch import nn

import kangaroo.training.trainer as T
from kangaroo.adapter import Adapter, repeat_kv_heads
from probe_common import continuation_config

VARIANTS = ("base", "sharp", "mlp", "two-attn", "mha")
if len(sys.argv) < 2 or sys.argv[1] not in VARIANTS:
    sys.exit(__doc__.split("\n\n")[0])
variant = sys.argv[1]


class TwoAttnAdapter(Adapter):
    """Two attention blocks (norm -> attention -> residual), then the final norm."""

    def add_block(self, backbone) -> "TwoAttnAdapter":
        self.norm_b = backbone.new_norm()
        self.attn_b = backbone.new_attention(self.kv_heads)
        for name, p in self.attn_b.named_parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=0.02)
        nn.init.zeros_(self.attn_b.o_proj.weight)
        return self

    def forward(self, hidden, backbone, cache, pos):
        assert cache is None, "a training probe: teacher-forced only"
        rope = backbone.position_embeddings(hidden, pos)
        mask = backbone.attention_mask(hidden.shape[1], pos, None, hidden.dtype, hidden.device)
        x = hidden + self.self_attn(hidden_states=self.input_norm(hidden), position_embeddings=rope, attention_mask=mask)[0]
        x = x + self.attn_b(hidden_states=self.norm_b(x), position_embeddings=rope, attention_mask=mask)[0]
        return self.post_norm(x)


orig_new_adapter = T._new_adapter


def new_adapter(cfg, bb):
    heads = bb.config.num_attention_heads
    if variant == "mha":  # start from the target layout (continued or fresh), then widen it
        a = orig_new_adapter(replace(cfg, kv_heads=None), bb)
        wide = Adapter(bb, a.exit_layer, heads).to(device=bb.device)
        wide.load_state_dict(repeat_kv_heads(a.state_dict(), bb.config.num_key_value_heads, heads))
        a = wide
    else:
        a = orig_new_adapter(cfg, bb)
    if variant == "two-attn":
        m = TwoAttnAdapter(bb, a.exit_layer, a.kv_heads).to(device=bb.device)
        m.load_state_dict(a.state_dict(), strict=False)
        a = m.add_block(bb)
    print(f"variant {variant}: {sum(p.numel() for p in a.parameters()):,} parameters", flush=True)
    return a.float().train()


T._new_adapter = new_adapter
cfg = continuation_config(f"runs/variant-{variant}")
overrides = json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
cfg = replace(cfg, **overrides)
if variant == "sharp":
    cfg = replace(cfg, hard_weight=0.5)
if variant == "mha":
    cfg = replace(cfg, kv_heads=cfg.kv_heads or 9)
if variant == "mlp":  # kangaroo train --adapter-mlp 1152 (2 x SmolLM2's hidden size)
    cfg = replace(cfg, adapter_mlp=cfg.adapter_mlp or 1152)
if cfg.threads:
    torch.set_num_threads(cfg.threads)
try:
    print(json.dumps(T.train(cfg), default=str))
except Exception as exc:  # the loader does not know mlp / two-attn: their metrics are the result
    print("train ended:", type(exc).__name__, str(exc)[:300])
