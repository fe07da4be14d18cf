"""Lossless speculative sampling: the maths on exact tables, then the whole decoder on tiny models.

Statistical checks use fixed seeds and pass when the p-value is above ALPHA = 1e-3: a correct
sampler fails one such check with probability 0.1% for a fresh seed (about 1.5% over the fourteen
checks here), while the sensitivity checks show that a lossy sampler (drafts accepted without the
min(1, p/q) test) gets p-values below 1e-6 on the same or smaller data sizes. χ² cells whose
expected count is below 5 are pooled, as the χ² approximation needs.

* The maths (:func:`speculative_accept`), vectorised: 200,000 chains per setting draw the first
  three tokens with Kangaroo's two-round pattern (prefill sample, a round of 2 drafts, a second round
  for the chains that rejected early) from exact target/draft tables; the joint distribution of
  (y1, y2, y3) over 512 cells is compared with the exact product p1·p2·p3 (Pearson χ²; the total
  variation distance is printed).
* The decoder, end to end: real tiny HF models decode long sequences with Kangaroo sampling; each
  token's exact target distribution comes from one teacher-forced forward. The randomised
  probability integral transform U = F(y-1) + V·p(y) must be uniform on [0, 1] (it is i.i.d.
  uniform exactly when every token is drawn from its p; χ² over 20 bins), and the summed
  probability of the emitted tokens must match its expectation (|z| < 3.29, the two-sided ALPHA).
  This covers every position, round shape and cache rollback, not only the first tokens, at 5,000
  tokens per setting (20,000 in all): decoding is batch size 1 and costs a few ms per round on CPU,
  so 20,000 per setting would not fit the suite's time budget.
"""

from __future__ import annotations

import unittest.mock

import pytest
import torch
from tiny import passthrough_adapter, tiny_model

from kangaroo.adapter import Adapter
from kangaroo.config import KangarooConfig, SamplingConfig
from kangaroo.decoding import AutoregressiveDecoder, KangarooDecoder
from kangaroo.errors import KangarooError
from kangaroo.model import Backbone
from kangaroo.sampling import process_logits
from kangaroo.tree import sample_accept_tree
from kangaroo.verification import speculative_accept

ALPHA = 1e-3


def chi2_test(counts: torch.Tensor, probs: torch.Tensor, min_expected: float = 5.0) -> tuple[float, int, float]:
    """Pearson χ² of observed ``counts`` against ``probs``; returns (statistic, df, p-value)."""
    counts, probs = counts.double().flatten(), probs.double().flatten()
    expected = probs / probs.sum() * counts.sum()
    small = expected < min_expected
    if small.any():
        counts = torch.cat([counts[~small], counts[small].sum().reshape(1)])
        expected = torch.cat([expected[~small], expected[small].sum().reshape(1)])
    stat = float(((counts - expected) ** 2 / expected.clamp_min(1e-12)).sum())
    df = counts.numel() - 1
    p_value = float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), torch.tensor(stat / 2, dtype=torch.float64)))
    return stat, df, p_value


def total_variation(counts: torch.Tensor, probs: torch.Tensor) -> float:
    return 0.5 * float((counts.double() / counts.sum() - probs.double()).abs().sum())


# ---------------------------------------------------------------------------------------------- maths

def test_process_logits_matches_transformers_warpers():
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 50, generator=gen) * 3
    for temperature, top_k, top_p in [(1.0, 0, 1.0), (0.7, 0, 0.9), (1.3, 5, 1.0), (0.5, 10, 0.6), (2.0, 1, 0.3)]:
        ours = process_logits(logits, temperature, top_k, top_p)
        scores = TemperatureLogitsWarper(temperature)(None, logits.clone())
        if top_k:
            scores = TopKLogitsWarper(top_k)(None, scores)
        if top_p < 1:
            scores = TopPLogitsWarper(top_p)(None, scores)
        torch.testing.assert_close(ours, torch.softmax(scores, -1), rtol=1e-5, atol=1e-6)
    assert (process_logits(logits, 1.0, 1, 1.0).max(-1).values == 1).all()  # top-k 1 is one-hot


def test_speculative_accept_hand_made_cases():
    V = 4
    p = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25], [0.0, 0.0, 0.0, 1.0]])
    # q == p: every draft is accepted and the bonus comes from the last row
    tokens, m = speculative_accept(torch.tensor([[1, 2]]), p[None, :2], p[None], torch.Generator().manual_seed(0))
    assert m.tolist() == [2] and tokens[0].tolist() == [1, 2, 3]
    # a draft the target gives probability 0 is always rejected; the residual max(0, p - q) = p here
    q = torch.zeros(1, 2, V)
    q[0, 0, 2] = q[0, 1, 0] = 1.0
    for seed in range(20):
        tokens, m = speculative_accept(torch.tensor([[2, 0]]), q, p[None], torch.Generator().manual_seed(seed))
        assert m.item() == 0 and tokens[0, 0].item() in (0, 1)
    # no drafts: one token straight from p
    tokens, m = speculative_accept(torch.zeros(1, 0, dtype=torch.long), torch.zeros(1, 0, V), p[None, 2:], None)
    assert m.tolist() == [0] and tokens.tolist() == [[3]]


def _tables(seed: int, V: int, scale: float) -> list[torch.Tensor]:
    """Logit tables of a 3rd-order chain: ``[V]``, ``[V, V]``, ``[V, V, V]``, ``[V, V, V, V]``."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*([V] * t), V, generator=gen) * scale for t in range(4)]


def _first_three(P, Q, n: int, gen: torch.Generator, lossy: bool = False) -> torch.Tensor:
    """Kangaroo's first three tokens for ``n`` chains: a prefill sample, a round of 2 drafts, and a
    second round of 1 draft for the chains whose first round stopped after one token.
    ``lossy`` accepts every draft (a wrong sampler, for the sensitivity check)."""
    accept = speculative_accept
    if lossy:
        def accept(x, q, p, g):
            bonus = torch.multinomial(p[:, -1], 1, generator=g)
            return torch.cat([x, bonus], 1), torch.full((x.shape[0],), x.shape[1])
    V = P[0].shape[-1]
    y1 = torch.multinomial(P[0].expand(n, V), 1, generator=gen).squeeze(1)
    x1 = torch.multinomial(Q[1][y1], 1, generator=gen).squeeze(1)
    x2 = torch.multinomial(Q[2][y1, x1], 1, generator=gen).squeeze(1)
    tokens, m = accept(torch.stack([x1, x2], 1), torch.stack([Q[1][y1], Q[2][y1, x1]], 1),
                       torch.stack([P[1][y1], P[2][y1, x1], P[3][y1, x1, x2]], 1), gen)
    y2 = tokens[:, 0]
    x = torch.multinomial(Q[2][y1, y2], 1, generator=gen).squeeze(1)
    again, _ = accept(x[:, None], Q[2][y1, y2][:, None], torch.stack([P[2][y1, y2], P[3][y1, y2, x]], 1), gen)
    y3 = torch.where(m >= 1, tokens[:, 1], again[:, 0])
    return (y1 * V + y2) * V + y3


CHAIN_SETTINGS = {
    # name: (temperature, top_k, top_p, draft = "near" (target + noise) | "bad" (unrelated, peaked) | "same")
    "T=1": (1.0, 0, 1.0, "near"),
    "T=0.6 top-p=0.8": (0.6, 0, 0.8, "near"),
    "T=1.5 top-k=3": (1.5, 3, 1.0, "near"),
    "bad draft T=1": (1.0, 0, 1.0, "bad"),
    "bad draft top-p=0.7": (1.0, 0, 0.7, "bad"),
    "draft == target": (0.8, 0, 0.9, "same"),
}


@pytest.mark.parametrize("name", list(CHAIN_SETTINGS))
def test_speculative_sampling_first_three_tokens_exact(name):
    temperature, top_k, top_p, draft = CHAIN_SETTINGS[name]
    V, n = 8, 200_000
    target = _tables(1, V, 1.5)
    noise = _tables(2, V, 1.0 if draft == "near" else 4.0)
    draft_logits = {"near": [t + z for t, z in zip(target, noise)], "bad": noise, "same": target}[draft]
    P = [process_logits(t, temperature, top_k, top_p) for t in target]
    Q = [process_logits(t, temperature, top_k, top_p) for t in draft_logits]
    exact = (P[0][:, None, None] * P[1][:, :, None] * P[2]).flatten()  # [V³] p1(y1) p2(y2|y1) p3(y3|y1,y2)
    counts = torch.bincount(_first_three(P, Q, n, torch.Generator().manual_seed(7)), minlength=V**3)
    stat, df, p_value = chi2_test(counts, exact)
    tv = total_variation(counts, exact)
    print(f"{name}: χ²={stat:.1f} df={df} p={p_value:.3g} TV={tv:.4f}")
    assert p_value > ALPHA, f"{name}: χ²={stat:.1f} df={df} p={p_value:.2e} TV={tv:.4f}"
    if draft != "same":  # sensitivity: accepting drafts without the test is caught at once
        lossy = torch.bincount(_first_three(P, Q, n, torch.Generator().manual_seed(7), lossy=True), minlength=V**3)
        assert chi2_test(lossy, exact)[2] < 1e-6


def _tree_first_two(P, Q, n: int, gen: torch.Generator, width: int, lossy: bool = False) -> torch.Tensor:
    """The first two tokens after a committed token through one token-tree round: ``width``
    independent candidates from ``q1`` at depth 1, the first with a chain child from ``q2``; a round
    that yields one token is followed by a plain draw from ``p2``. ``lossy`` accepts the first
    candidate unconditionally (a wrong rule, for the sensitivity check)."""
    from kangaroo.tree import TreeLayout, sample_accept_tree

    layout = TreeLayout.of([0, 1] + [0] * (width - 1))
    V = P[0].shape[-1]
    out = torch.empty(n, dtype=torch.long)
    for s in range(n):
        c = torch.multinomial(Q[0], width, replacement=True, generator=gen).tolist()
        d = int(torch.multinomial(Q[1][c[0]], 1, generator=gen))
        tokens = [c[0], d] + c[1:]
        q = torch.stack([Q[0], Q[1][c[0]]] + [Q[0]] * (width - 1))
        p = torch.stack([P[0], P[1][c[0]], P[2][c[0], d]] + [P[1][x] for x in c[1:]])
        if lossy:
            new = [c[0], int(torch.multinomial(P[1][c[0]], 1, generator=gen))]
        else:
            new, _ = sample_accept_tree(tokens, layout, q, p, gen)
        if len(new) == 1:
            new.append(int(torch.multinomial(P[1][new[0]], 1, generator=gen)))
        out[s] = new[0] * V + new[1]
    return out


@pytest.mark.parametrize("width,draft", [(3, "near"), (2, "bad"), (4, "same")])
def test_tree_speculative_sampling_first_two_tokens_exact(width, draft):
    """Multi-candidate speculative sampling over a token tree keeps the target's joint distribution."""
    V, n = 6, 30_000
    target = _tables(3, V, 1.5)
    noise = _tables(4, V, 1.0 if draft == "near" else 4.0)
    draft_logits = {"near": [t + z for t, z in zip(target, noise)], "bad": noise, "same": target}[draft]
    P = [process_logits(t, 1.0) for t in target]
    Q = [process_logits(t, 1.0) for t in draft_logits]
    exact = (P[0][:, None] * P[1]).flatten()  # [V²] p1(y1) p2(y2|y1)
    counts = torch.bincount(_tree_first_two(P, Q, n, torch.Generator().manual_seed(5), width), minlength=V**2)
    stat, df, p_value = chi2_test(counts, exact)
    print(f"width {width}, {draft} draft: χ²={stat:.1f} df={df} p={p_value:.3g} TV={total_variation(counts, exact):.4f}")
    assert p_value > ALPHA
    if draft != "same":
        lossy = torch.bincount(_tree_first_two(P, Q, n, torch.Generator().manual_seed(5), width, lossy=True), minlength=V**2)
        assert chi2_test(lossy, exact)[2] < 1e-6


# ---------------------------------------------------------------------------------------------- decoder

def _pit(tokens: torch.Tensor, p: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Randomised probability integral transform: uniform on [0, 1] iff ``tokens[t] ~ p[t]``."""
    below = (p.cumsum(-1) - p).gather(-1, tokens[:, None]).squeeze(-1)
    mass = p.gather(-1, tokens[:, None]).squeeze(-1)
    return below + torch.rand(tokens.shape[0], generator=gen, dtype=p.dtype) * mass


DECODER_SETTINGS = {
    # name: (sampling, config, adapter kind)
    "good adapter T=1": (SamplingConfig(1.0), KangarooConfig(exit_layer=1, max_steps=4, threshold=0.0), "good"),
    "T=0.7 top-p=0.9 η=0.3, low-confidence token verified": (
        SamplingConfig(0.7, top_p=0.9), KangarooConfig(exit_layer=2, max_steps=3, threshold=0.3, verify_low_confidence=True), "random"),
    "T=0.8 top-k=5 η=0.3, low-confidence token dropped": (
        SamplingConfig(0.8, top_k=5), KangarooConfig(exit_layer=1, max_steps=5, threshold=0.3, verify_low_confidence=False), "random"),
    "bad adapter T=1": (SamplingConfig(1.0), KangarooConfig(exit_layer=1, max_steps=2, threshold=0.0), "bad"),
    # q lives on half the vocabulary (a draft vocabulary): p outside it must still come out exactly
    "draft vocabulary T=1": (SamplingConfig(1.0), KangarooConfig(exit_layer=1, max_steps=4, threshold=0.0), "good-subset"),
    # prompt-lookup drafts while sampling: point-mass drafts, accepted with probability p(x)
    "lookup drafts T=0.9 top-p=0.95": (SamplingConfig(0.9, top_p=0.95), KangarooConfig(
        exit_layer=1, max_steps=2, threshold=0.3, lookup_tokens=4, lookup_ngram=1), "random"),
    # token trees (fused engine): three independent candidates at depth 1, the first one's chain below
    "tree width 3 T=1": (SamplingConfig(1.0), KangarooConfig(exit_layer=1, max_steps=3, threshold=0.0, tree_width=3), "good-tree"),
    "tree width 2 T=0.8 top-k=6": (
        SamplingConfig(0.8, top_k=6), KangarooConfig(exit_layer=1, max_steps=2, threshold=0.2, tree_width=2), "random-tree"),
}


def _decoder_statistics(name: str, tokens_wanted: int) -> dict:
    """Decode until ``tokens_wanted`` tokens; return the PIT χ² test, the Σp(y) z-score and counters."""
    sampling, config, kind = DECODER_SETTINGS[name]
    V, max_new = 32, 250
    model = tiny_model("llama", seed=11, vocab_size=V, damp_from=1 if kind.startswith("good") else None, initializer_range=0.1,
                       num_hidden_layers=config.exit_layer + 1, hidden_size=32, intermediate_size=64)
    backbone = Backbone(model)
    adapter = Adapter.random(backbone, config.exit_layer, seed=3)
    if kind.endswith("tree"):  # token trees need the step engine
        from kangaroo.engine import FusedEngine

        backbone = FusedEngine(backbone, torch.float32, "stock")
    if kind.startswith("good"):
        passthrough_adapter(adapter)
    if kind == "good-subset":
        adapter.draft_vocab = torch.arange(0, V, 2)
    if kind == "bad":  # confident and wrong: q is nearly a point mass on an unrelated token
        with torch.no_grad():
            adapter.post_norm.weight.mul_(30.0)
    decoder = KangarooDecoder(backbone, adapter, config)
    gen = torch.Generator().manual_seed(0)
    pits, drafted, accepted, full_rounds, seed = [], 0, 0, 0, 0
    later = [0]  # tree rounds that accepted a candidate other than the first
    from_lookup = rejected_lookup = 0

    def watched(tokens, layout, q, p, generator=None):
        new, path = sample_accept_tree(tokens, layout, q, p, generator)
        later[0] += bool(path) and path[0] != 1
        return new, path

    patch = unittest.mock.patch("kangaroo.decoding.sample_accept_tree", watched)
    patch.start()
    score = mean = var = 0.0  # Σ p_t(y_t), its expectation Σ_t Σ_v p_t(v)², and its variance
    while sum(len(u) for u in pits) < tokens_wanted:
        prompt = torch.randint(0, V, (1, int(torch.randint(1, 9, (1,), generator=gen))), generator=gen)
        result = decoder.generate(prompt, max_new, sampling=SamplingConfig(**{**sampling.to_dict(), "seed": seed}))
        seed += 1
        drafted, accepted = drafted + result.drafted, accepted + result.accepted
        from_lookup += sum(s.accepted for s in result.steps if s.source == "lookup")
        rejected_lookup += sum(s.drafted - s.accepted for s in result.steps if s.source == "lookup")
        full_rounds += sum(s.drafted > 0 and s.accepted in (s.drafted, config.max_steps) for s in result.steps)
        ids = torch.cat([prompt[0], torch.tensor(result.token_ids)])
        with torch.no_grad():
            logits = model(ids[None]).logits[0, prompt.shape[1] - 1 : -1]  # [T, V] teacher-forced
        p = process_logits(logits.double(), sampling.temperature, sampling.top_k, sampling.top_p)
        y = torch.tensor(result.token_ids)
        pits.append(_pit(y, p, gen))
        score += float(p.gather(-1, y[:, None]).sum())
        mean += float((p**2).sum())
        var += float(((p**3).sum(-1) - (p**2).sum(-1) ** 2).sum())
    patch.stop()
    u = torch.cat(pits)
    counts = torch.bincount((u * 20).long().clamp(max=19), minlength=20)
    stat, df, p_value = chi2_test(counts, torch.full((20,), 1 / 20))
    return dict(tokens=len(u), chi2=stat, df=df, p_value=p_value, z=(score - mean) / var**0.5,
                drafted=drafted, accepted=accepted, full_rounds=full_rounds, kind=kind, later_candidates=later[0],
                from_lookup=from_lookup, rejected_lookup=rejected_lookup, lookup=name.startswith("lookup"))


@pytest.mark.parametrize("name", list(DECODER_SETTINGS))
def test_kangaroo_sampling_is_distributed_as_the_target(name):
    r = _decoder_statistics(name, 5_000)
    print(f"{name}: {r['tokens']} tokens, acceptance {r['accepted']}/{r['drafted']}, "
          f"χ²={r['chi2']:.1f} df={r['df']} p={r['p_value']:.3g}, z={r['z']:.2f}")
    assert r["p_value"] > ALPHA, r
    # a sharper check in the direction a lossy sampler errs (too often the draft's favourite tokens):
    # the mean probability of the emitted tokens, z-scored; |z| < 3.29 is the two-sided ALPHA test
    assert abs(r["z"]) < 3.29, r
    # the paths that matter were exercised: rejections (residual draws) and fully accepted rounds
    assert r["drafted"] - r["accepted"] > 50, r
    if r["kind"] in ("good", "good-tree"):
        assert r["full_rounds"] > 50, r
    if r["lookup"]:  # lookup drafts were both accepted and rejected while sampling
        assert r["from_lookup"] > 50 and r["rejected_lookup"] > 50, r
    if r["kind"] == "random-tree":  # (a good adapter's first candidate is rarely rejected)
        assert r["later_candidates"] > 50, r


def test_the_decoder_check_catches_a_lossy_sampler(monkeypatch):
    """Sensitivity: accepting every draft (no min(1, p/q) test) fails both checks on 1,000 tokens."""
    import kangaroo.sampling

    def accept_all(x, q, p, generator=None):
        bonus = torch.multinomial(p[:, -1], 1, generator=generator)
        return torch.cat([x, bonus], 1), torch.full((x.shape[0],), x.shape[1])

    monkeypatch.setattr(kangaroo.sampling, "speculative_accept", accept_all)
    r = _decoder_statistics("bad adapter T=1", 1_000)
    assert r["p_value"] < 1e-6 and abs(r["z"]) > 5, r  # measured: p ≈ 6e-62, z ≈ 8.3


# ---------------------------------------------------------------------------------------------- behaviour

@pytest.fixture(scope="module")
def small():
    model = tiny_model("qwen2", seed=4, damp_from=2)
    backbone = Backbone(model)
    adapter = passthrough_adapter(Adapter.random(backbone, 2))
    return KangarooDecoder(backbone, adapter, KangarooConfig(exit_layer=2, max_steps=4, threshold=0.2)), backbone


def test_seeded_sampling_is_reproducible(small):
    decoder, backbone = small
    ids = torch.arange(5)[None]
    runs = [decoder.generate(ids, 60, sampling=SamplingConfig(0.9, top_p=0.95, seed=s)).token_ids for s in (1, 1, 2)]
    assert runs[0] == runs[1] != runs[2]
    ar = AutoregressiveDecoder(backbone)
    assert ar.generate(ids, 60, sampling=SamplingConfig(1.0, seed=5)).token_ids == ar.generate(ids, 60, sampling=SamplingConfig(1.0, seed=5)).token_ids


def test_temperature_zero_and_top_k_one_are_greedy(small):
    decoder, backbone = small
    ids = torch.arange(9)[None]
    greedy = AutoregressiveDecoder(backbone).generate(ids, 50).token_ids
    assert decoder.generate(ids, 50, sampling=SamplingConfig(0.0, seed=3)).token_ids == greedy
    # top-k 1 makes p and q one-hot: speculative sampling must reduce to greedy verification
    one_hot = decoder.generate(ids, 50, sampling=SamplingConfig(1.7, top_k=1, seed=3))
    assert one_hot.token_ids == greedy and one_hot.accepted > 0
    assert AutoregressiveDecoder(backbone).generate(ids, 50, sampling=SamplingConfig(1.0, top_k=1)).token_ids == greedy


def test_sampling_stops_at_eos_and_budget(small):
    decoder, _ = small
    ids = torch.arange(3)[None]
    free = decoder.generate(ids, 40, sampling=SamplingConfig(1.0, seed=0)).token_ids
    eos = free[len(free) // 2]
    stopped = decoder.generate(ids, 40, {eos}, SamplingConfig(1.0, seed=0)).token_ids
    # (drafting stops at a drafted EOS, so the random stream may diverge from the free run)
    assert eos not in stopped[:-1] and (stopped[-1] == eos or len(stopped) == 40)
    assert len(decoder.generate(ids, 7, sampling=SamplingConfig(1.0, seed=0)).token_ids) == 7


@pytest.mark.parametrize("bad", [dict(temperature=-1.0), dict(temperature=float("nan")), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-2)])
def test_sampling_config_rejects_bad_values(bad):
    with pytest.raises(KangarooError):
        SamplingConfig(**bad)


def test_generate_cli_sampling_options(capsys, tiny_chat_model_dir):
    import json

    from kangaroo.cli import main

    def run(*extra):
        code = main(["generate", "--model", str(tiny_chat_model_dir), "--prompt", "Hello", "--max-new-tokens", "12",
                     "--json", *extra])
        captured = capsys.readouterr()
        assert code == 0, captured.err
        return json.loads(captured.out)

    a = run("--temperature", "0.8", "--top-p", "0.9", "--top-k", "50", "--seed", "3")
    assert a["sampling"] == {"temperature": 0.8, "top_p": 0.9, "top_k": 50, "seed": 3}
    assert run("--temperature", "0.8", "--top-p", "0.9", "--top-k", "50", "--seed", "3")["token_ids"] == a["token_ids"]
    compared = run("--temperature", "0.8", "--compare")
    assert compared["identical_to_greedy"] is None and compared["speedup"] > 0
    assert main(["generate", "--model", str(tiny_chat_model_dir), "--prompt", "x", "--temperature", "-1"]) == 2
    assert "temperature must be >= 0" in capsys.readouterr().err
