"""Token ids in, text deltas out: safe across multi-byte characters and tokenizer merges."""

from __future__ import annotations

from typing import Iterable, Iterator


class TextDeltas:
    """Turn a growing list of token ids into the text each new batch of tokens adds.

    Decoding token by token breaks multi-byte characters (a UTF-8 emoji spread over byte tokens) and
    tokenizers whose spacing depends on neighbours. So we decode the whole generated sequence each
    time and emit only what lies past the text already emitted, holding back the tail that later
    tokens may still change:

    * trailing U+FFFD: an incomplete character whose remaining bytes have not arrived yet;
    * trailing whitespace: tokenizers that clean up spaces (``"Hello ."`` -> ``"Hello."``) or whose
      leading-space handling depends on the next token can still remove it.

    So the concatenated deltas equal ``tokenizer.decode(ids)`` after :meth:`flush`.
    """

    def __init__(self, tokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.emitted = ""  # everything returned so far

    def push(self, token_ids: Iterable[int]) -> str:
        """Add tokens; return the new text they complete (may be empty)."""
        self.ids.extend(token_ids)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=self.skip_special_tokens)
        return self._emit(text.rstrip("\ufffd").rstrip())

    def flush(self) -> str:
        """Whatever is left at the end (a genuinely invalid byte sequence is emitted as U+FFFD)."""
        return self._emit(self.tokenizer.decode(self.ids, skip_special_tokens=self.skip_special_tokens))

    def _emit(self, stable: str) -> str:
        if stable.startswith(self.emitted):
            delta, self.emitted = stable[len(self.emitted) :], stable
            return delta
        if len(stable) < len(self.emitted) and self.emitted.startswith(stable):
            return ""  # the stable part is shorter than what is out already: wait for more tokens
        # the tokenizer rewrote text that was already emitted (should not happen with the hold-back):
        # continue from the common prefix so that at least no text is lost
        delta = stable[len(_common_prefix(stable, self.emitted)) :]
        self.emitted = stable
        return delta


def _common_prefix(a: str, b: str) -> str:
    """Longest common prefix (normally all of ``b``, the text already emitted)."""
    if a.startswith(b):
        return b
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]


def text_deltas(tokenizer, batches: Iterable[list[int]]) -> Iterator[str]:
    """Yield non-empty text deltas for successive batches of token ids."""
    deltas = TextDeltas(tokenizer)
    for ids in batches:
        delta = deltas.push(ids)
        if delta:
            yield delta
    tail = deltas.flush()
    if tail:
        yield tail
