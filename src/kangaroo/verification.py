"""Accepting drafts: pure tensor functions, testable without a model."""

from __future__ import annotations

import torch


def greedy_accept(draft_tokens: torch.Tensor, target_tokens: torch.Tensor) -> tuple[list[int], int]:
    """Longest agreeing prefix plus the target's own next token.

    Args:
        draft_tokens: ``[k]`` drafted ids ``d_1..d_k``.
        target_tokens: ``[k+1]`` target argmax ids; ``target_tokens[j]`` is the target's choice for
            the position of ``d_{j+1}`` (and ``target_tokens[k]`` the bonus after ``d_k``).

    Returns:
        ``(tokens, m)``: the ``m + 1`` tokens to append (``d_1..d_m`` then ``target_tokens[m]``) and
        ``m``, the number of accepted drafts. Every round yields at least one token, so the output
        equals plain greedy decoding.
    """
    k = draft_tokens.shape[0]
    if k == 0:
        return [int(target_tokens[0])], 0
    mismatch = (draft_tokens != target_tokens[:k]).int()
    # m = number of leading matches (cumsum of mismatches stays 0 until the first one)
    m = int((mismatch.cumsum(0) == 0).sum())
    return [int(t) for t in target_tokens[: m + 1]], m


def truncate_at_stop(tokens: list[int], eos_token_ids: set[int], budget: int) -> tuple[list[int], bool]:
    """Cut ``tokens`` after the first EOS (kept) or at ``budget`` tokens.

    Returns:
        ``(tokens, finished)``; ``finished`` is True when an EOS was emitted or the budget is used up.
    """
    for i, t in enumerate(tokens):
        if t in eos_token_ids:
            tokens = tokens[: i + 1]
            return tokens[:budget], True
    return tokens[:budget], len(tokens) >= budget
