"""Greedy tokens from the LM head without reading all of it in bfloat16: a screened argmax.

Greedy decoding and greedy verification need only each row's argmax of the LM head's logits, and
the head is the largest product of a step (SmolLM2: 49,152 × 576, 57 MB in bfloat16, a quarter of a
one-token step). :class:`ScreenedHead` finds exactly that argmax in two passes
(``csrc/head_argmax.cpp``):

1. cheap logits ``ã`` from int8 weights (one scale per token) against the row in int16 (one scale
   per row), integer sums, and per token a rigorous bound ``E`` on ``|a − ã|``, where ``a`` is the
   logit the ``dpbf16`` head computes (its float32 chain and bfloat16 rounding included);
2. the ``dpbf16`` head's own arithmetic, bit for bit, for the few tokens with ``ã + E`` at least the
   best ``ã − E`` (1 in the median on the default model, docs/ENGINE.md §3); the first index of the
   largest exact value wins, as ``torch.argmax`` picks.

So the tokens are those of ``logits(h).argmax(-1)`` by construction, on every row, whatever the
number of rows: greedy Kangaroo stays identical to plain greedy decoding, and the output is the
same as without the screen. Sampling needs the whole distribution and keeps the full head.
"""

from __future__ import annotations

import logging
import time

import torch
from torch.nn import functional as F

from . import attention as native
from .quantized import AMX_ROWS, first_amx_rows

logger = logging.getLogger(__name__)


def head_eps(k: int) -> float:
    """Relative allowance for the ``dpbf16`` head's float32 chain over ``k`` inputs: a sequential sum
    of ``k`` exact products errs by at most ``k 2⁻²⁴ Σ|x w| ≤ k 2⁻²⁴ ‖x‖ ‖w‖``; three times that, and
    never less than 1e-4."""
    return max(1e-4, 3 * k * 2.0 ** -24)


class ScreenedHead:
    """The argmax of a bias-free ``dpbf16`` LM head, screened through int8 weights.

    Args:
        weight: the head's weight ``[V, D]`` as the ``dpbf16`` head computes with it (rounded to
            bfloat16 here, as :class:`~kangaroo.kernels.Linear` does).
        head: that :class:`~kangaroo.kernels.Linear` (``dpbf16``, no bias): pass 2 reads its packed
            weight ``[V/16, D/2, 16, 2]`` for the surviving tokens, and it decides rows that are not finite.
    """

    def __init__(self, weight: torch.Tensor, head) -> None:
        packed = head.chunks[0][2]
        w = weight.detach().to(torch.bfloat16).double()  # [V, D], exactly the head's weights
        self.vocab, d_model = w.shape
        if d_model % 2 or packed.shape[1] * 2 != d_model or packed.shape[0] * 16 < self.vocab:
            raise ValueError(f"a packed head of {list(packed.shape)} does not match a weight of {list(w.shape)}")
        scale = (w.abs().amax(1, keepdim=True) / 127).float().double()  # [V, 1], as the kernel reads it
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = torch.round(w / scale).clamp(-127, 127)
        quantised = q * scale
        up = 1 + 1e-6  # norms rounded up before they become float32
        err = ((w - quantised).norm(dim=1) + head_eps(d_model) * w.norm(dim=1)) * up
        meta = torch.stack([scale[:, 0], err, quantised.norm(dim=1) * up], dim=1).float()  # [V, 3]
        pad = packed.shape[0] * 16 - self.vocab
        self.meta = F.pad(meta, (0, 0, 0, pad)).contiguous()
        q = F.pad(q.to(torch.int8), (0, 0, 0, pad))
        self.q8 = q.view(-1, 16, d_model // 2, 2).permute(0, 2, 1, 3).contiguous()  # as dpbf16's layout
        # the same weights as AMX's B tiles want them ([V/16, D/4, 16, 4]: 4 inputs of 16 tokens per
        # 64 bytes), where the CPU has AMX-INT8; pass 1 reads them from amx_rows rows on, with the same
        # int32 sums, hence the same bits (choose_amx_rows decides by speed)
        self.q8t = torch.empty(0, dtype=torch.int8)
        self.amx_rows = 0
        if d_model % 64 == 0 and getattr(native.load(), "head_argmax_amx_available", lambda: False)():
            self.q8t = q.view(-1, 16, d_model // 4, 4).permute(0, 2, 1, 3).contiguous()
        self.packed, self.head = packed, head
        self.last_survivors: torch.Tensor | None = None  # [T]: tokens the last call recomputed exactly

    @classmethod
    def for_head(cls, head, weight: torch.Tensor) -> "ScreenedHead | None":
        """A screen for the engine's LM head (a :class:`~kangaroo.kernels.Linear`), or None where it
        cannot run: another kernel than ``dpbf16``, a bias, a head split along its input, weights
        that are not finite, or a compiled module without the kernel (no AVX512-VNNI)."""
        module = native.load()
        if (head.kernel != "dpbf16" or head.bias is not None or len(head.chunks) != 1 or head.pad_to
                or module is None or not getattr(module, "head_argmax_available", lambda: False)()
                or weight.shape[1] % 2 or not bool(torch.isfinite(weight).all())):
            return None
        return cls(weight, head)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``[T, D]`` (the final norm's output) -> ``[T]`` int64 greedy token ids."""
        tokens, survivors = native.load().head_argmax(x.to(torch.bfloat16), self.q8, self.meta, self.packed, self.vocab,
                                                      self.q8t, self.amx_rows)
        if tokens.numel() != x.shape[0]:  # a row that is not finite: the full head decides, as it did
            return self.head(x).float().argmax(-1)
        self.last_survivors = survivors
        return tokens



def choose_amx_rows(screen: ScreenedHead, cached: dict | None = None, repeats: int = 9) -> dict:
    """From how many rows the screen's pass 1 should run on AMX tiles instead of AVX-512 VNNI: the
    same int32 sums either way, hence the same tokens, so this is a choice of speed only. Times the
    screen on :data:`~kangaroo.quantized.AMX_ROWS` rows both ways, alternately, each call after the caches were evicted,
    and takes the smallest count from which AMX was at least 5% faster at every larger count (0: never). Sets
    ``screen.amx_rows``; returns ``{"head_amx_rows", "head_amx_rows_source", "head_amx_rows_us"}``;
    an earlier measurement, ``cached``, is reused."""
    if screen.q8t.numel() == 0:
        return {"head_amx_rows": 0, "head_amx_rows_source": "unavailable"}
    if cached and isinstance(cached.get("head_amx_rows"), int):
        screen.amx_rows = cached["head_amx_rows"]
        return {"head_amx_rows": screen.amx_rows, "head_amx_rows_source": "cache", "head_amx_rows_us": cached.get("head_amx_rows_us")}

    gen = torch.Generator().manual_seed(5)
    d_model = screen.q8.shape[1] * 2
    # timed cold, as in decoding, where a step's layers have just evicted the head from the caches
    # (timed warm, SmolLM2's 28 MB head came from L3 and AMX looked faster from 3 rows, where streamed
    # from memory after the layers it was no faster up to 8 rows); both ways alternately, medians
    evict = torch.empty(64 << 20, dtype=torch.uint8)
    timings = {}
    for rows in AMX_ROWS:
        # rows near a real final norm's output: a random row spreads the logits, so that hundreds
        # of tokens survive the screen instead of a few, and pass 2 would dominate
        x = torch.randn(rows, d_model, generator=gen) * 3
        times = {"without": [], "amx": []}
        for i in range(repeats + 1):
            for name, amx in (("without", 0), ("amx", 1)):
                screen.amx_rows = amx
                evict.fill_(i)
                start = time.perf_counter()
                screen(x)
                if i:  # the first round is a warm-up
                    times[name].append(time.perf_counter() - start)
        timings[str(rows)] = {name: round(sorted(t)[len(t) // 2] * 1e6, 1) for name, t in times.items()}
    # a clear win only: where both stream alike, noise would decide
    pick = screen.amx_rows = first_amx_rows(timings, AMX_ROWS, margin=0.95)
    return {"head_amx_rows": pick, "head_amx_rows_source": "measured", "head_amx_rows_us": timings}
