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
    drafts, targets = draft_tokens.tolist(), target_tokens.tolist()  # a few ids: Python beats tensor ops here
    m = 0
    while m < len(drafts) and drafts[m] == targets[m]:
        m += 1
    return targets[: m + 1], m


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


def speculative_accept(
    draft_tokens: torch.Tensor, q: torch.Tensor, p: torch.Tensor, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lossless speculative sampling (Leviathan et al. 2023, Algorithm 1; Chen et al. 2023), batched.

    Draft ``x_j`` is accepted with probability ``min(1, p_j(x_j) / q_j(x_j))``; at the first rejection
    the token is drawn from the residual ``norm(max(0, p_j - q_j))``, and after ``k`` acceptances the
    bonus token is drawn from ``p_k``. Every committed token is then distributed exactly as under
    ``p``, whatever ``q`` is. Padding ``q`` with a zero row makes the bonus the residual of row ``k``,
    so one draw serves both cases.

    Args:
        draft_tokens: ``[B, k]`` drafted ids, ``x_j ~ q_j``.
        q: ``[B, k, V]`` draft distributions the drafts were sampled from.
        p: ``[B, k+1, V]`` target distributions at the same positions, plus the one after ``x_k``.
        generator: the source of randomness (``k`` uniforms + one categorical draw per row).

    Returns:
        ``(tokens, m)``: ``tokens`` ``[B, k+1]`` holds ``x_1..x_m`` then the residual/bonus token at
        index ``m`` (entries past ``m`` are meaningless); ``m`` ``[B]`` counts accepted drafts.
    """
    B, k = draft_tokens.shape
    rows = torch.arange(B, device=p.device)
    u = torch.rand(B, k, generator=generator, device=p.device)  # [B, k]
    px = p[:, :k].gather(-1, draft_tokens.unsqueeze(-1)).squeeze(-1)  # [B, k] p_j(x_j)
    qx = q.gather(-1, draft_tokens.unsqueeze(-1)).squeeze(-1)  # [B, k] q_j(x_j) > 0 (x_j was drawn from q_j)
    accepted = u * qx < px  # u < p/q, i.e. accept with probability min(1, p/q)
    m = accepted.long().cumprod(-1).sum(-1)  # [B] leading acceptances
    q_pad = torch.cat([q, q.new_zeros(B, 1, q.shape[-1])], dim=1)  # [B, k+1, V]
    residual = (p[rows, m] - q_pad[rows, m]).clamp_min(0)  # [B, V]
    # p == q up to rounding leaves no residual mass (and then a rejection is all but impossible): use p
    empty = residual.sum(-1, keepdim=True) <= 0
    residual = torch.where(empty, p[rows, m], residual)
    nxt = torch.multinomial(residual, 1, generator=generator).squeeze(-1)  # [B]
    tokens = torch.cat([draft_tokens, draft_tokens.new_zeros(B, 1)], dim=1)
    tokens[rows, m] = nxt
    return tokens, m
