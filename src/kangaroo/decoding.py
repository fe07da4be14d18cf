"""Decoding loops: Kangaroo (double early exit) and the plain autoregressive baseline.

Both run on the same engine (:class:`~kangaroo.engine.FusedEngine`, or HF's modules through
:class:`~kangaroo.model.Backbone`) and cache, so the baseline is the same code minus speculation.
Both are greedy by default; given a :class:`~kangaroo.config.SamplingConfig`
with temperature > 0 they sample, Kangaroo with lossless speculative sampling (the same output
distribution as the baseline's plain sampling). Each loop is a generator of :class:`Step` (the
tokens one target forward committed), so streaming, statistics and :meth:`generate` all come from
one loop.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Iterator

import torch

from .adapter import Adapter
from .config import KangarooConfig, SamplingConfig
from .drafting import Draft, Drafter
from .errors import KangarooError
from .kernels import MAX_ROWS
from .kv_cache import KVCache
from .lookup import NgramIndex
from .engine import Engine
from .sampling import Sampler
from .tree import greedy_accept_tree, sample_accept_tree
from .verification import greedy_accept, truncate_at_stop

logger = logging.getLogger(__name__)


@dataclass
class Step:
    """What one target forward committed.

    ``tokens`` = accepted drafts + the target's own token; ``accepted = len(tokens) - 1`` (the last
    committed token always comes from the target: its argmax when greedy, a draw from ``p`` or from
    the residual ``max(0, p - q)`` when sampling). ``drafted`` counts drafts sent for verification,
    ``draft_steps`` adapter steps run, ``confidences`` their top-1 probabilities.
    """

    tokens: list[int]
    drafted: int = 0
    accepted: int = 0
    draft_steps: int = 0
    confidences: list[float] = field(default_factory=list)
    source: str = ""  # where the drafts came from: "adapter", "lookup" ("" for the prefill and plain decoding)
    cached: int = 0  # the prefill only: prompt tokens whose keys and values were reused (PromptCache)


@dataclass
class GenerationResult:
    """Output ids (new tokens only) and per-round statistics of one generation."""

    token_ids: list[int]
    steps: list[Step]
    prompt_tokens: int
    prefill_s: float
    total_s: float

    @property
    def cached_tokens(self) -> int:
        """Prompt tokens not prefilled again: their keys and values were kept from the previous prompt."""
        return self.steps[0].cached if self.steps else 0

    @property
    def new_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def rounds(self) -> int:
        """Target forwards, the prefill included (it commits the first token)."""
        return len(self.steps)

    @property
    def drafted(self) -> int:
        return sum(s.drafted for s in self.steps)

    @property
    def accepted(self) -> int:
        return sum(s.accepted for s in self.steps)

    @property
    def compression_rate(self) -> float:
        """Mean tokens per target forward (bonus token counted, as Spec-Bench does)."""
        return self.new_tokens / max(self.rounds, 1)

    @property
    def acceptance_rate(self) -> float:
        """Accepted drafts / drafts sent for verification."""
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.total_s if self.total_s > 0 else 0.0

    def stats(self) -> dict:
        return {
            "new_tokens": self.new_tokens,
            "target_forwards": self.rounds,
            "drafted": self.drafted,
            "accepted": self.accepted,
            "compression_rate": self.compression_rate,
            "acceptance_rate": self.acceptance_rate,
            "tokens_per_s": self.tokens_per_s,
            "prefill_s": self.prefill_s,
            "cached_prompt_tokens": self.cached_tokens,
            "total_s": self.total_s,
        }


def check_request(backbone: Engine, input_ids: torch.Tensor, max_new_tokens: int) -> int:
    """Validate a request; return the number of new tokens the context leaves room for."""
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise KangarooError(f"expected input ids of shape [1, n], got {list(input_ids.shape)} (batch size 1 only)")
    n = input_ids.shape[1]
    if n == 0:
        raise KangarooError("empty prompt: give at least one token")
    if max_new_tokens <= 0:
        raise KangarooError(f"max_new_tokens must be > 0, got {max_new_tokens}")
    limit = backbone.max_positions
    if limit is not None and n >= limit:
        raise KangarooError(f"prompt of {n} tokens does not fit the model's context of {limit} tokens")
    if limit is not None and n + max_new_tokens > limit:
        logger.warning("max_new_tokens %d cut to %d to fit the context of %d", max_new_tokens, limit - n, limit)
        return limit - n
    return max_new_tokens


@dataclass(eq=False)  # slots are compared by identity (PromptCache.take removes one from its list)
class _Kept:
    """One kept prompt and the cache that holds its keys and values below its length."""

    cache: KVCache
    ids: torch.Tensor | None = None  # [n] the prompt (None: nothing kept, e.g. while it is prefilled)
    states: torch.Tensor | None = None  # [1, n, D] its exit-layer states (the adapter's input)
    key: tuple | None = None  # the engine's prompt_reuse_key when it was computed

    def reusable(self, reuse_key: tuple | None, input_ids: torch.Tensor) -> int:
        """How many leading tokens of ``input_ids`` ``[1, n]``, to be prefilled under the engine's
        ``reuse_key``, need no prefill here (0: none)."""
        new = input_ids[0]
        n = min(len(self.ids), len(new) - MAX_ROWS - 1) if self.ids is not None else 0
        if n < PromptCache.MIN_TOKENS or reuse_key is None or reuse_key != self.key:
            return 0
        differ = (self.ids[:n] != new[:n]).nonzero()
        shared = int(differ[0, 0]) if len(differ) else n
        return shared if shared >= PromptCache.MIN_TOKENS else 0


class PromptCache:
    """A decoder's previous prompts (``slots`` of them, most recently used first), whose keys and
    values stay in their caches below the prompt's length while they generate (every write lands
    after the prompt): a new prompt that begins with one of them (the next turn of a chat, another
    question about the same document) prefills only the rest. With several slots, interleaved
    conversations (a server's clients) each find their own; each slot holds a KV cache as long as
    its conversation.

    Reuse is exact, never approximate: only where the engine computes each prompt row from that row
    and its prefix alone, under the same settings (:meth:`~kangaroo.engine.FusedEngine.prompt_reuse_key`),
    and the new part is always a prompt call of more than :data:`~kangaroo.kernels.MAX_ROWS` rows,
    computed as a whole prompt computes it. So output is token for token what a fresh prefill gives.
    Generated tokens are not reused: steps compute them in other arithmetic than a prompt would.
    """

    MIN_TOKENS = 32  # a shorter shared prefix is prefilled again (it saves less than a step)

    def __init__(self, num_layers: int, slots: int = 1) -> None:
        if not isinstance(slots, int) or slots < 1:
            raise KangarooError(f"prompt slots must be a positive integer, got {slots!r}")
        self.num_layers, self.slots = num_layers, slots
        self.kept: list[_Kept] = []

    def take(self, reuse_key: tuple | None, input_ids: torch.Tensor) -> tuple[_Kept, int]:
        """The slot to prefill ``input_ids`` into (under the engine's ``reuse_key``) and how many of its
        leading tokens it holds: the slot sharing the longest prefix, else a new one while there is
        room, else the least recently used one. The slot keeps nothing until :meth:`keep` (so an interrupted prefill leaves none)."""
        # max keeps the first of equals: the most recently used
        r, slot = max(((s.reusable(reuse_key, input_ids), s) for s in self.kept), key=lambda p: p[0], default=(0, None))
        if r:
            self.kept.remove(slot)
        elif len(self.kept) < self.slots:
            slot = _Kept(KVCache(self.num_layers))
        else:
            slot = self.kept.pop()
        slot.ids = None
        return slot, r

    def keep(self, slot: _Kept, reuse_key: tuple | None, input_ids: torch.Tensor, states: torch.Tensor) -> None:
        """``slot`` now holds the prompt ``input_ids`` ``[1, n]`` (its keys and values below ``n``, computed
        under ``reuse_key``) and its exit-layer states ``[1, n, D]``: the most recently used."""
        slot.ids, slot.states, slot.key = input_ids[0].clone(), states, reuse_key
        self.kept.insert(0, slot)
        del self.kept[self.slots:]

    def clear(self) -> None:
        """Keep nothing: the next prompt is prefilled whole."""
        self.kept.clear()


def _prefill(backbone: Engine, input_ids: torch.Tensor, exit_layer: int, sampler: Sampler | None, kept: PromptCache):
    """The prompt through all layers, after the part a kept prompt still holds (whose keys and values
    are then used as they are). Returns (the cache it is now in, first token, exit-layer states
    ``[1, n, D]``, reused tokens)."""
    reuse_key = backbone.prompt_reuse_key(input_ids.shape[1])
    slot, r = kept.take(reuse_key, input_ids)
    cache = slot.cache
    cache.crop(r)
    h_exit = backbone.run_layers(0, exit_layer, backbone.embed(input_ids[:, r:]), cache, r)
    h_last = backbone.run_layers(exit_layer, backbone.num_layers, h_exit, cache, r, last=1)  # [1, 1, D]
    if r:
        h_exit = torch.cat([slot.states[:, :r], h_exit], dim=1)
    kept.keep(slot, reuse_key, input_ids, h_exit)
    return cache, _next_token(backbone, h_last, sampler), h_exit, r


@torch.no_grad()
def next_token_logits(backbone: Engine, input_ids: torch.Tensor) -> torch.Tensor:
    """The target's float32 logits ``[V]`` for the token after ``input_ids`` ``[1, n]`` (a fresh prefill)."""
    cache = KVCache(backbone.num_layers, input_ids.shape[1])
    h = backbone.run_layers(0, backbone.num_layers, backbone.embed(input_ids), cache, 0, last=1)
    return backbone.logits(h)[0, -1]


def target_verdict(backbone: Engine, h_last: torch.Tensor, sampler: Sampler | None) -> torch.Tensor:
    """What acceptance needs of the target over the draft's rows ``h_last`` ``[1, k+1, D]``: its greedy
    tokens ``[k+1]`` (greedy: only the head's argmax, :meth:`~kangaroo.engine.FusedEngine.greedy`) or
    its logits ``[k+1, V]`` (sampling)."""
    return backbone.greedy(h_last) if sampler is None else backbone.logits(h_last)[0]


def accept(draft: Draft, verdict: torch.Tensor, sampler: Sampler | None) -> tuple[list[int], list[int]]:
    """The round's new tokens and the accepted rows (``1..m`` for a chain) from the target's
    :func:`target_verdict` over the draft's rows (greedy tokens ``[k+1]``, or logits ``[k+1, V]``)."""
    if draft.tree is None:
        if sampler is None:
            new, m = greedy_accept(draft.tokens, verdict)
        else:
            new, m = sampler.accept(draft.tokens, draft.probs, verdict)
        return new, list(range(1, m + 1))
    tokens = draft.tokens.tolist()
    if sampler is None:
        return greedy_accept_tree(tokens, draft.tree, verdict.tolist())
    return sample_accept_tree(tokens, draft.tree, draft.probs, sampler.probs(verdict), sampler.generator)


def adapter_end(draft: Draft, path: list[int], pos: int) -> int | None:
    """How far the adapter's cache holds accepted states after a branching round (None: a chain)."""
    if draft.adapter_rows is None:
        return None
    kept = 0
    for row, mine in zip(path, draft.adapter_rows):
        if row != mine:
            break
        kept += 1
    return pos + 1 + kept


def _next_token(backbone: Engine, h_last: torch.Tensor, sampler: Sampler | None) -> int:
    """The target's token after the last-layer state ``h_last`` ``[1, 1, D]``: its argmax, or a draw
    from the processed ``p``."""
    if sampler is None:
        return int(backbone.greedy(h_last)[0])
    return sampler.sample(sampler.probs(backbone.logits(h_last)[0, -1]))


class KangarooDecoder:
    """Kangaroo decoding: greedy (token-identical to the target's plain greedy decoding) or sampling
    (lossless speculative sampling: the same output distribution as plain sampling from the target).

    Args:
        backbone: the target.
        adapter: adapter for ``config.exit_layer``.
        config: ℓ (``exit_layer``), γ (``max_steps``), η (``threshold``).
    """

    def __init__(self, backbone: Engine, adapter: Adapter, config: KangarooConfig) -> None:
        if adapter.exit_layer != config.exit_layer:
            raise KangarooError(f"adapter is for exit layer {adapter.exit_layer}, config asks for {config.exit_layer}")
        self.backbone, self.config = backbone, config
        self.drafter = Drafter(backbone, adapter, config)
        self.kept = PromptCache(backbone.num_layers)
        self.cache: KVCache | None = None  # the current sequence's (a slot of ``kept``)

    @torch.no_grad()
    def stream(self, input_ids: torch.Tensor, max_new_tokens: int, eos_token_ids: set[int] = frozenset(),
               sampling: SamplingConfig | None = None) -> Iterator[Step]:
        """Yield one :class:`Step` per target forward until EOS or ``max_new_tokens``.

        Args:
            input_ids: ``[1, n]`` prompt ids.
            sampling: None or temperature 0 = greedy; else temperature/top-k/top-p sampling, seeded
                by ``sampling.seed`` (the same seed gives the same tokens).
        """
        bb, ℓ, L = self.backbone, self.config.exit_layer, self.backbone.num_layers
        budget = check_request(bb, input_ids, max_new_tokens)
        sampler = Sampler.for_config(sampling, bb.device)
        self.cache, y, h_prompt, cached = _prefill(bb, input_ids, ℓ, sampler, self.kept)
        self.drafter.start(h_prompt)
        pos = input_ids.shape[1]  # position of y, the last committed token
        tokens, done = truncate_at_stop([y], eos_token_ids, budget)
        lookup = self._lookup(input_ids, tokens, sampler)
        yield Step(tokens, cached=cached)
        budget -= len(tokens)
        while not done:
            # 1. draft: a continuation of an earlier occurrence of the last n-gram (prompt lookup,
            #    free), else shallow layers + adapter, at most γ tokens, stop when top-1 prob < η; one
            #    token of the budget is kept for the target's own (sampling: drafts are drawn from q)
            proposal = lookup.propose(min(self.config.lookup_tokens, budget - 1)) if lookup else None
            draft = self.drafter.draft(y, pos, self.cache, budget - 1, eos_token_ids, sampler, proposal)
            # 2. verify: only layers [ℓ, L) run, over the exit-layer states drafting already computed
            #    (a token tree: every row at its depth, attending over the prefix and its ancestors)
            h_last = bb.run_layers(ℓ, L, draft.hidden, self.cache, pos, draft.tree)  # [1, k+1, D]
            verdict = target_verdict(bb, h_last, sampler)  # greedy tokens [k+1] or logits [k+1, V]
            # 3. accept the longest agreeing prefix (path) plus the target's own next token (greedy),
            #    or each draft with prob min(1, p/q), then a residual or bonus draw (sampling)
            new, path = accept(draft, verdict, sampler)
            m = len(path)
            tokens, done = truncate_at_stop(new, eos_token_ids, budget)
            # 4. roll back every cache to the committed length, with the accepted path in place
            self._keep_path(draft, path, pos)
            kept = draft.hidden[:, :m + 1] if draft.tree is None else draft.hidden[:, [0, *path]]  # a chain's path: rows 1..m
            self.drafter.rollback(pos + m + 1, kept, pos, adapter_end(draft, path, pos))
            yield Step(tokens, len(draft.tokens), len(tokens) - 1, draft.steps, draft.confidences,
                       draft.source_of(path))
            if lookup:
                lookup.extend(tokens)
            budget -= len(tokens)
            pos, y = pos + m + 1, new[-1]

    def _keep_path(self, draft: Draft, path: list[int], pos: int) -> None:
        """Every layer ends after the accepted path, whose keys and values sit at ``pos + 1 ..``: for a
        chain this is a crop; a tree's later branches may have overwritten the path's slots, so the
        deep layers copy it back from verification's stash and the shallow layers recompute it."""
        bb, ℓ, L = self.backbone, self.config.exit_layer, self.backbone.num_layers
        if draft.tree is None or draft.tree.resident(path):
            self.cache.commit(range(L), pos, path, resident=True)
        else:
            self.cache.commit(range(ℓ, L), pos, path, resident=False)
            self.cache.crop(pos + 1, range(ℓ))
            ids = draft.tokens[[r - 1 for r in path]][None]
            bb.run_layers(0, ℓ, bb.embed(ids), self.cache, pos + 1)

    def _lookup(self, input_ids: torch.Tensor, first: list[int], sampler: Sampler | None) -> NgramIndex | None:
        """The n-gram index over prompt + first token, when lookup drafts are on."""
        cfg = self.config
        if not cfg.lookup_tokens:
            return None
        index = NgramIndex(max_ngram=max(3, cfg.lookup_ngram), min_ngram=cfg.lookup_ngram)
        index.reset(input_ids[0].tolist() + first)
        return index

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, eos_token_ids: set[int] = frozenset(),
                 sampling: SamplingConfig | None = None) -> GenerationResult:
        """Run :meth:`stream` to the end and collect ids, statistics and timings."""
        steps = self.stream(input_ids, max_new_tokens, eos_token_ids, sampling)
        return collect(steps, input_ids.shape[1], self.backbone)


class AutoregressiveDecoder:
    """Plain decoding through the same backbone and cache: the in-house baseline (greedy, or
    sampling from the processed target distribution when given a :class:`SamplingConfig`)."""

    def __init__(self, backbone: Engine) -> None:
        self.backbone = backbone
        self.kept = PromptCache(backbone.num_layers)
        self.cache: KVCache | None = None  # the current sequence's (a slot of ``kept``)

    @torch.no_grad()
    def stream(self, input_ids: torch.Tensor, max_new_tokens: int, eos_token_ids: set[int] = frozenset(),
               sampling: SamplingConfig | None = None) -> Iterator[Step]:
        bb, L = self.backbone, self.backbone.num_layers
        budget = check_request(bb, input_ids, max_new_tokens)
        sampler = Sampler.for_config(sampling, bb.device)
        self.cache, y, _, cached = _prefill(bb, input_ids, 0, sampler, self.kept)  # no exit-layer states needed
        pos = input_ids.shape[1]
        tokens, done = truncate_at_stop([y], eos_token_ids, budget)
        yield Step(tokens, cached=cached)
        budget -= len(tokens)
        while not done:
            h = bb.run_layers(0, L, bb.embed(torch.tensor([[y]], device=bb.device)), self.cache, pos)
            y = _next_token(bb, h, sampler)
            tokens, done = truncate_at_stop([y], eos_token_ids, budget)
            yield Step(tokens)
            budget, pos = budget - 1, pos + 1

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, eos_token_ids: set[int] = frozenset(),
                 sampling: SamplingConfig | None = None) -> GenerationResult:
        steps = self.stream(input_ids, max_new_tokens, eos_token_ids, sampling)
        return collect(steps, input_ids.shape[1], self.backbone)


def collect(steps: Iterator[Step], prompt_tokens: int, backbone: Engine) -> GenerationResult:
    """Drain a step iterator, timing the prefill (first step) and the whole run."""
    sync = torch.cuda.synchronize if backbone.device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    out: list[Step] = []
    prefill_s = 0.0
    for step in steps:
        out.append(step)
        if len(out) == 1:
            sync()
            prefill_s = time.perf_counter() - start
    sync()
    total = time.perf_counter() - start
    ids = [t for s in out for t in s.tokens]
    return GenerationResult(token_ids=ids, steps=out, prompt_tokens=prompt_tokens, prefill_s=prefill_s, total_s=total)
