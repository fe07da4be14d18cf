"""Prompt-lookup drafts: continuations of the text that already appeared earlier (Saxena 2023).

Summaries, translations, retrieval answers and code edits copy long spans of their prompt, and
chat answers repeat their own phrases. When the last ``n`` committed tokens occurred earlier, the
tokens that followed them then are a draft that costs nothing to make: no layer runs. Kangaroo
verifies it like any other draft, so the output stays identical.

:class:`NgramIndex` keeps, for every n-gram (``min_ngram <= n <= max_ngram``), the position right
after its latest earlier occurrence, updated as tokens are committed, so a lookup costs a few
dictionary probes instead of a scan of the context.
"""

from __future__ import annotations


class NgramIndex:
    """Where each recent n-gram last occurred in a growing token sequence.

    Args:
        max_ngram: longest n-gram matched (tried first).
        min_ngram: shortest n-gram matched.
    """

    def __init__(self, max_ngram: int = 3, min_ngram: int = 2) -> None:
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self.tokens: list[int] = []
        self._next: dict[tuple[int, ...], int] = {}  # n-gram -> index of the token that followed it

    def reset(self, tokens: list[int]) -> None:
        """Start over with ``tokens`` (the prompt)."""
        self.tokens = []
        self._next = {}
        self.extend(tokens)

    def extend(self, tokens: list[int]) -> None:
        """Append committed tokens. An n-gram ending at the new end is not indexed until a token
        follows it, so :meth:`propose` never matches the current suffix with itself."""
        for t in tokens:
            self.tokens.append(t)
            end = len(self.tokens) - 1  # the n-grams ending just before t are followed by t
            for n in range(self.min_ngram, self.max_ngram + 1):
                if end >= n:
                    self._next[tuple(self.tokens[end - n:end])] = end

    def propose(self, k: int) -> list[int]:
        """Up to ``k`` tokens that followed the latest earlier occurrence of the longest matching
        suffix n-gram (empty when no suffix of at least ``min_ngram`` tokens occurred before)."""
        if k <= 0:
            return []
        toks = self.tokens
        for n in range(self.max_ngram, self.min_ngram - 1, -1):
            if len(toks) < n:
                continue
            start = self._next.get(tuple(toks[-n:]))
            if start is not None:
                return toks[start:start + k]
        return []
