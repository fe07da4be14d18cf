"""usage: python scripts/capacity_probe.py base|mlp   (after runs/task-train.sh filled runs/task-prompts and runs/task-distill)

Capacity probe (issue 12): the shipped adapter continued 150 steps as is, against the same with a
zero-initialised residual MLP after the attention (SiLU-gated, 576 -> 1152 -> 576). Same data (the
stage-2 self-distillation cache), same steps, same seed; reports validation agreement per kind."""
import sys
import torch
from torch import nn
from torch.nn import functional as F
from kangaroo.adapter import Adapter
import kangaroo.training.trainer as T

variant = sys.argv[1]


class MLPAdapter(Adapter):
    def add_mlp(self, d: int, inner: int) -> "MLPAdapter":
        self.mlp_norm = nn.RMSNorm(d, eps=1e-5)
        self.gate_up = nn.Linear(d, 2 * inner, bias=False)
        self.down = nn.Linear(inner, d, bias=False)
        nn.init.zeros_(self.down.weight)  # starts as the continued adapter exactly
        return self

    def forward(self, hidden, backbone, cache, pos):
        rope = backbone.position_embeddings(hidden, pos)
        mask = backbone.attention_mask(hidden.shape[1], pos, None, hidden.dtype, hidden.device)
        attn_out = self.self_attn(hidden_states=self.input_norm(hidden), position_embeddings=rope,
                                  attention_mask=mask, **backbone.cache_kwargs(cache))[0]
        x = hidden + attn_out
        g, u = self.gate_up(self.mlp_norm(x)).chunk(2, dim=-1)
        return self.post_norm(x + self.down(F.silu(g) * u))


orig = T._new_adapter


def new_adapter(cfg, bb):
    a = orig(cfg, bb)
    if variant != "mlp":
        return a
    m = MLPAdapter(bb, a.exit_layer, a.kv_heads)
    m.load_state_dict(a.state_dict(), strict=False)
    d = bb.config.hidden_size
    m.add_mlp(d, 2 * d)
    print("parameters", sum(p.numel() for p in m.parameters()), flush=True)
    return m.float().train()


T._new_adapter = new_adapter
from probe_common import continuation_config  # noqa: E402

cfg = continuation_config(f"runs/probe-{variant}")
torch.set_num_threads(2)
try:
    print(T.train(cfg))
except Exception as exc:  # export may not know the MLP; the metrics are what we want
    print("train ended:", type(exc).__name__, str(exc)[:200])
