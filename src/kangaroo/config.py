"""Configuration dataclasses, with the paper's names and defaults in one commented block."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class KangarooConfig:
    """How one Kangaroo decode runs (Liu et al. 2024, section 3).

    Defaults follow the paper's Vicuna-7B setting except ``exit_layer``, which is chosen per model
    (the shipped adapter's config overrides it).
    """

    exit_layer: int = 2  # ℓ: layers run by the self-draft model before the adapter (first early exit)
    max_steps: int = 6  # γ: at most this many drafted tokens per round
    threshold: float = 0.6  # η: stop drafting once the draft's top-1 probability falls below this (second early exit)
    verify_low_confidence: bool = True  # send the token that fell below η for verification (the authors' code does)

    def __post_init__(self) -> None:
        from .errors import KangarooError

        if self.max_steps < 0:
            raise KangarooError(f"max_steps (γ) must be >= 0, got {self.max_steps}")
        if not 0.0 <= self.threshold <= 1.0:
            raise KangarooError(f"threshold (η) must be in [0, 1], got {self.threshold}")

    def to_dict(self) -> dict:
        return asdict(self)
