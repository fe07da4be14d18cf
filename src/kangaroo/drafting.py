"""The self-draft model: shallow layers ``[0, ℓ)`` + adapter + shared LM head, with the second early exit.

A drafter owns the adapter's KV cache. It writes the shallow layers' KV into the target's cache
(those layers are the target's own), keeps every drafted token's exit-layer state ``h_ℓ`` for
verification, and after verification is told how many positions survived (:meth:`Drafter.rollback`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .adapter import Adapter
from .config import KangarooConfig
from .kv_cache import KVCache
from .engine import Engine
from .sampling import Sampler


@dataclass
class Draft:
    """One round's proposal.

    Attributes:
        tokens: ``[k]`` drafted ids ``d_1..d_k`` to verify.
        hidden: ``[1, k+1, D]`` exit-layer states of ``y_0, d_1..d_k`` (``y_0`` = last committed token).
        confidences: top-1 draft probability of each drafted token (``k`` or ``k+1`` values when the
            low-confidence token was dropped).
        steps: adapter + LM-head steps run (``k``, or ``k+1`` when the low-confidence token was dropped).
        probs: when sampling, ``[k, V]`` processed draft distributions ``q`` the tokens were drawn
            from (None when greedy or ``k == 0``).
        source: ``"adapter"`` (the self-draft model) or ``"lookup"`` (prompt lookup).
    """

    tokens: torch.Tensor
    hidden: torch.Tensor
    confidences: list[float]
    steps: int
    probs: torch.Tensor | None = None
    source: str = "adapter"


class Drafter:
    """Drafts up to γ tokens per round, stopping early when the top-1 probability drops below η.

    Args:
        backbone: the target model.
        adapter: the trained (or random) adapter for ``config.exit_layer``.
        config: ℓ, γ, η.
    """

    def __init__(self, backbone: Engine, adapter: Adapter, config: KangarooConfig) -> None:
        self.backbone, self.adapter, self.config = backbone, adapter, config
        self.cache = KVCache(num_layers=1)
        # exit-layer states the adapter has not seen yet, for positions [cache.length(), ...): the
        # prompt after prefill, or the last drafted token when every draft was accepted
        self.pending: torch.Tensor | None = None
        self.stateless = getattr(adapter, "stateless", False)  # e.g. EarlyExitHead: nothing to keep
        # the draft head: the LM head, or its rows for the adapter's draft vocabulary (then draft-head
        # index i is token vocab[i]; verification still uses the full vocabulary)
        self.head, self.vocab = backbone.draft_head(adapter)
        self.vocab_list = None if self.vocab is None else self.vocab.tolist()
        self.vocab_size = backbone.config.vocab_size

    def start(self, prompt_hidden: torch.Tensor) -> None:
        """New sequence: the prompt's exit-layer states ``[1, n, D]`` become the adapter's first input."""
        self.cache.reset()
        self.pending = None if self.stateless else prompt_hidden

    @torch.no_grad()
    def draft(self, y0: int, pos: int, target_cache: KVCache, budget: int, eos_token_ids: set[int],
              sampler: Sampler | None = None, proposal: list[int] | None = None) -> Draft:
        """Draft from the last committed token ``y0`` at position ``pos``.

        Args:
            target_cache: the target's cache; shallow layers ``[0, ℓ)`` hold ``pos`` positions.
            budget: draft at most this many tokens (the caller reserves one for the target's token).
            sampler: None = greedy drafts (argmax); else each draft is drawn from the processed draft
                distribution ``q`` (same temperature/top-k/top-p as the target), and the second early
                exit looks at ``max q``.
            proposal: tokens found by prompt lookup (greedy only): when given, they are the draft
                and the adapter does not run this round.
        """
        if proposal and sampler is None:
            return self._lookup_draft(y0, pos, target_cache, proposal[:budget])
        return self._adapter_draft(y0, pos, target_cache, budget, eos_token_ids, sampler)

    def _lookup_draft(self, y0: int, pos: int, target_cache: KVCache, proposal: list[int]) -> Draft:
        """A free draft: the shallow layers run once over ``y0`` and the proposal (row for row what
        single steps compute, see kangaroo.engine), no adapter, no LM head."""
        bb, ℓ = self.backbone, self.config.exit_layer
        ids = torch.tensor([[y0, *proposal]], device=bb.device)
        hidden = bb.run_layers(0, ℓ, bb.embed(ids), target_cache, pos)  # [1, k+1, D]
        tokens = torch.tensor(proposal, dtype=torch.long, device=bb.device)
        return Draft(tokens=tokens, hidden=hidden, confidences=[], steps=0, source="lookup")

    def _adapter_draft(self, y0: int, pos: int, target_cache: KVCache, budget: int, eos_token_ids: set[int],
                       sampler: Sampler | None) -> Draft:
        """The paper's chain: shallow layers + adapter + draft head, token by token, until γ tokens,
        the budget, an EOS, or a top-1 probability below η (the second early exit)."""
        bb, cfg, ℓ = self.backbone, self.config, self.config.exit_layer
        device = bb.device
        tokens: list[int] = []
        hidden: list[torch.Tensor] = []
        confidences: list[float] = []
        qs: list[torch.Tensor] = []
        y, low_confidence = y0, False
        for step in range(min(cfg.max_steps, budget)):
            # shallow layers on the newest token, then the adapter (fed any states it has not seen)
            ids = torch.tensor([[y]], device=device)
            h = bb.run_layers(0, ℓ, bb.embed(ids), target_cache, pos + step)  # [1, 1, D]
            hidden.append(h)
            a_in = h if self.pending is None else torch.cat([self.pending, h], dim=1)
            out = bb.adapter_forward(self.adapter, a_in, self.cache, self.cache.length())[:, -1:]  # [1, 1, D]
            self.pending = None
            logits = self.head(out).float()[0, -1]  # [V], or [V_draft] over the draft vocabulary
            if sampler is None:
                conf, idx = torch.softmax(logits, dim=-1).max(dim=-1)
                y = self._token(int(idx))
            else:
                q = sampler.probs(logits)
                conf, idx = q.max(), sampler.sample(q)
                y = self._token(idx)
                qs.append(q if self.vocab is None else q.new_zeros(self.vocab_size).index_copy_(0, self.vocab, q))
            tokens.append(y)
            confidences.append(float(conf))
            if confidences[-1] < cfg.threshold:  # second early exit
                low_confidence = True
                break
            if y in eos_token_ids:  # nothing worth drafting after an end of sequence
                break
        steps = len(tokens)
        if low_confidence and not cfg.verify_low_confidence:
            tokens.pop()
            qs = qs[: len(tokens)]
        if len(hidden) == len(tokens):
            # the last token to verify has no exit-layer state yet: run the shallow layers on it
            last = tokens[-1] if tokens else y0
            ids = torch.tensor([[last]], device=device)
            hidden.append(bb.run_layers(0, ℓ, bb.embed(ids), target_cache, pos + len(tokens)))
        return Draft(
            tokens=torch.tensor(tokens, dtype=torch.long, device=device),
            hidden=torch.cat(hidden, dim=1),
            confidences=confidences,
            steps=steps,
            probs=torch.stack(qs) if qs else None,
        )

    def _token(self, index: int) -> int:
        """Token id of draft-head output ``index`` (the draft vocabulary maps it back)."""
        return index if self.vocab is None else int(self.vocab_list[index])

    def rollback(self, new_len: int, hidden: torch.Tensor, pos: int) -> None:
        """Keep ``new_len`` positions in the adapter's view of the sequence.

        Args:
            new_len: committed positions after this round (``pos + m + 1``).
            hidden: ``[1, k+1, D]`` exit-layer states verified this round, starting at ``pos``.
            pos: position of ``hidden[:, 0]``.

        If drafts were rejected the adapter's cache is simply cropped. If every draft was accepted the
        adapter never saw the last draft's state: it is kept in :attr:`pending` and fed together with
        the next round's first state (the case the authors handle by feeding two hidden states).
        """
        seen = self.cache.length()
        if self.stateless:
            return
        if seen >= new_len:
            self.cache.crop(new_len)
            return
        parts = [] if self.pending is None else [self.pending]  # pending covers [seen, pos)
        parts.append(hidden[:, max(seen - pos, 0) : new_len - pos])
        self.pending = torch.cat(parts, dim=1)
