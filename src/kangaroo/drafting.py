"""The self-draft model: shallow layers ``[0, ℓ)`` + adapter + shared LM head, with the second early exit.

A drafter owns the adapter's KV cache. It writes the shallow layers' KV into the target's cache
(those layers are the target's own), keeps every drafted token's exit-layer state ``h_ℓ`` for
verification, and after verification is told how many positions survived (:meth:`Drafter.rollback`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import torch

from . import attention as native
from .adapter import Adapter
from .config import MAX_DRAFT, KangarooConfig
from .kv_cache import KVCache
from .engine import Engine
from .sampling import Sampler
from .tree import TreeLayout

logger = logging.getLogger(__name__)


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
        tree: the rows' layout when the draft branches (:class:`~kangaroo.tree.TreeLayout`; rows
            ``0..k`` = ``y_0, d_1..d_k`` in depth-first order), None for a chain.
        sources: where each drafted row came from (``k`` values).
        adapter_rows: the drafted rows whose exit states the adapter has already consumed, in order
            (a chain of them from row 0): what survives of the adapter's cache if they are accepted.
            None = every adapter state of this round lies on the chain ``d_1..d_k``.
    """

    tokens: torch.Tensor
    hidden: torch.Tensor
    confidences: list[float]
    steps: int
    probs: torch.Tensor | None = None
    source: str = "adapter"
    tree: TreeLayout | None = None
    sources: list[str] | None = None
    adapter_rows: list[int] | None = None
    leaf_probs: list[float] | None = None  # draft probabilities of the depth-1 siblings (greedy trees)

    def source_of(self, path: list[int]) -> str:
        """The source of the accepted path (its first row), or of the draft when nothing was accepted."""
        if self.sources is None or not path:
            return self.source
        return self.sources[path[0] - 1]


class Drafter:
    """Drafts up to γ tokens per round, stopping early when the top-1 probability drops below η.

    Args:
        backbone: the target model.
        adapter: the trained (or random) adapter for ``config.exit_layer``.
        config: ℓ, γ, η.
    """

    def __init__(self, backbone: Engine, adapter: Adapter, config: KangarooConfig) -> None:
        if not backbone.supports_trees and (config.tree_width > 1 or config.lookup_branch):
            # HF's modules attend in one call: this engine verifies chains only
            logger.info("the eager engine verifies chains only: drafting without token trees")
            config = replace(config, tree_width=1, lookup_branch=False)
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
            proposal: tokens found by prompt lookup: when given, they are the draft and the adapter
                does not run this round (unless ``lookup_branch``, greedy only). When sampling, a
                proposal is a draft from a point mass: each token is accepted with probability
                ``p(x)``, and a rejection draws from ``p`` without ``x``, so the output stays exact.
        """
        cfg, ℓ = self.config, self.config.exit_layer
        lookup = proposal[:budget] if proposal else None
        if lookup and (sampler is not None or not (cfg.lookup_branch and cfg.max_steps)):
            return self._lookup_draft(y0, pos, target_cache, lookup, sampler is not None)
        if not lookup:
            return self._adapter_draft(y0, pos, target_cache, budget, eos_token_ids, sampler)
        # prompt lookup and the adapter as two branches of one tree: the lookup rows first (their
        # shallow states in one call), then the adapter's chain from y0 again (depth-first order)
        look = self._lookup_draft(y0, pos, target_cache, lookup[:MAX_DRAFT - 1])
        K = len(look.tokens)
        target_cache.crop(pos + 1, range(ℓ))
        ada = self._adapter_draft(y0, pos, target_cache, budget, eos_token_ids, None, h0=look.hidden,
                                  avoid=int(look.tokens[0]), max_rows=MAX_DRAFT - K)
        n = len(ada.tokens)
        if n == 0:
            return replace(look, steps=ada.steps, confidences=ada.confidences, adapter_rows=[])
        ada_parents = ada.tree.parents if ada.tree is not None else tuple(range(n))
        parents = list(range(K)) + [0 if p == 0 else p + K for p in ada_parents]
        return Draft(
            tokens=torch.cat([look.tokens, ada.tokens]),
            hidden=torch.cat([look.hidden, ada.hidden[:, 1:]], dim=1),
            confidences=ada.confidences,
            steps=ada.steps,
            source="lookup",
            tree=TreeLayout.of(parents),
            sources=["lookup"] * K + ["adapter"] * n,
            adapter_rows=[r + K for r in (ada.adapter_rows if ada.adapter_rows is not None else range(1, n))],
        )

    def _lookup_draft(self, y0: int, pos: int, target_cache: KVCache, proposal: list[int], sampling: bool = False) -> Draft:
        """A free draft: the shallow layers run once over ``y0`` and the proposal (row for row what
        single steps compute, see kangaroo.engine), no adapter, no LM head. ``sampling``: the draft
        distributions are point masses on the proposed tokens (``probs`` one-hot, ``[k, V]``)."""
        bb, ℓ = self.backbone, self.config.exit_layer
        ids = torch.tensor([[y0, *proposal]], device=bb.device)
        hidden = bb.run_layers(0, ℓ, bb.embed(ids), target_cache, pos)  # [1, k+1, D]
        tokens = torch.tensor(proposal, dtype=torch.long, device=bb.device)
        probs = None
        if sampling:
            probs = torch.zeros(len(proposal), self.vocab_size, device=bb.device)
            probs[torch.arange(len(proposal), device=bb.device), tokens] = 1.0
        return Draft(tokens=tokens, hidden=hidden, confidences=[], steps=0, source="lookup", probs=probs)

    def _adapter_draft(self, y0: int, pos: int, target_cache: KVCache, budget: int, eos_token_ids: set[int],
                       sampler: Sampler | None, h0: torch.Tensor | None = None, avoid: int | None = None,
                       max_rows: int = MAX_DRAFT) -> Draft:
        """The paper's chain: shallow layers + adapter + draft head, token by token, until γ tokens,
        the budget, an EOS, or a top-1 probability below η (the second early exit).

        With ``tree_width`` > 1 (and an engine that verifies trees) the first position also gets
        up to ``tree_width - 1`` more candidates as leaves: the next most likely tokens whose draft
        probability reaches ``tree_threshold`` (greedy), or further independent draws from the same
        ``q`` (sampling, as multi-candidate speculative sampling requires).

        Args:
            h0: ``y0``'s exit-layer state ``[1, >=1, D]`` (first row used) when already computed.
            avoid: a token another branch already proposes at depth 1 (greedy): not drafted again.
            max_rows: at most this many drafted rows.
        """
        bb, cfg, ℓ = self.backbone, self.config, self.config.exit_layer
        device = bb.device
        tokens: list[int] = []
        hidden: list[torch.Tensor] = []
        confidences: list[float] = []
        qs: list[torch.Tensor] = []
        leaves: list[int] = []
        y, low_confidence, avoided, q0, leaf_probs = y0, False, 0, None, []
        width = cfg.tree_width
        for step in range(min(cfg.max_steps, budget, max_rows)):
            # shallow layers on the newest token, then the adapter (fed any states it has not seen)
            if step == 0 and h0 is not None:
                h = h0[:, :1]
            else:
                ids = torch.tensor([[y]], device=device)
                h = bb.run_layers(0, ℓ, bb.embed(ids), target_cache, pos + step)  # [1, 1, D]
            hidden.append(h)
            a_in = h if self.pending is None else torch.cat([self.pending, h], dim=1)
            out = bb.adapter_forward(self.adapter, a_in, self.cache, self.cache.length(), last=1)  # [1, 1, D]
            self.pending = None
            logits = self.head(out)[0, -1]  # [V], or [V_draft] over the draft vocabulary
            if sampler is None:
                idx, conf = native.top1_prob(logits)
                y = self._token(idx)
                if step == 0 and width > 1:
                    probs = torch.softmax(logits.float(), dim=-1)
                    top = torch.topk(probs, min(width + 1, probs.shape[-1]))  # one spare: ties may put y anywhere
                    pairs = [(t, p) for p, t in zip(top.values.tolist(), map(self._token, top.indices.tolist()))
                             if t != y and p >= cfg.tree_threshold][: width - 1]
                    leaves = [t for t, _ in pairs if t != avoid]
                    leaf_probs = [p for t, p in pairs if t != avoid]
            else:
                q = sampler.probs(logits.float())
                conf, idx = q.max(), sampler.sample(q)
                y = self._token(idx)
                qs.append(q if self.vocab is None else q.new_zeros(self.vocab_size).index_copy_(0, self.vocab, q))
                if step == 0 and width > 1:  # independent draws from the same q: no selection by value
                    leaves = [self._token(sampler.sample(q)) for _ in range(width - 1)]
                    q0 = qs[0]
            if step == 0 and y == avoid:  # the other branch already drafts this token here
                avoided = 1
                break
            tokens.append(y)
            confidences.append(float(conf))
            if confidences[-1] < cfg.threshold:  # second early exit
                low_confidence = True
                break
            if y in eos_token_ids:  # nothing worth drafting after an end of sequence
                break
        steps = len(confidences) + avoided
        if low_confidence and not cfg.verify_low_confidence:
            tokens.pop()
            qs = qs[: len(tokens)]
        if len(hidden) == len(tokens):
            # the last token to verify has no exit-layer state yet: run the shallow layers on it
            last = tokens[-1] if tokens else y0
            ids = torch.tensor([[last]], device=device)
            hidden.append(bb.run_layers(0, ℓ, bb.embed(ids), target_cache, pos + len(tokens)))
        adapter_rows = list(range(1, len(confidences)))[: len(tokens)]  # rows the adapter has consumed
        leaves = leaves[: max_rows - len(tokens)]
        if sampler is None and low_confidence and not tokens:
            leaves = []  # the first token fell below η: its siblings are even less likely
        # the leaves sit at depth 1 after the chain (depth-first): their shallow states overwrite
        # slot pos + 1 of the shallow layers, which verification's commit step puts right again
        for leaf in leaves:
            target_cache.crop(pos + 1, range(ℓ))
            ids = torch.tensor([[leaf]], device=device)
            hidden.append(bb.run_layers(0, ℓ, bb.embed(ids), target_cache, pos + 1))
        n, q_rows = len(tokens), qs + [q0] * len(leaves) if sampler is not None else []
        return Draft(
            tokens=torch.tensor(tokens + leaves, dtype=torch.long, device=device),
            hidden=torch.cat(hidden, dim=1),
            confidences=confidences,
            steps=steps,
            probs=torch.stack(q_rows) if q_rows else None,
            tree=TreeLayout.of(list(range(n)) + [0] * len(leaves)) if leaves else None,
            sources=["adapter"] * (n + len(leaves)) if leaves else None,
            adapter_rows=adapter_rows if leaves or h0 is not None else None,
            leaf_probs=leaf_probs[: len(leaves)] if leaves and sampler is None else None,
        )

    def _token(self, index: int) -> int:
        """Token id of draft-head output ``index`` (the draft vocabulary maps it back)."""
        return index if self.vocab is None else int(self.vocab_list[index])

    def rollback(self, new_len: int, hidden: torch.Tensor, pos: int, adapter_end: int | None = None) -> None:
        """Keep ``new_len`` positions in the adapter's view of the sequence.

        Args:
            new_len: committed positions after this round (``pos + m + 1``).
            hidden: ``[1, >=m+1, D]`` exit-layer states of the accepted path, starting at ``pos``.
            pos: position of ``hidden[:, 0]``.
            adapter_end: when the draft branched, how far the adapter's cache holds accepted states
                (it may have run down a branch that lost); None = as far as it has run.

        If drafts were rejected the adapter's cache is simply cropped. If every draft was accepted the
        adapter never saw the last draft's state: it is kept in :attr:`pending` and fed together with
        the next round's first state (the case the authors handle by feeding two hidden states).
        """
        if self.stateless:
            return
        if adapter_end is not None:
            self.cache.crop(adapter_end)
        seen = self.cache.length()
        if seen >= new_len:
            self.cache.crop(new_len)
            return
        parts = [] if self.pending is None else [self.pending]  # pending covers [seen, pos)
        parts.append(hidden[:, max(seen - pos, 0) : new_len - pos])
        self.pending = torch.cat(parts, dim=1)
