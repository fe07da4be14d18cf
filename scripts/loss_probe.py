"""usage: python scripts/loss_probe.py soft|sharp   (after runs/task-train.sh filled runs/task-prompts and runs/task-distill)

Loss probe (issue 12, an acceptance-aligned loss): greedy drafts are accepted when the adapter's
top-1 is the target's top-1, which soft cross-entropy against the target's whole top-k only
approaches indirectly. ``sharp`` trains against a sharpened target, half the renormalised top-k
distribution and half a one-hot on the target's top-1 (soft CE plus hard CE on the greedy token,
averaged), i.e. gradient ``softmax(z) - (p̃ + onehot(top-1)) / 2``; ``soft`` is the shipped loss.
The shipped adapter continues 150 steps on the stage-2 data either way (same seed and schedule as
scripts/capacity_probe.py); validation reports the same metrics (soft-CE loss, top-1 agreement per kind)."""
import sys

import torch
from torch.nn import functional as F

import kangaroo.training.trainer as T
from probe_common import continuation_config

variant = sys.argv[1]
if variant not in ("soft", "sharp"):
    sys.exit("usage: python scripts/loss_probe.py soft|sharp")


def sharp_draft_loss(adapter, bb, h, mask, topk_ids, topk_p, chunk, autocast, backward):
    """T.draft_loss with the sharpened target in the gradient (the reported sums are unchanged)."""
    if not backward:
        return orig(adapter, bb, h, mask, topk_ids, topk_p, chunk, autocast, backward)
    with autocast():
        a = adapter(h, bb, None, 0)[mask]
    weight, bias = bb.lm_head.weight, getattr(bb.lm_head, "bias", None)
    N = a.shape[0]
    grad = torch.zeros(a.shape, dtype=torch.float32, device=a.device)
    sums = {"loss": 0.0, "agree": 0.0, "accept": 0.0, "n": N}
    with torch.no_grad():
        for c in range(0, N, chunk):
            z = F.linear(a[c:c + chunk].detach().to(weight.dtype), weight, bias).float()
            lse = torch.logsumexp(z, dim=-1, keepdim=True)
            idx, p = topk_ids[c:c + chunk].long(), topk_p[c:c + chunk]
            p_norm = p / p.sum(-1, keepdim=True)
            z_top = z.gather(-1, idx)
            sums["loss"] += float((lse.squeeze(-1) - (p_norm * z_top).sum(-1)).sum())
            sums["agree"] += float((z.argmax(-1) == idx[:, 0]).sum())
            sums["accept"] += float(torch.minimum(p, (z_top - lse).exp()).sum())
            target = p_norm / 2
            target[:, 0] += 0.5  # the target's top-1 (ids are sorted by probability)
            g = z.sub_(lse).exp_()
            g.scatter_add_(-1, idx, -target)
            grad[c:c + chunk] = (g.to(weight.dtype) @ weight).float() / N
    if N:
        a.backward(grad.to(a.dtype))
    return sums


orig = T.draft_loss
if variant == "sharp":
    T.draft_loss = sharp_draft_loss

cfg = continuation_config(f"runs/loss-{variant}")
torch.set_num_threads(2)
print(T.train(cfg))
