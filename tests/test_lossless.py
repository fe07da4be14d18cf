"""Greedy Kangaroo output == transformers' greedy generate, on tiny random models of every architecture.

The sweep covers ℓ in {1, middle, L-1}, η in {0, 0.5, 1}, γ in {1, 3, 8}, random and pass-through
adapters, prompt lengths 1..200 (past the 48-token sliding windows), max_new_tokens that end mid-round
and EOS tokens that fall inside a draft. It also checks that those paths were really taken.
"""

from __future__ import annotations

import itertools
import random

import pytest
import torch
from tiny import ARCHITECTURES, NUM_LAYERS, VOCAB, hf_greedy, passthrough_adapter, tiny_model

from kangaroo.adapter import Adapter
from kangaroo.config import KangarooConfig
from kangaroo.decoding import AutoregressiveDecoder, KangarooDecoder
from kangaroo.model import Backbone

EXIT_LAYERS = (1, NUM_LAYERS // 2, NUM_LAYERS - 1)
THRESHOLDS = (0.0, 0.5, 1.0)
MAX_STEPS = (1, 3, 8)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_kangaroo_equals_hf_greedy_sweep(arch):
    rng = random.Random(f"sweep-{arch}")
    models = {False: tiny_model(arch, seed=1), True: tiny_model(arch, seed=2, damp_from=1)}
    coverage = {"cases": 0, "all_accepted_rounds": 0, "eos_in_draft": 0, "mid_round_stop": 0, "rejections": 0}
    for ℓ, η, γ, friendly in itertools.product(EXIT_LAYERS, THRESHOLDS, MAX_STEPS, (False, True)):
        model = models[friendly]
        backbone = Backbone(model)
        # a third of the cases draft with an MLP adapter (--adapter-mlp)
        adapter = Adapter.random(backbone, ℓ, seed=rng.randrange(1000), mlp_hidden=16 if γ == 3 else 0)
        if friendly:
            passthrough_adapter(adapter)
        verify = (ℓ + γ) % 2 == 0  # both treatments of the token that fell below η, across the sweep
        config = KangarooConfig(exit_layer=ℓ, max_steps=γ, threshold=η, verify_low_confidence=verify)
        decoder = KangarooDecoder(backbone, adapter, config)
        n = rng.choice([1, 2, rng.randrange(3, 60), rng.randrange(60, 201)])
        ids = torch.randint(0, VOCAB, (1, n), generator=torch.Generator().manual_seed(rng.randrange(10**6)))
        max_new = rng.randrange(1, 41)
        full = hf_greedy(model, ids, max_new)
        # half of the cases stop at an EOS id taken from inside the reference output
        eos = {full[rng.randrange(len(full))]} if rng.random() < 0.5 else set()
        expected = hf_greedy(model, ids, max_new, eos_token_id=list(eos) or None)
        result = decoder.generate(ids, max_new, eos)
        assert result.token_ids == expected, f"{arch} ℓ={ℓ} η={η} γ={γ} n={n} max_new={max_new} eos={eos}"
        # statistics are consistent
        assert result.new_tokens == result.accepted + result.rounds
        assert all(s.accepted <= s.drafted for s in result.steps)
        coverage["cases"] += 1
        coverage["all_accepted_rounds"] += sum(s.drafted > 0 and s.accepted == s.drafted for s in result.steps[:-1])
        coverage["rejections"] += sum(s.accepted < s.drafted for s in result.steps)
        last = result.steps[-1]
        coverage["eos_in_draft"] += bool(eos) and expected[-1] in eos and last.accepted > 0
        coverage["mid_round_stop"] += len(expected) == max_new and last.drafted > 0 and not eos
    assert coverage["cases"] == len(EXIT_LAYERS) * len(THRESHOLDS) * len(MAX_STEPS) * 2
    for key, count in coverage.items():
        assert count > 0, f"sweep never exercised {key}: {coverage}"


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_autoregressive_loop_equals_hf_greedy(arch):
    model = tiny_model(arch, seed=3)
    backbone = Backbone(model)
    for n in (1, 17, 120):
        ids = torch.randint(0, VOCAB, (1, n), generator=torch.Generator().manual_seed(n))
        assert AutoregressiveDecoder(backbone).generate(ids, 30).token_ids == hf_greedy(model, ids, 30)


def test_eager_attention_matches_too():
    model = tiny_model("llama", seed=4, damp_from=2, attn_implementation="eager")
    backbone = Backbone(model)
    adapter = passthrough_adapter(Adapter.random(backbone, 2))
    decoder = KangarooDecoder(backbone, adapter, KangarooConfig(exit_layer=2, max_steps=4, threshold=0.0))
    ids = torch.randint(0, VOCAB, (1, 33), generator=torch.Generator().manual_seed(0))
    result = decoder.generate(ids, 40)
    assert result.token_ids == hf_greedy(model, ids, 40)
    assert result.accepted > 0


@pytest.mark.parametrize("verify_low_confidence", [True, False])
def test_low_confidence_token_choice_is_lossless(verify_low_confidence):
    model = tiny_model("llama", seed=5, damp_from=1)
    backbone = Backbone(model)
    adapter = passthrough_adapter(Adapter.random(backbone, 1))
    cfg = KangarooConfig(exit_layer=1, max_steps=6, threshold=0.5, verify_low_confidence=verify_low_confidence)
    ids = torch.randint(0, VOCAB, (1, 20), generator=torch.Generator().manual_seed(1))
    result = KangarooDecoder(backbone, adapter, cfg).generate(ids, 60)
    assert result.token_ids == hf_greedy(model, ids, 60)
    steps_vs_drafted = [(s.draft_steps, s.drafted) for s in result.steps[1:]]
    if verify_low_confidence:
        assert all(steps == drafted for steps, drafted in steps_vs_drafted)
    else:
        assert any(steps == drafted + 1 for steps, drafted in steps_vs_drafted)


def test_early_exit_drafter_without_adapter_is_lossless():
    from kangaroo.adapter import EarlyExitHead

    model = tiny_model("qwen2", seed=6, damp_from=2)
    backbone = Backbone(model)
    decoder = KangarooDecoder(backbone, EarlyExitHead(2), KangarooConfig(exit_layer=2, max_steps=5, threshold=0.0))
    ids = torch.randint(0, VOCAB, (1, 70), generator=torch.Generator().manual_seed(2))
    result = decoder.generate(ids, 50)
    assert result.token_ids == hf_greedy(model, ids, 50)
    assert result.accepted > 0
