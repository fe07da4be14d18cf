"""``kangaroo tune``: the replay of recorded drafts predicts the real rounds, and the chosen setting is
saved and used by default (explicit options still win)."""

from __future__ import annotations

import json
from dataclasses import replace

import torch

from kangaroo import tune
from kangaroo.api import KangarooModel
from kangaroo.cli import main
from kangaroo.decoding import KangarooDecoder

PROMPTS = [("repeat", "one two three four five six one two three four five six one two three"),
           ("chat", "Tell me about the sea and the sky.")]


def test_replay_predicts_the_real_rounds(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("KANGAROO_CACHE", str(tmp_path))
    km = KangarooModel.from_pretrained(str(tiny_model_dir), adapter="random", dtype="float32", kernel="stock", tuned=False)
    with torch.no_grad():
        from tiny import passthrough_adapter

        passthrough_adapter(km.adapter)
    settings = [dict(threshold=0.0, max_steps=4, lookup_tokens=0), dict(threshold=0.5, max_steps=6, lookup_tokens=6),
                # the token that fell below η verified too
                dict(threshold=0.5, max_steps=4, lookup_tokens=0, verify_low_confidence=True),
                dict(threshold=0.2, max_steps=3, lookup_tokens=10, lookup_ngram=1),
                # token trees: siblings at depth 1, and the adapter's chain beside lookup proposals
                dict(threshold=0.0, max_steps=3, lookup_tokens=0, tree_width=3, tree_threshold=0.0),
                dict(threshold=0.3, max_steps=4, lookup_tokens=6, lookup_ngram=1, lookup_branch=True, tree_width=2,
                     tree_threshold=0.05)]
    checked, accepted = set(), 0
    for _, prompt in PROMPTS:
        ids = km.encode(prompt)
        positions = tune.record(km, ids, 40, max(tune.MAX_STEPS), max(tune.LOOKUP_TOKENS))
        for s in settings:
            config = replace(km.config, **s)
            result = KangarooDecoder(km.engine, km.adapter, config).generate(ids, 40, km.eos_token_ids)
            costs = {"forward_ms": {"1": 1.0, "16": 2.0}, "verify_ms": {"1": 1.0, "16": 2.0}, "draft_step_ms": 0.1,
                     "lm_head_ms": 0.1, "exit_layer": 2, "num_layers": 4}
            tokens, rounds, ms = tune.replay(positions, config, costs)
            assert tokens == result.new_tokens - 1  # the prefill's token is not a round
            assert rounds == result.rounds - 1, (prompt, s)
            assert ms > 0
            # a tree's further branches are priced (costs["tree_extra_ms"]); a chain's rounds are not
            _, _, priced = tune.replay(positions, config, {**costs, "tree_extra_ms": {"1": 0.5, "2": 1.0}})
            branched = config.tree_width > 1 or config.lookup_branch
            assert priced > ms if branched and s["tree_threshold"] == 0.0 else priced >= ms
            if not branched:
                assert priced == ms
            # a round's first draft step priced apart (it reloads the draft path's weights): 1 ms more
            # for each round in which the adapter drafted
            _, _, split = tune.replay(positions, config, {**costs, "draft_first_ms": 1.1, "draft_next_ms": 0.1})
            drafting_rounds = split - ms
            assert abs(drafting_rounds - round(drafting_rounds)) < 1e-9 and 0 <= round(drafting_rounds) <= rounds
            if not s["lookup_tokens"]:
                assert round(drafting_rounds) >= rounds - 1  # every round but perhaps the last (no budget left)
            checked.add(tuple(sorted(s.items())))
            accepted += result.accepted
    assert len(checked) == len(settings) and accepted > 0


def test_tune_saves_a_setting_that_generate_then_uses(tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KANGAROO_CACHE", str(tmp_path))
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps([list(p) for p in PROMPTS]))
    assert main(["tune", "--model", str(tiny_model_dir), "--adapter", "random", "--threads", "1", "--prompts", str(prompts),
                 "--max-new-tokens", "12", "--out", str(tmp_path / "tune.json")]) == 0
    out = capsys.readouterr().out
    assert "chosen: η=" in out
    result = json.loads((tmp_path / "tune.json").read_text())
    best = result["best"]["config"]
    assert result["prompts"] == 2 and len(result["top"]) == 10 and result["best"]["modelled_speedup"] > 0
    km = KangarooModel.from_pretrained(str(tiny_model_dir), adapter="random", threads=1)
    assert km.config_source.startswith("tuned ")
    assert (km.config.threshold, km.config.max_steps, km.config.lookup_tokens, km.config.tree_width, km.config.lookup_branch,
            km.config.verify_low_confidence) == (best["threshold"], best["max_steps"], best["lookup_tokens"], best["tree_width"],
                                                 best["lookup_branch"], best["verify_low_confidence"])
    assert {r["config"]["verify_low_confidence"] for r in result["ranking"]} == {False, True}  # both priced
    assert any(r["config"]["tree_width"] > 1 for r in result["ranking"])  # trees were priced too
    assert any(r["config"]["lookup_branch"] for r in result["ranking"])
    given = KangarooModel.from_pretrained(str(tiny_model_dir), adapter="random", threads=1, threshold=0.95,
                                          verify_low_confidence=not best["verify_low_confidence"])
    assert given.config.threshold == 0.95 and given.config.max_steps == best["max_steps"]
    assert given.config.verify_low_confidence is not best["verify_low_confidence"]
    assert main(["tune", "--model", str(tiny_model_dir), "--adapter", "random", "--prompts", str(tmp_path / "nope.json")]) == 2


def test_tune_on_busy_cpus_says_so_and_records_it(tiny_model_dir, tmp_path, monkeypatch, capsys):
    from kangaroo import tune

    class Busy:  # a ContentionMeter that saw another process take one of two cores
        def start(self):
            return self

        def stop(self):
            return 0.5

    monkeypatch.setenv("KANGAROO_CACHE", str(tmp_path))
    monkeypatch.setattr(tune, "ContentionMeter", Busy)
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps([list(p) for p in PROMPTS[:1]]))
    assert main(["tune", "--model", str(tiny_model_dir), "--adapter", "random", "--threads", "1", "--prompts", str(prompts),
                 "--max-new-tokens", "8"]) == 0
    err = capsys.readouterr().err
    assert "warning: other processes used 50% of the CPUs while tuning" in err
    (saved,) = json.loads(tune.tuned_file().read_text()).values()
    assert saved["others_share"] == 0.5  # kept beside the choice, which is still saved: the user asked for it
