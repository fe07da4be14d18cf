"""Draft sources and the draft head: prompt-lookup drafts and the reduced draft vocabulary.

Both change only what is proposed, never what is accepted: greedy output stays identical to plain
decoding, on the eager engine against transformers and on the fused engine against its own loop."""

from __future__ import annotations

import pytest
import torch
from tiny import VOCAB, hf_greedy, passthrough_adapter, tiny_model

from kangaroo.adapter import Adapter, AdapterConfig
from kangaroo.config import KangarooConfig
from kangaroo.decoding import AutoregressiveDecoder, KangarooDecoder
from kangaroo.engine import FusedEngine
from kangaroo.errors import KangarooError
from kangaroo.lookup import NgramIndex
from kangaroo.model import Backbone


# ---------------------------------------------------------------- n-gram index
def test_lookup_proposes_what_followed_the_latest_longest_match():
    index = NgramIndex(max_ngram=3, min_ngram=2)
    index.reset([1, 2, 3, 4, 9, 2, 3, 5, 6, 7, 1, 2, 3])
    # suffix (1,2,3) occurred at the start -> followed by 4, 9, ...; it beats the later (2,3) match
    assert index.propose(3) == [4, 9, 2]
    index.extend([5])  # suffix (2,3,5): seen at positions 5..7 -> followed by 6, 7, 1
    assert index.propose(10) == [6, 7, 1, 2, 3, 5]
    assert index.propose(0) == []


def test_lookup_needs_min_ngram_and_never_matches_itself():
    index = NgramIndex(max_ngram=3, min_ngram=2)
    index.reset([5, 6, 7, 8])
    assert index.propose(4) == []  # no earlier occurrence of any suffix
    index.reset([4, 4])
    assert index.propose(4) == []  # (4, 4) only occurs as the suffix itself
    index.extend([4])
    assert index.propose(4) == [4]  # (4, 4) at 0..1 was followed by 4
    one = NgramIndex(max_ngram=1, min_ngram=1)
    one.reset([3, 8, 3])
    assert one.propose(2) == [8, 3]


def test_incremental_index_equals_a_fresh_one():
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 6, (300,), generator=gen).tolist()
    grown = NgramIndex()
    grown.reset(tokens[:10])
    for t in tokens[10:]:
        grown.extend([t])
        fresh = NgramIndex()
        fresh.reset(grown.tokens)
        assert grown.propose(5) == fresh.propose(5)


# ---------------------------------------------------------------- lookup drafts are lossless
def _repetitive_prompt(n: int = 30, seed: int = 0) -> torch.Tensor:
    """A random span said three times: tiny models then repeat it, so lookup has matches."""
    span = torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))
    return torch.cat([span, span, span])[None]


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
def test_lookup_drafts_are_lossless(arch):
    model = tiny_model(arch, seed=2, damp_from=1)
    backbone = Backbone(model)
    adapter = passthrough_adapter(Adapter.random(backbone, 1, seed=0))
    fused = FusedEngine(backbone, torch.bfloat16, "stock")
    looked_up = 0
    for seed in range(3):
        ids = _repetitive_prompt(seed=seed)
        expected = hf_greedy(model, ids, 40)
        for lookup_tokens in (3, 8):
            config = KangarooConfig(exit_layer=1, max_steps=4, threshold=0.3, lookup_tokens=lookup_tokens)
            result = KangarooDecoder(backbone, adapter, config).generate(ids, 40)
            assert result.token_ids == expected, (arch, seed, lookup_tokens)
            looked_up += sum(s.source == "lookup" for s in result.steps)
            assert all(s.drafted <= lookup_tokens for s in result.steps if s.source == "lookup")
            plain = AutoregressiveDecoder(fused).generate(ids, 40).token_ids
            assert KangarooDecoder(fused, adapter, config).generate(ids, 40).token_ids == plain
    assert looked_up > 0


def test_lookup_off_uses_the_adapter_only_and_sampling_uses_lookup_too():
    model = tiny_model("llama", seed=2, damp_from=1)
    backbone = Backbone(model)
    adapter = passthrough_adapter(Adapter.random(backbone, 1, seed=0))
    ids = _repetitive_prompt()
    off = KangarooDecoder(backbone, adapter, KangarooConfig(exit_layer=1, lookup_tokens=0)).generate(ids, 30)
    assert {s.source for s in off.steps[1:]} == {"adapter"}
    from kangaroo.config import SamplingConfig

    # sampling takes lookup proposals as point-mass drafts (exactness: tests/test_sampling.py); 1-gram
    # matches, so that a sampled continuation meets some whatever the default settings and the seed
    sampled = KangarooDecoder(backbone, adapter, KangarooConfig(exit_layer=1, lookup_ngram=1)).generate(
        ids, 30, sampling=SamplingConfig(0.8, seed=1))
    assert "lookup" in {s.source for s in sampled.steps[1:]}
    plain = KangarooDecoder(backbone, adapter, KangarooConfig(exit_layer=1, lookup_tokens=0)).generate(
        ids, 30, sampling=SamplingConfig(0.8, seed=1))
    assert {s.source for s in plain.steps[1:] if s.drafted} == {"adapter"}


# ---------------------------------------------------------------- draft vocabulary
@pytest.mark.parametrize("engine", ["eager", "fused"])
def test_draft_vocabulary_drafts_inside_it_and_stays_lossless(engine):
    model = tiny_model("qwen2", seed=2, damp_from=1)
    backbone = Backbone(model)
    adapter = passthrough_adapter(Adapter.random(backbone, 1, seed=0))
    adapter.draft_vocab = torch.arange(0, VOCAB, 3)  # a third of the tokens
    target = backbone if engine == "eager" else FusedEngine(backbone, torch.float32, "stock")
    config = KangarooConfig(exit_layer=1, max_steps=5, threshold=0.0, lookup_tokens=0)
    ids = torch.randint(0, VOCAB, (1, 40), generator=torch.Generator().manual_seed(3))
    decoder = KangarooDecoder(target, adapter, config)
    drafted = []
    original = decoder.drafter.draft

    def spy(*args, **kwargs):
        draft = original(*args, **kwargs)
        drafted.extend(draft.tokens.tolist())
        return draft

    decoder.drafter.draft = spy
    result = decoder.generate(ids, 40)
    assert result.token_ids == AutoregressiveDecoder(target).generate(ids, 40).token_ids
    assert drafted and all(t % 3 == 0 for t in drafted)
    assert result.accepted > 0


def test_draft_vocabulary_is_saved_loaded_and_checked(tmp_path):
    model = tiny_model("llama", seed=0)
    backbone = Backbone(model)
    adapter = Adapter.random(backbone, 2)
    adapter.draft_vocab = torch.tensor([0, 5, 7, 50])
    config = AdapterConfig(base_model="tiny", exit_layer=2, fingerprint=backbone.fingerprint(),
                           draft_vocab={"size": 4, "source": "test"})
    adapter.save(tmp_path / "a", config)
    loaded, cfg = Adapter.load(tmp_path / "a", backbone)
    assert loaded.draft_vocab.tolist() == [0, 5, 7, 50] and cfg.draft_vocab["size"] == 4
    plain = Adapter.random(backbone, 2)  # an adapter without one still loads as before
    plain.save(tmp_path / "b", AdapterConfig(base_model="tiny", exit_layer=2, fingerprint=backbone.fingerprint()))
    assert Adapter.load(tmp_path / "b", backbone)[0].draft_vocab is None
    with pytest.raises(KangarooError, match="names a draft vocabulary but the adapter has none"):
        plain.save(tmp_path / "c", config)
    from safetensors.torch import load_file, save_file

    state = load_file(str(tmp_path / "a" / "adapter.safetensors"))
    state["draft_vocab"] = torch.tensor([7, 5, 0])  # unsorted
    save_file(state, str(tmp_path / "a" / "adapter.safetensors"))
    with pytest.raises(KangarooError, match="corrupt draft vocabulary"):
        Adapter.load(tmp_path / "a", backbone)
    state.pop("draft_vocab")
    save_file(state, str(tmp_path / "a" / "adapter.safetensors"))
    with pytest.raises(KangarooError, match="draft vocabulary in adapter_config.json and adapter.safetensors disagree"):
        Adapter.load(tmp_path / "a", backbone)


def test_draft_vocabulary_choice_keeps_special_tokens():
    from collections import Counter

    from kangaroo.draft_vocab import choose

    counts = Counter({5: 10, 6: 9, 7: 8, 8: 1, 200: 50})
    assert choose(counts, 3, 100, always=[2]).tolist() == [2, 5, 6]  # 200 is out of the model's range


def test_draft_vocab_command_bad_input_is_one_line(tmp_path, capsys):
    from kangaroo.draft_vocab import main

    assert main(["--adapter", str(tmp_path / "nope"), "--size", "0", "--data", "x.jsonl"]) == 2
    assert capsys.readouterr().err.strip() == "kangaroo.draft_vocab: error: --size must be >= 1, got 0"
    assert main(["--adapter", str(tmp_path / "nope"), "--data", "x.jsonl"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kangaroo.draft_vocab: error: adapter not found") and err.count("\n") == 1
    assert main(["--adapter", str(tmp_path), "--data", str(tmp_path / "none.jsonl")]) == 2
    assert capsys.readouterr().err == f"kangaroo.draft_vocab: error: data file not found: {tmp_path / 'none.jsonl'}\n"
