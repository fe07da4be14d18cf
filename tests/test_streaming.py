"""Text deltas across multi-byte characters and tokenizer merges, with a byte-level BPE tokenizer built in-process."""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import tiny_tokenizer
from kangaroo.streaming import TextDeltas, text_deltas


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def stream_in_chunks(tokenizer, ids: list[int], sizes: list[int]) -> list[str]:
    """Push ``ids`` in chunks of the given sizes (cycled); return every delta, the flush included."""
    deltas, out, i, j = TextDeltas(tokenizer), [], 0, 0
    while i < len(ids):
        n = sizes[j % len(sizes)]
        out.append(deltas.push(ids[i : i + n]))
        i, j = i + n, j + 1
    out.append(deltas.flush())
    return out


SAMPLES = [
    "Hello 👋🏽 world! 🇦🇺 kangaroo 🦘 family: 👨‍👩‍👧‍👦",
    "你好，世界。日本語のテキストと한국어 텍스트",
    "naïve café — ½ ∑ x² ≤ ∞, e\u0301 (combining accent)",
    "code:\n\n    def f(x):\n\treturn x  # tabs, newlines, trailing spaces   ",
    " . , ! ? 's n't «quotes» “curly”",
]


@pytest.mark.parametrize("text", SAMPLES)
def test_multibyte_text_streams_exactly(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False).input_ids
    # byte-level BPE really splits these characters over several tokens
    split = [i for i in range(len(ids)) if "\ufffd" in tokenizer.decode(ids[: i + 1])]
    if any(ord(c) >= 0x3000 for c in text):  # emoji and CJK
        assert split, "expected some characters split over tokens"
    full = tokenizer.decode(ids)
    for sizes in ([1], [2], [3, 1], [1, 4, 2], [len(ids)]):
        deltas = stream_in_chunks(tokenizer, ids, sizes)
        assert "".join(deltas) == full
        assert not any("\ufffd" in d for d in deltas), "an incomplete character leaked"


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(min_size=1, max_size=40), sizes=st.lists(st.integers(1, 4), min_size=1, max_size=5))
def test_any_text_streams_exactly(tokenizer, text, sizes):
    ids = tokenizer(text, add_special_tokens=False).input_ids
    deltas = stream_in_chunks(tokenizer, ids, sizes)
    full = tokenizer.decode(ids)
    assert "".join(deltas) == full
    if "\ufffd" not in full:
        assert not any("\ufffd" in d for d in deltas)
    # every intermediate emission is a prefix of the final text (nothing is ever taken back)
    acc = ""
    for d in deltas:
        acc += d
        assert full.startswith(acc)


def test_random_token_ids_and_special_tokens(tokenizer):
    rng = random.Random(0)
    special = tokenizer.all_special_ids
    for _ in range(200):
        ids = [rng.randrange(len(tokenizer)) for _ in range(rng.randrange(1, 40))]
        if rng.random() < 0.3:
            ids.insert(rng.randrange(len(ids) + 1), rng.choice(special))
        deltas = stream_in_chunks(tokenizer, ids, [rng.randint(1, 3)])
        assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=True)


class CleanupTokenizer:
    """A tokenizer whose decode removes the space before punctuation, as ``clean_up_tokenization_spaces`` does."""

    vocab = ["Hello", " ", ".", " world", "!", " ,", "x"]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.vocab[i] for i in ids).replace(" .", ".").replace(" ,", ",").replace(" !", "!")


def test_spaces_a_later_token_removes_are_held_back():
    tok = CleanupTokenizer()
    ids = [0, 1, 2, 3, 1, 4, 5, 1]  # "Hello" " " "." " world" " " "!" " ," " "
    for sizes in ([1], [2], [3]):
        deltas = stream_in_chunks(tok, ids, sizes)
        full = tok.decode(ids)
        assert "".join(deltas) == full == "Hello. world!, "
        acc = ""
        for d in deltas:
            acc += d
            assert full.startswith(acc)


def test_text_deltas_skips_empty_deltas(tokenizer):
    ids = tokenizer("🦘 hop", add_special_tokens=False).input_ids
    out = list(text_deltas(tokenizer, [[t] for t in ids]))
    assert all(out) and "".join(out) == "🦘 hop"


def test_generate_streams_each_round_with_its_step(tiny_chat_model_dir):
    from kangaroo.api import KangarooModel

    km = KangarooModel.from_pretrained(str(tiny_chat_model_dir), adapter="random", threshold=0.0)
    seen = []
    out = km.generate("Count to ten", 24, streamer=lambda text, step: seen.append((text, step)))
    assert out.text and "".join(text for text, _ in seen) == out.text == "".join(km.stream("Count to ten", 24))
    assert [step for _, step in seen[:-1]] == out.result.steps and seen[-1][1] is None  # then the tail

    calls = []

    def stop_after_two(text, step):
        calls.append(step)
        return len(calls) == 2

    early = km.generate("Count to ten", 24, streamer=stop_after_two)
    assert len(calls) == len(early.result.steps) == 2  # stopped at once, no tail call
    assert early.result.token_ids == out.result.token_ids[: early.result.new_tokens]
