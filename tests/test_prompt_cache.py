"""Prompt reuse (kangaroo.decoding.PromptCache): a prompt that begins with a decoder's previous prompt
prefills only the rest, and the output is token for token what a fresh decoder gives, for Kangaroo
(chains, trees, lookup) and plain decoding alike; where the engine cannot promise the same bits, it
prefills everything."""

from __future__ import annotations

import pytest
import torch
from tiny import ARCHITECTURES, VOCAB, passthrough_adapter, q4_layers, tiny_model

from kangaroo import attention as attn_kernel
from kangaroo.adapter import Adapter
from kangaroo.config import KangarooConfig
from kangaroo.decoding import AutoregressiveDecoder, KangarooDecoder, PromptCache
from kangaroo.engine import FusedEngine
from kangaroo.kernels import kernel_available
from kangaroo.model import Backbone

KERNELS = [k for k in ("dpbf16", "q4_1", "q4_1_int8") if kernel_available(k, torch.bfloat16, "cpu")]
pytestmark = pytest.mark.skipif(not KERNELS, reason="needs a row-invariant product kernel (AVX512-BF16)")
# the Q4_1 kernels run attention without biases (no Qwen2); dpbf16 runs every architecture
CASES = [(arch, k) for k in KERNELS for arch in (ARCHITECTURES if k == "dpbf16" else ("llama", "mistral", "qwen3"))]
WIDE = 512  # a sliding window longer than every prompt here: it never binds, so reuse stays exact


def engine_for(arch: str, kernel: str, kv: str, seed: int = 3, **overrides) -> FusedEngine:
    backbone = Backbone(tiny_model(arch, seed=seed, damp_from=1, **overrides))
    q4 = dict(q4_layers=q4_layers(backbone)) if kernel.startswith("q4_1") else {}
    engine = FusedEngine(backbone, torch.bfloat16, kernel, "kernel", **q4)
    engine.kv_dtype = getattr(torch, kv)
    tiles = [t for t in ("bfloat16", "float32") if attn_kernel.prompt_tiles_available(t)]
    engine.prompt_tiles = tiles[seed % len(tiles)]
    engine.prompt_int8 = kernel.startswith("q4_1") and attn_kernel.load().linear_q4_int8_available()
    return engine


def decoders(engine: FusedEngine):
    """A plain decoder and Kangaroo with a friendly adapter, lookup drafts and two-way trees."""
    adapter = passthrough_adapter(Adapter.random(engine.backbone, 1, seed=4, mlp_hidden=16))
    config = KangarooConfig(exit_layer=1, max_steps=4, threshold=0.0, lookup_tokens=3, tree_width=2, tree_threshold=0.05)
    return {"ar": lambda: AutoregressiveDecoder(engine), "kangaroo": lambda: KangarooDecoder(engine, adapter, config)}


def ids(*parts: tuple[int, int]) -> torch.Tensor:
    """Token ids: each part ``(seed, length)`` random, concatenated."""
    return torch.cat([torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(s)) for s, n in parts])[None]


@pytest.mark.parametrize("kv", ["float32", "bfloat16"])
@pytest.mark.parametrize("arch,kernel", CASES)
def test_a_kept_prompt_is_reused_and_changes_no_token(arch, kernel, kv):
    engine = engine_for(arch, kernel, kv, sliding_window=WIDE) if arch in ("mistral", "qwen2") else engine_for(arch, kernel, kv)
    first, turn = ids((1, 60)), ids((1, 60), (2, 40))  # a chat's next turn: the first prompt + 40 tokens
    other = ids((1, 45), (3, 50))  # shares 45 tokens with the turn, then differs
    short = ids((1, 20), (4, 40))  # shares fewer than PromptCache.MIN_TOKENS
    for name, make in decoders(engine).items():
        decoder = make()
        decoder.generate(first, 24)
        for prompt, cached in ((turn, 60), (other, 45), (short, 0), (ids((1, 20), (4, 40), (5, 30)), 60)):
            result = decoder.generate(prompt, 24)
            fresh = make().generate(prompt, 24)
            assert result.token_ids == fresh.token_ids, f"{arch} {kernel} {kv} {name} cached={cached}"
            assert (result.cached_tokens, fresh.cached_tokens) == (cached, 0), name
            assert result.stats()["cached_prompt_tokens"] == cached


def test_no_reuse_where_the_bits_could_differ():
    """A sliding window shorter than the prompt, other engine settings since the prompt was kept, a
    new part of at most 16 rows (steps' arithmetic) and the eager engine: everything is prefilled."""
    kernel = KERNELS[0]
    first, turn = ids((1, 60), (2, 10)), ids((1, 60), (2, 40))
    windowed = engine_for("mistral", kernel, "float32")  # windows of 48 tokens
    decoder = AutoregressiveDecoder(windowed)
    decoder.generate(first, 8)
    assert decoder.generate(turn, 8).cached_tokens == 0

    engine = engine_for("llama", kernel, "float32")
    decoder = AutoregressiveDecoder(engine)
    decoder.generate(first, 8)
    engine.kv_dtype = torch.bfloat16  # the kept keys and values are float32
    result = decoder.generate(turn, 8)
    assert result.cached_tokens == 0 and result.token_ids == AutoregressiveDecoder(engine).generate(turn, 8).token_ids
    assert decoder.generate(turn[:, :74], 8).cached_tokens == 74 - 17  # the last 17 rows are a prompt call again

    eager = AutoregressiveDecoder(Backbone(tiny_model("llama", seed=3)))
    eager.generate(first, 8)
    assert eager.generate(turn, 8).cached_tokens == 0


def test_an_interrupted_prefill_keeps_nothing(monkeypatch):
    engine = engine_for("llama", KERNELS[0], "float32")
    decoder = AutoregressiveDecoder(engine)
    decoder.generate(ids((1, 60)), 8)
    real = engine.run_layers

    def fail(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(engine, "run_layers", fail)
    with pytest.raises(KeyboardInterrupt):
        decoder.generate(ids((1, 70)), 8)
    monkeypatch.setattr(engine, "run_layers", real)
    assert decoder.kept.kept == []  # the slot being prefilled was not kept
    assert decoder.generate(ids((1, 90)), 8).cached_tokens == 0


@pytest.mark.parametrize("slots", [1, 2])
def test_interleaved_conversations_each_find_their_prompt_given_slots(slots):
    """Two conversations taking turns (a server's two clients): with two slots each turn reuses its
    own conversation's prompt; with one, each evicts the other's."""
    engine = engine_for("llama", KERNELS[0], "bfloat16")
    decoder = AutoregressiveDecoder(engine)
    decoder.kept = PromptCache(engine.num_layers, slots)
    a, b = ids((1, 60)), ids((7, 70))
    for turn in range(1, 3):
        a, b = torch.cat([a, ids((10 + turn, 20))], dim=1), torch.cat([b, ids((20 + turn, 25))], dim=1)
        for prompt, before in ((a, a.shape[1] - 20), (b, b.shape[1] - 25)):
            result = decoder.generate(prompt, 12)
            assert result.token_ids == AutoregressiveDecoder(engine).generate(prompt, 12).token_ids
            assert result.cached_tokens == (before if slots == 2 and turn > 1 else 0), (slots, turn)
    assert len(decoder.kept.kept) == slots


def test_bad_slot_counts_are_clear_errors():
    from kangaroo.errors import KangarooError

    for bad in (0, -1, 1.5):
        with pytest.raises(KangarooError, match="prompt slots must be a positive integer"):
            PromptCache(4, bad)
