"""Lossless on the real default model (SmolLM2-135M-Instruct).

* eager engine (HF's own modules), float32: Kangaroo == transformers' greedy ``generate``;
* fused step engine, float32 and bfloat16: Kangaroo == plain greedy decoding on the same engine,
  with the shipped adapter and with a deep early-exit drafter (many multi-token verifications);
  the screened greedy head (bfloat16) == the full head's argmax at every position of three answers;
  the fused float32 loop also against transformers' ``generate``: any difference must sit on a
  near-tie of the logits.

Marked slow: it loads the real model (scripts/setup.sh fetches it). It runs in CI.
"""

from __future__ import annotations

import pytest
import torch

from kangaroo.adapter import EarlyExitHead
from kangaroo.api import KangarooModel
from kangaroo.config import KangarooConfig
from kangaroo.decoding import KangarooDecoder
from kangaroo.kernels import kernel_available
from kangaroo.kv_cache import KVCache

pytestmark = pytest.mark.slow

PROMPTS = [
    "Write a short poem about the sea.",
    "What is 17 times 23? Show your steps.",
    "Write a Python function that reverses a string.",
    "Translate to French: The weather is nice today and I want to go for a walk.",
    "Summarize in one sentence: The city council met on Tuesday to discuss the new park. After a long debate, "
    "members voted to approve the budget, and construction will start next spring.",
    "Give me three tips for better sleep.",
    "Explain what a black hole is to a ten-year-old.",
    "What is the capital of Australia?",
    "Write an email to my manager asking for a day off on Friday.",
    "List the planets of the solar system in order.",
]
MAX_NEW = 128


@pytest.fixture(scope="module")
def km():
    return KangarooModel.from_pretrained(dtype=torch.float32, engine="eager")


@pytest.fixture(scope="module")
def references(km):
    refs = []
    for prompt in PROMPTS:
        ids = km.encode(prompt)
        out = km.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW, do_sample=False)
        refs.append((ids, out[0, ids.shape[1] :].tolist()))
    return refs


def test_default_adapter_is_lossless_on_real_model(km, references):
    rounds = tokens = 0
    for ids, expected in references:
        result = km.decoder.generate(ids, MAX_NEW, km.eos_token_ids)
        assert result.token_ids == expected
        assert result.new_tokens == result.accepted + result.rounds
        rounds, tokens = rounds + result.rounds, tokens + result.new_tokens
    print(f"default adapter ({km.adapter_source}): compression {tokens / rounds:.2f}")


def test_early_exit_drafts_are_lossless_on_real_model(km, references):
    # a deep exit without adapter drafts well enough to make multi-token rounds common
    decoder = KangarooDecoder(km.engine, EarlyExitHead(24), KangarooConfig(exit_layer=24, max_steps=6, threshold=0.3))
    accepted = 0
    for ids, expected in references[:5]:
        result = decoder.generate(ids, MAX_NEW, km.eos_token_ids)
        assert result.token_ids == expected
        accepted += result.accepted
    assert accepted > 50


def test_autoregressive_loop_on_real_model(km, references):
    ids, expected = references[0]
    assert km.baseline.generate(ids, MAX_NEW, km.eos_token_ids).token_ids == expected


@pytest.mark.parametrize("dtype,kernel", [
    ("float32", "auto"), ("bfloat16", "auto"),
    pytest.param("bfloat16", "q4_1", marks=pytest.mark.skipif(not kernel_available("q4_1", torch.bfloat16, "cpu"),
                                                                reason="needs a CPU with AVX512-BF16")),
    pytest.param("bfloat16", "q4_1_int8", marks=pytest.mark.skipif(not kernel_available("q4_1_int8", torch.bfloat16, "cpu"),
                                                                     reason="needs a CPU with AVX512-BF16 and AVX512-VNNI")),
])
def test_fused_engine_kangaroo_equals_its_plain_greedy(km, references, dtype, kernel):
    """Every engine configuration, the GGUF file's own Q4_1 layers included (the embedded model is a
    Q4_1 file: its layers are read back from it and checked against the loaded weights)."""
    from kangaroo.calibration import build_engine
    from kangaroo.config import EngineConfig
    from kangaroo.decoding import AutoregressiveDecoder, next_token_logits

    engine, info = build_engine(km.backbone, EngineConfig(engine="fused", dtype=dtype, kernel=kernel))
    assert info["dtype"] == dtype and (kernel == "auto" or info["kernel"] == kernel)
    kangaroo = KangarooDecoder(engine, km.adapter, km.config)
    deep = KangarooDecoder(engine, EarlyExitHead(24), KangarooConfig(exit_layer=24, max_steps=6, threshold=0.3))
    plain = AutoregressiveDecoder(engine)
    accepted = differ = 0
    for i, (ids, hf_tokens) in enumerate(references):
        expected = plain.generate(ids, MAX_NEW, km.eos_token_ids).token_ids
        assert kangaroo.generate(ids, MAX_NEW, km.eos_token_ids).token_ids == expected, (dtype, i)
        if engine.greedy_head is not None and i < 3:  # the screened head is the full head's argmax
            seq = torch.cat([ids, torch.tensor([expected])], dim=1)
            h = engine.run_layers(0, engine.num_layers, engine.embed(seq), KVCache(engine.num_layers, seq.shape[1]), 0)
            assert torch.equal(engine.greedy(h), engine.logits(h)[0].argmax(-1)), (dtype, i)
        if i < 5:
            result = deep.generate(ids, MAX_NEW, km.eos_token_ids)
            assert result.token_ids == expected, (dtype, i)
            accepted += result.accepted
        if dtype == "float32" and expected != hf_tokens:
            # another summation order than HF's: only a near-tie may flip a token
            pos = next(j for j, (a, b) in enumerate(zip(expected, hf_tokens)) if a != b)
            top2 = next_token_logits(engine, torch.cat([ids, torch.tensor([expected[:pos]])], dim=1)).topk(2).values
            assert float(top2[0] - top2[1]) < 0.01, (i, pos)
            differ += 1
    assert accepted > 50
    assert differ <= 2


@pytest.mark.skipif(not kernel_available("q4_1", torch.bfloat16, "cpu"), reason="needs a CPU with AVX512-BF16")
def test_a_chat_reuses_its_previous_prompt_and_changes_no_token(km):
    """Three turns of a chat on the GGUF's own layers (prompts on int8 activations where the CPU has
    VNNI): each turn prefills only what follows the previous prompt, and every answer is the one a
    fresh decoder gives (kangaroo.decoding.PromptCache)."""
    from kangaroo import attention
    from kangaroo.calibration import build_engine
    from kangaroo.config import EngineConfig
    from kangaroo.decoding import AutoregressiveDecoder

    engine, _ = build_engine(km.backbone, EngineConfig(engine="fused", dtype="bfloat16", kernel="q4_1", attention="kernel",
                                                       kv_dtype="bfloat16" if attention.bf16_cache_native() else "float32"))
    engine.prompt_amx_rows = 0  # the one prompt path that picks its arithmetic by row count
    engine.prompt_tiles = "bfloat16" if attention.prompt_tiles_available("bfloat16") else "float32"
    engine.prompt_int8 = attention.load().linear_q4_int8_available()
    makers = {"kangaroo": lambda: KangarooDecoder(engine, km.adapter, km.config), "ar": lambda: AutoregressiveDecoder(engine)}
    for name, make in makers.items():
        decoder, chat, kept = make(), [], 0
        for question in (PROMPTS[4], "Now say it in French.", "Which word in it is the longest?"):
            chat.append({"role": "user", "content": question})
            ids = km.encode(chat)
            result = decoder.generate(ids, 48, km.eos_token_ids)
            assert result.token_ids == make().generate(ids, 48, km.eos_token_ids).token_ids, (name, len(chat))
            assert (result.cached_tokens > 0) == (kept > 0) and result.cached_tokens <= kept, (name, len(chat))
            kept = ids.shape[1]
            chat.append({"role": "assistant", "content": km.decode(result.token_ids)})
