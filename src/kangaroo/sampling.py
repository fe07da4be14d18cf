"""Sampling: logits processing and a seeded sampler, shared by the target and the draft.

The maths are tensor functions testable without a model: :func:`process_logits` here and
:func:`~kangaroo.verification.speculative_accept` next to the greedy rule. :class:`Sampler` binds
them to one :class:`~kangaroo.config.SamplingConfig` and one ``torch.Generator``, so a seeded
generation consumes the same random numbers in the same order every time it runs.
"""

from __future__ import annotations

import torch

from .config import SamplingConfig
from .verification import speculative_accept


def process_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Logits ``[..., V]`` -> probabilities ``[..., V]`` (float32), Hugging Face's order and rules.

    Temperature first; top-k keeps the ``k`` largest logits (ties at the k-th value are kept); top-p
    keeps the most likely tokens until their probability reaches ``top_p`` (the most likely token is
    always kept).
    """
    if temperature <= 0:
        raise ValueError("process_logits needs temperature > 0 (temperature 0 is greedy decoding)")
    logits = logits.float() / temperature
    V = logits.shape[-1]
    if 0 < top_k < V:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # [..., 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_probs, order = torch.softmax(logits, dim=-1).sort(dim=-1, descending=True)
        # drop a token when the tokens ranked above it already reach top_p
        drop_sorted = sorted_probs.cumsum(-1) - sorted_probs >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return torch.softmax(logits, dim=-1)


class Sampler:
    """One generation's sampling state: the processing settings and a seeded generator.

    Args:
        config: temperature (> 0), top-k, top-p and seed.
        device: where the generator draws (the model's device).
    """

    def __init__(self, config: SamplingConfig, device: torch.device | str = "cpu") -> None:
        if config.greedy:
            raise ValueError("Sampler is for temperature > 0; greedy decoding needs no sampler")
        self.config = config
        self.generator = torch.Generator(device=device)
        if config.seed is None:
            self.generator.seed()  # non-deterministic
        else:
            self.generator.manual_seed(config.seed)

    @classmethod
    def for_config(cls, config: SamplingConfig | None, device: torch.device | str = "cpu") -> "Sampler | None":
        """None (greedy) for no config or temperature 0, else a fresh sampler."""
        return None if config is None or config.greedy else cls(config, device)

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """Processed distribution ``[..., V]`` of raw logits ``[..., V]``."""
        c = self.config
        return process_logits(logits, c.temperature, c.top_k, c.top_p)

    def sample(self, probs: torch.Tensor) -> int:
        """One token from a ``[V]`` distribution."""
        return int(torch.multinomial(probs, 1, generator=self.generator))

    def accept(self, draft_tokens: torch.Tensor, q: torch.Tensor | None, logits: torch.Tensor) -> tuple[list[int], int]:
        """Speculative acceptance for one sequence, returning what :func:`greedy_accept` returns.

        Args:
            draft_tokens: ``[k]`` drafts. q: ``[k, V]`` their draft distributions (None when ``k == 0``).
            logits: ``[k+1, V]`` raw target logits at the drafts' positions and the one after.
        """
        p = self.probs(logits)  # [k+1, V]
        if q is None:
            q = p.new_zeros(0, p.shape[-1])
        tokens, m = speculative_accept(draft_tokens[None], q[None], p[None], self.generator)
        m = int(m[0])
        return tokens[0, : m + 1].tolist(), m
