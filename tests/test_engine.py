"""The step engine (kangaroo.engine): row-invariant products, the fused forward against HF's modules,
and greedy Kangaroo identical to plain greedy decoding on every engine configuration."""

from __future__ import annotations

import itertools
import json
import random

import numpy as np
import pytest
import torch
from tiny import ARCHITECTURES, NUM_LAYERS, VOCAB, hf_greedy, passthrough_adapter, q4_layers, tiny_model

from kangaroo import attention as attn_kernel
from kangaroo import calibration
from kangaroo.adapter import Adapter, EarlyExitHead
from kangaroo.config import EngineConfig, KangarooConfig
from kangaroo.decoding import AutoregressiveDecoder, KangarooDecoder
from kangaroo.engine import FusedEngine
from kangaroo.errors import KangarooError
from kangaroo import quantized
from kangaroo.kernels import KERNELS, MAX_ROWS, Linear, kernel_available, row_invariant
from kangaroo.kv_cache import KVCache
from kangaroo.model import Backbone
from kangaroo.tree import TreeLayout

CONFIGS = [(d, k) for d in (torch.float32, torch.bfloat16) for k in KERNELS if kernel_available(k, d, "cpu")]
Q4 = kernel_available("q4_1", torch.bfloat16, "cpu")
Q4_INT8 = kernel_available("q4_1_int8", torch.bfloat16, "cpu")
Q4_KERNELS = ["q4_1"] * Q4 + ["q4_1_int8"] * Q4_INT8
ATTENTIONS = ("kernel", "sdpa")  # the decode-attention kernel (tests/test_attention.py proves it builds) and per-row SDPA


# ---------------------------------------------------------------- products
@pytest.mark.parametrize("dtype,kernel", CONFIGS)
@pytest.mark.parametrize("shape", [(96, 64), (48, 1536), (200, 576)])
def test_products_are_row_invariant_and_correct(dtype, kernel, shape):
    torch.manual_seed(0)
    w, b = torch.randn(shape) * 0.05, torch.randn(shape[0])
    lin = Linear(w, b, dtype, kernel)
    assert row_invariant(lin, trials=2)
    x = torch.randn(5, shape[1])
    ref = torch.nn.functional.linear(x.to(dtype).float(), w.to(dtype).float(), b.to(dtype).float())
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(lin(x).float(), ref, rtol=tol, atol=tol * 10)
    assert lin(x).dtype == dtype and lin(x[:1]).shape == (1, shape[0])
    assert lin(torch.randn(40, shape[1])).shape == (40, shape[0])  # prompts: more rows than MAX_ROWS


def test_row_count_dependent_product_is_caught():
    w = torch.randn(8, 32)

    class Drifting:  # a kernel whose rows change with the number of rows (like a K-split chosen by M)
        in_features, device = 32, "cpu"

        def __call__(self, x):
            y = x @ w.t()
            return y + (x.shape[0] > 3) * 1e-6 * y

    assert not row_invariant(Drifting())
    assert row_invariant(lambda x: (x[:, None, :] * w).sum(-1), in_features=32)  # row by row: invariant


def lin_weight(lin):
    return torch.cat([w for _, _, w in lin.chunks], dim=1)


def test_a_non_invariant_product_is_split_or_padded(monkeypatch):
    """When the direct product fails the check, Linear falls back to a K-split, then to padding."""
    from kangaroo import kernels

    calls = []

    def fake_check(fn, *a, **k):
        calls.append((len(fn.chunks), fn.pad_to))
        return len(fn.chunks) > 1  # only a K-split "passes"

    monkeypatch.setattr(kernels, "row_invariant", fake_check)
    monkeypatch.setattr(kernels, "_INVARIANCE", {})
    lin = Linear(torch.randn(16, 64), None, torch.float32, "stock")
    assert calls[:3] == [(1, 0), (1, MAX_ROWS), (2, 0)]  # as is, padded, then split in 2: a fixed order
    assert len(lin.chunks) == 2 and lin.pad_to == 0
    x = torch.randn(3, 64)
    torch.testing.assert_close(lin(x), x @ lin_weight(lin).t(), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- fused forward == HF modules
@pytest.mark.parametrize("attention", ATTENTIONS)
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_fused_layers_match_hf_modules(arch, attention):
    model = tiny_model(arch, seed=7)
    backbone = Backbone(model)
    engine = FusedEngine(backbone, torch.float32, "stock", attention)
    ids = torch.randint(0, VOCAB, (1, 70), generator=torch.Generator().manual_seed(0))  # past the 48-token windows
    with torch.no_grad():
        c1, c2 = KVCache(NUM_LAYERS), KVCache(NUM_LAYERS)
        a = backbone.logits(backbone.run_layers(0, NUM_LAYERS, backbone.embed(ids), c1, 0))
        b = engine.logits(engine.run_layers(0, NUM_LAYERS, engine.embed(ids), c2, 0))
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
        for T, pos in ((1, 70), (5, 71), (1, 76)):  # steps on top of the cache, one and several rows
            new = torch.randint(0, VOCAB, (1, T), generator=torch.Generator().manual_seed(pos))
            a = backbone.logits(backbone.run_layers(0, NUM_LAYERS, backbone.embed(new), c1, pos))
            b = engine.logits(engine.run_layers(0, NUM_LAYERS, engine.embed(new), c2, pos))
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
        for n in (6, 40):  # a few states, and a prompt's
            h = torch.randn(1, n, model.config.hidden_size)
            for mlp in (0, 24):  # the paper's adapter, and one with a residual MLP
                adapter = Adapter.random(backbone, 2, seed=3, mlp_hidden=mlp)
                ca, cb, cl = KVCache(1), KVCache(1), KVCache(1)
                a = backbone.adapter_forward(adapter, h, ca, 0)
                b = engine.adapter_forward(adapter, h, cb, 0)
                torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
                # only the last row's output (what drafting reads): every row's keys and values still cached
                last = engine.adapter_forward(adapter, h, cl, 0, last=1)
                assert last.shape == (1, 1, h.shape[-1]) and cl.length() == cb.length() == n
                torch.testing.assert_close(last, b[:, -1:], rtol=1e-4, atol=1e-4)
                assert torch.equal(cl.keys[0][..., :n, :], cb.keys[0][..., :n, :])
                assert torch.equal(backbone.adapter_forward(adapter, h, KVCache(1), 0, last=2), a[:, -2:])


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_fused_float32_greedy_equals_hf_greedy(arch):
    """Tiny models have peaked logits (no near-ties), so the fused float32 loop reproduces HF's tokens."""
    model = tiny_model(arch, seed=3)
    engine = FusedEngine(Backbone(model), torch.float32, "stock")
    for n in (1, 17, 120):
        ids = torch.randint(0, VOCAB, (1, n), generator=torch.Generator().manual_seed(n))
        assert AutoregressiveDecoder(engine).generate(ids, 30).token_ids == hf_greedy(model, ids, 30)


# ---------------------------------------------------------------- identity on every configuration
@pytest.mark.parametrize("attention", ATTENTIONS)
@pytest.mark.parametrize("dtype,kernel", CONFIGS)
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_kangaroo_equals_plain_greedy_on_the_same_engine(arch, dtype, kernel, attention):
    rng = random.Random(f"engine-{arch}-{dtype}-{kernel}")
    models = {False: tiny_model(arch, seed=1), True: tiny_model(arch, seed=2, damp_from=1)}
    engines = {f: FusedEngine(Backbone(m), dtype, kernel, attention) for f, m in models.items()}
    tiles = [t for t in attn_kernel.PROMPT_TILES if attention == "kernel" and attn_kernel.prompt_tiles_available(t)]
    accepted = all_accepted = rejected = 0
    for ℓ, η, γ, friendly in itertools.product((1, NUM_LAYERS - 1), (0.0, 0.5), (3, 8), (False, True)):
        engine = engines[friendly]
        # on the kernel attention, the KV cache in float32 and in bfloat16 (--kv-dtype; auto's choice for bfloat16 engines)
        engine.kv_dtype = torch.bfloat16 if attention == "kernel" and (ℓ + γ + int(friendly)) % 2 else torch.float32
        # prompts' tiles in every mode this machine has (bfloat16 tiles exist for head size 64: the Mistral model)
        engine.prompt_tiles = tiles[(ℓ + γ + int(friendly)) % len(tiles)] if tiles else "float32"
        # half the cases draft with an MLP adapter (--adapter-mlp), random in the unfriendly ones
        adapter = Adapter.random(engine.backbone, ℓ, seed=rng.randrange(1000), mlp_hidden=16 if η else 0)
        if friendly:
            passthrough_adapter(adapter)
        config = KangarooConfig(exit_layer=ℓ, max_steps=γ, threshold=η, verify_low_confidence=γ == 8)
        n = rng.choice([1, rng.randrange(2, 60), rng.randrange(60, 160)])
        ids = torch.randint(0, VOCAB, (1, n), generator=torch.Generator().manual_seed(rng.randrange(10**6)))
        max_new = rng.randrange(10, 41)
        expected = AutoregressiveDecoder(engine).generate(ids, max_new).token_ids
        eos = {expected[rng.randrange(len(expected))]} if rng.random() < 0.3 else set()
        if eos:
            expected = AutoregressiveDecoder(engine).generate(ids, max_new, eos).token_ids
        result = KangarooDecoder(engine, adapter, config).generate(ids, max_new, eos)
        assert result.token_ids == expected, f"{arch} {dtype} {kernel} {attention} ℓ={ℓ} η={η} γ={γ} n={n} eos={eos}"
        accepted += result.accepted
        all_accepted += sum(s.drafted > 0 and s.accepted == s.drafted for s in result.steps[:-1])
        rejected += sum(s.accepted < s.drafted for s in result.steps)
    assert accepted and all_accepted and rejected  # multi-row verification, both endings, was exercised


def test_early_exit_drafter_on_the_fused_engine():
    model = tiny_model("qwen2", seed=6, damp_from=2)
    engine = FusedEngine(Backbone(model), torch.bfloat16, "stock")
    decoder = KangarooDecoder(engine, EarlyExitHead(2), KangarooConfig(exit_layer=2, max_steps=5, threshold=0.0))
    ids = torch.randint(0, VOCAB, (1, 70), generator=torch.Generator().manual_seed(2))
    result = decoder.generate(ids, 50)
    assert result.token_ids == AutoregressiveDecoder(engine).generate(ids, 50).token_ids
    assert result.accepted > 0


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_last_rows_prefill_writes_every_key_and_value(arch):
    """``run_layers(..., last=1)``, as prefills call it: every row's keys and values are the full
    call's, bit for bit; only the last row leaves the last layer, equal to the full call's last row for
    a few rows (both take the steps' attention) and close to it for a prompt (whose full call takes the
    prompt tiles); the compiled loop gives the Python loop's bits; HF's modules compute and slice."""
    backbone = Backbone(tiny_model(arch, seed=5))
    kernel = "dpbf16" if (torch.bfloat16, "dpbf16") in CONFIGS else "stock"
    engines = [FusedEngine(backbone, torch.bfloat16, kernel, "kernel") for _ in range(2)]
    engines[1]._stack = (None, [])  # the Python loop
    D = backbone.model.config.hidden_size
    h = torch.randn(1, 70, D, generator=torch.Generator().manual_seed(0))
    for n in (70, 5, 1):  # a prompt past the 16-row steps and the 48-token windows, a few rows, one
        full_cache = KVCache(NUM_LAYERS)
        full = engines[0].run_layers(0, NUM_LAYERS, h[:, :n], full_cache, 0)
        outs = []
        for e in engines:
            c = KVCache(NUM_LAYERS)
            outs.append(e.run_layers(0, NUM_LAYERS, h[:, :n], c, 0, last=1))
            assert outs[-1].shape == (1, 1, D)
            for i in range(NUM_LAYERS):
                assert c.length(i) == n
                assert torch.equal(c.keys[i][..., :n, :], full_cache.keys[i][..., :n, :])
                assert torch.equal(c.values[i][..., :n, :], full_cache.values[i][..., :n, :])
        assert torch.equal(outs[0], outs[1])
        if n <= MAX_ROWS or arch == "qwen3":  # Qwen3's per-head norms: every row through the same attention
            assert torch.equal(outs[0], full[:, -1:])
        else:
            torch.testing.assert_close(outs[0], full[:, -1:], rtol=2e-2, atol=2e-2)
    ids = torch.randint(0, VOCAB, (1, 70), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a = backbone.run_layers(0, NUM_LAYERS, backbone.embed(ids), KVCache(NUM_LAYERS), 0)
        assert torch.equal(backbone.run_layers(0, NUM_LAYERS, backbone.embed(ids), KVCache(NUM_LAYERS), 0, last=1), a[:, -1:])
    with pytest.raises(ValueError):
        engines[0].run_layers(0, NUM_LAYERS, h[:, :3], KVCache(NUM_LAYERS), 0, TreeLayout.of([0, 1]), last=1)
    for bad in (0, 4):  # no row, or more rows than there are
        with pytest.raises(ValueError):
            engines[0].run_layers(0, NUM_LAYERS, h[:, :3], KVCache(NUM_LAYERS), 0, last=bad)


STACK_CONFIGS = ([(arch, "dpbf16") for arch in ARCHITECTURES] if (torch.bfloat16, "dpbf16") in CONFIGS else []) + \
                [(arch, kernel) for kernel in Q4_KERNELS for arch in ("llama", "mistral")]


@pytest.mark.parametrize("kv", ["float32", "bfloat16"])
@pytest.mark.parametrize("arch,kernel", STACK_CONFIGS)
def test_compiled_layer_loop_is_the_python_loop_bit_for_bit(arch, kernel, kv):
    """The compiled layer loop (csrc/layer_stack.cpp) gives the Python loop's hidden states and cache
    entries bit for bit: a prompt past the 16-row steps and the 48-token windows, steps of 1, 5
    and 16 rows over split layer ranges, then a token tree; Qwen3's per-head norms keep to the Python loop."""
    backbone = Backbone(tiny_model(arch, seed=5))
    q4 = dict(q4_layers=q4_layers(backbone)) if kernel.startswith("q4_1") else {}
    engines = [FusedEngine(backbone, torch.bfloat16, kernel, "kernel", **q4) for _ in range(2)]
    engines[1]._stack = (None, [])  # the Python loop
    for e in engines:
        e.kv_dtype = getattr(torch, kv)
    if arch == "qwen3":
        assert engines[0]._build_stack() == (None, [])
        return
    assert engines[0]._build_stack()[0].size() == NUM_LAYERS
    g = torch.Generator().manual_seed(0)
    caches = [KVCache(NUM_LAYERS), KVCache(NUM_LAYERS)]
    steps = [(70, 0, NUM_LAYERS)] + [(T, a, b) for T in (1, 5, 16, 1) for a, b in ((0, 1), (1, NUM_LAYERS))]
    for T, a, b in steps:
        if a == 0:
            h = torch.randn(1, T, backbone.model.config.hidden_size, generator=g)
        outs = [e.run_layers(a, b, h, c, c.length(a)) for e, c in zip(engines, caches)]
        assert torch.equal(outs[0], outs[1]), (T, a, b)
        h = outs[0]
    # a token tree that branches at two depths, each row at pos + depth (keys and values also stashed)
    tree = TreeLayout.of([0, 1, 2, 1, 0, 5, 0])
    h = torch.randn(1, tree.rows, backbone.model.config.hidden_size, generator=g)
    outs = [e.run_layers(1, NUM_LAYERS, h, c, c.length(1), tree) for e, c in zip(engines, caches)]
    assert torch.equal(outs[0], outs[1])
    assert engines[0]._stack[0] is not None
    for i in range(NUM_LAYERS):
        n = caches[0].length(i)
        assert n == caches[1].length(i) == 70 + 23 + (tree.rows if i else 0)
        assert torch.equal(caches[0].keys[i][..., :n, :], caches[1].keys[i][..., :n, :])
        assert torch.equal(caches[0].values[i][..., :n, :], caches[1].values[i][..., :n, :])
        if i:
            assert all(torch.equal(a, b) for a, b in zip(caches[0].stashed(i), caches[1].stashed(i)))


@pytest.mark.parametrize("arch,kernel", [c for c in STACK_CONFIGS if c[0] != "qwen3"])
def test_adapter_with_an_mlp_runs_on_the_compiled_stack_bit_for_bit(arch, kernel):
    """An adapter with an MLP is a decoder layer plus a final norm: the compiled layer loop runs it
    (a prompt's last row out, then steps of 1 and 3 rows) with the bits of the ops it replaces, keys
    and values included; the paper's adapter (no MLP) keeps to the ops."""
    backbone = Backbone(tiny_model(arch, seed=5))
    q4 = dict(q4_layers=q4_layers(backbone)) if kernel.startswith("q4_1") else {}
    engine = FusedEngine(backbone, torch.bfloat16, kernel, "kernel", **q4)
    h = torch.randn(1, 44, backbone.model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    for mlp in (32, 0):
        adapter = Adapter.random(backbone, 2, seed=3, mlp_hidden=mlp)
        engine.adapter_forward(adapter, h[:, :1], KVCache(1), 0)
        entry = engine._adapters[id(adapter)]
        assert (entry[4] is not None) == bool(mlp)
        outs, caches = [], [KVCache(1), KVCache(1)]
        for stack, cache in zip((entry[4], None), caches):
            engine._adapters[id(adapter)] = entry[:4] + (stack,)
            outs.append([engine.adapter_forward(adapter, h[:, :40], cache, 0, last=1),
                         engine.adapter_forward(adapter, h[:, 40:41], cache, 40),
                         engine.adapter_forward(adapter, h[:, 41:], cache, 41)])
        assert all(torch.equal(a, b) for a, b in zip(*outs))
        assert torch.equal(caches[0].keys[0][..., :44, :], caches[1].keys[0][..., :44, :])
        assert torch.equal(caches[0].values[0][..., :44, :], caches[1].values[0][..., :44, :])
        engine._adapters[id(adapter)] = entry
        engine.attention = "sdpa"  # switched as `kangaroo bench --costs` does: the ops (SDPA rows) again
        try:
            torch.testing.assert_close(engine.adapter_forward(adapter, h[:, :40], KVCache(1), 0, last=1), outs[0][0],
                                       rtol=2e-2, atol=2e-2)
        finally:
            engine.attention = "kernel"


@pytest.mark.parametrize("arch,kernel", [c for c in STACK_CONFIGS if c[0] != "qwen3"])
def test_one_region_steps_are_the_op_by_op_steps_bit_for_bit(arch, kernel):
    """Chain steps and token trees in one parallel region (csrc/layer_stack.cpp, ``run_region``: two
    threads sharing out the products' parts and the attention's items, each norming its own copy of
    the residual) give the op-by-op path's hidden states, cache entries and tree stashes bit for bit,
    for 1 to 16 rows over split layer ranges, trees with one to several segments, float32 and
    bfloat16 caches; the region was taken."""
    module = attn_kernel.load()
    backbone = Backbone(tiny_model(arch, seed=5))
    q4 = dict(q4_layers=q4_layers(backbone)) if kernel.startswith("q4_1") else {}
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for kv in (torch.float32, torch.bfloat16):
            engines = [FusedEngine(backbone, torch.bfloat16, kernel, "kernel", **q4) for _ in range(2)]
            for e in engines:
                e.kv_dtype = kv
            g = torch.Generator().manual_seed(0)
            caches = [KVCache(NUM_LAYERS), KVCache(NUM_LAYERS)]
            runs = module.layer_stack_region_runs()
            # trees: a chain with a leaf at depth 1, branches at several depths, 16 rows in 4 segments
            trees = [TreeLayout.of([0, 1, 2, 3, 0]), TreeLayout.of([0, 1, 2, 1, 0, 5, 0]),
                     TreeLayout.of([0, 1, 2, 3, 4, 2, 6, 7, 0, 9, 10, 11, 9, 13, 14])]
            steps = [(40, 0, NUM_LAYERS)] + [(T, a, b) for T in (1, 3, 8, 16, 2, *trees) for a, b in ((0, 1), (1, NUM_LAYERS))]
            for T, a, b in steps:
                tree = T if isinstance(T, TreeLayout) else None
                rows = tree.rows if tree else T
                if a == 0:
                    h = torch.randn(1, rows, backbone.model.config.hidden_size, generator=g)
                outs = []
                for e, c, region in zip(engines, caches, (True, False)):
                    old = module.layer_stack_region(region)
                    try:
                        outs.append(e.run_layers(a, b, h, c, c.length(a), tree))
                    finally:
                        module.layer_stack_region(old)
                assert torch.equal(outs[0], outs[1]), (kv, T, a, b)
                if tree:
                    for i in range(a, b):
                        assert all(torch.equal(x, y) for x, y in zip(caches[0].stashed(i), caches[1].stashed(i))), (kv, T, i)
                h = outs[0]
            for i in range(NUM_LAYERS):
                n = caches[0].length(i)
                assert torch.equal(caches[0].keys[i][..., :n, :], caches[1].keys[i][..., :n, :])
                assert torch.equal(caches[0].values[i][..., :n, :], caches[1].values[i][..., :n, :])
            head_dim = caches[0].keys[0].shape[-1]
            if kv == torch.float32 or (module.decode_attention_bf16_native() and head_dim in (64, 128, 256)):
                assert module.layer_stack_region_runs() - runs == len(steps) - 1  # every step but the prompt
    finally:
        torch.set_num_threads(before)



# ---------------------------------------------------------------- configuration and calibration
class _Meter:  # a ContentionMeter that reports what the test says other processes did
    share = 0.0

    def start(self):
        return self

    def stop(self):
        return self.share


def test_auto_configuration_is_measured_once_then_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("KANGAROO_CACHE", str(tmp_path))
    monkeypatch.setattr(calibration, "ContentionMeter", _Meter)  # a quiet machine, whatever CI runs beside us
    backbone = Backbone(tiny_model("llama", seed=0))
    engine, info = calibration.build_engine(backbone, EngineConfig())
    assert info["source"] == "measured" and set(info["step_ms"]) == {
        f"{str(d).removeprefix('torch.')}/{k}" for d, k in calibration.candidates(EngineConfig())}
    kv = "/bfloat16-kv" if info["kv_dtype"] == "bfloat16" else ""
    assert engine.describe() == f"fused/{info['kernel']}/{info['dtype']}/{info['attention']}-attention{kv}"
    # the KV cache: bfloat16 only for bfloat16 engines on the kernel attention that reads it natively
    native = info["dtype"] == "bfloat16" and info["attention"] == "kernel" and attn_kernel.bf16_cache_native(engine.layers[0].attention.head_dim)
    assert engine.kv_dtype == (torch.bfloat16 if native else torch.float32)
    assert info["attention_source"] == "measured" and set(info["attention_us"]) == {"kernel", "sdpa"}
    saved = json.loads((tmp_path / "engine" / "choices.json").read_text())
    (record,) = [r for r in saved.values() if "choice" in r]  # beside it: the attention choice's record
    assert [r["attention"] for r in saved.values() if "attention" in r] == [info["attention"]]
    assert record["choice"] == [f"torch.{info['dtype']}", info["kernel"]] and record["machine"]["threads"] >= 1
    again, info2 = calibration.build_engine(backbone, EngineConfig())
    assert info2["source"] == "cache" and (again.weight_dtype, again.kernel) == (engine.weight_dtype, engine.kernel)
    # the attention choice too: every later process runs the same engine, so tuned settings keep applying
    assert info2["attention_source"] == "cache" and again.attention == engine.attention
    # bfloat16 weights with the kernel attention: prompts' tiles measured (then cached) like the rest
    mistral = Backbone(tiny_model("mistral", seed=0))  # heads of 64: the tiles' sizes
    bf, bf_info = calibration.build_engine(mistral, EngineConfig(dtype="bfloat16", kernel="dpbf16", attention="kernel"))
    assert bf_info["kv_dtype"] == ("bfloat16" if attn_kernel.bf16_cache_native() else "float32")
    as_asked = calibration.build_engine(mistral, EngineConfig(dtype="bfloat16", kernel="dpbf16", attention="kernel", kv_dtype="float32"))
    assert as_asked[0].kv_dtype == torch.float32 and as_asked[1]["kv_dtype"] == "float32"
    # --kv-dtype bfloat16 where --attention auto chose per-row SDPA: one clear line
    sdpa = FusedEngine(mistral, torch.bfloat16, "dpbf16", "sdpa")
    with pytest.raises(KangarooError, match="a bfloat16 KV cache is read by the decode-attention kernel, which is not in use"):
        calibration._kv_dtype(EngineConfig(kv_dtype="bfloat16"), sdpa)
    assert calibration._kv_dtype(EngineConfig(), sdpa) == torch.float32
    if attn_kernel.prompt_tiles_available("bfloat16"):
        here = {t for t in attn_kernel.PROMPT_TILES if attn_kernel.prompt_tiles_available(t)}
        assert bf_info["prompt_tiles_source"] == "measured" and set(bf_info["prompt_tiles_us"]) == here
        assert bf.prompt_tiles == bf_info["prompt_tiles"] == min(here, key=bf_info["prompt_tiles_us"].get)
        _, again_info = calibration.build_engine(mistral, EngineConfig(dtype="bfloat16", kernel="dpbf16", attention="kernel"))
        assert again_info["prompt_tiles_source"] == "cache" and again_info["prompt_tiles"] == bf_info["prompt_tiles"]
    exact, exact_info = calibration.build_engine(mistral, EngineConfig(dtype="bfloat16", kernel="dpbf16", attention="kernel",
                                                                      prefill="exact"))
    assert exact_info["prefill"] == "exact" and "prompt_tiles" not in exact_info and exact.prompt_tiles == "float32"
    given_engine, given = calibration.build_engine(backbone, EngineConfig(dtype="float32", kernel="stock"))
    assert given["source"] == "given" and given["dtype"] == "float32"
    # float32 weights keep float32 prompts: no bfloat16 tiles, no int8 products
    assert "prompt_tiles" not in given and given_engine.prompt_tiles == "float32" and not given_engine.prompt_int8
    eager, e = calibration.build_engine(backbone, EngineConfig(engine="eager"))
    assert eager is backbone and e["engine"] == "eager"
    # changed kernels (their sources, flags, CPU or torch) are timed again, not hidden behind the cache
    monkeypatch.setattr(attn_kernel, "build_id", lambda: "another-build")
    _, rebuilt = calibration.build_engine(backbone, EngineConfig())
    assert rebuilt["source"] == "measured" and rebuilt["attention_source"] == "measured"


@pytest.mark.parametrize("kwargs,message", [
    (dict(engine="compiled"), "unknown engine 'compiled': use one of auto, fused, eager"),
    (dict(dtype="int3"), "unknown dtype 'int3'"),
    (dict(kernel="magic"), "unknown kernel 'magic'"),
    (dict(threads=0), "threads must be a positive integer, got 0"),
    (dict(threads=-3), "threads must be a positive integer, got -3"),
    (dict(device="tpu"), "unsupported device 'tpu'"),
    (dict(dtype="float16"), "float16 runs on CUDA only"),
    (dict(device="cuda", kernel="packed"), "the packed kernel is CPU only"),
    (dict(device="cuda", kernel="dpbf16"), "the dpbf16 kernel is CPU only"),
    (dict(kernel="dpbf16", dtype="float32"), "the dpbf16 kernel computes with bfloat16 activations: use --dtype bfloat16 or auto"),
    (dict(kernel="q4_1", dtype="float32"), "the q4_1 kernel computes with bfloat16 activations: use --dtype bfloat16 or auto"),
    (dict(device="cuda", kernel="q4_1"), "the q4_1 kernel is CPU only"),
    (dict(kernel="q4_1_int8", dtype="float32"), "the q4_1_int8 kernel computes with bfloat16 activations: use --dtype bfloat16 or auto"),
    (dict(device="cuda", kernel="q4_1_int8"), "the q4_1_int8 kernel is CPU only"),
    (dict(engine="eager", kernel="packed"), "--kernel, --attention, --prefill and --kv-dtype apply to the fused engine"),
    (dict(engine="eager", attention="sdpa"), "--kernel, --attention, --prefill and --kv-dtype apply to the fused engine"),
    (dict(engine="eager", prefill="exact"), "--kernel, --attention, --prefill and --kv-dtype apply to the fused engine"),
    (dict(prefill="fast"), "unknown prefill 'fast': use one of auto, exact"),
    (dict(attention="flash"), "unknown attention 'flash': use one of auto, kernel, sdpa"),
    (dict(device="cuda", attention="kernel"), "the decode-attention kernel is CPU only"),
    (dict(kv_dtype="float16"), "unknown kv_dtype 'float16': use one of auto, float32, bfloat16"),
    (dict(engine="eager", kv_dtype="bfloat16"), "--kernel, --attention, --prefill and --kv-dtype apply to the fused engine"),
    (dict(device="cuda", kv_dtype="bfloat16"), "a bfloat16 KV cache is read by the CPU decode-attention kernel"),
    (dict(attention="sdpa", kv_dtype="bfloat16"), "a bfloat16 KV cache is read by the CPU decode-attention kernel"),
])
def test_bad_engine_settings_are_clear_errors(kwargs, message):
    with pytest.raises(KangarooError, match=message.replace("(", r"\(")):
        EngineConfig(**kwargs)


def test_dpbf16_where_the_cpu_lacks_it_is_a_clear_error(monkeypatch):
    """--kernel dpbf16 on a CPU without AVX512-BF16 (or where the module did not build) names the way out."""
    from kangaroo import calibration, kernels

    monkeypatch.setattr(kernels, "dpbf16_available", lambda device: False)
    with pytest.raises(KangarooError, match=r"the dpbf16 kernel cannot run here \(it needs a CPU with AVX512-BF16\): use --kernel stock or auto"):
        calibration.candidates(EngineConfig(kernel="dpbf16"))
    assert all(k != "dpbf16" for _, k in calibration.candidates(EngineConfig()))


@pytest.mark.skipif(not kernel_available("dpbf16", torch.bfloat16, "cpu"), reason="needs a CPU with AVX512-BF16")
def test_dpbf16_pads_odd_shapes_and_keeps_rows_apart():
    """Weights whose rows are not a multiple of 16 (or columns odd) are padded inside, never seen outside;
    every row count 1..16 gives each row its one-row bits (and 40 rows, a prompt, are right too)."""
    torch.manual_seed(1)
    w, b = torch.randn(50, 33) * 0.1, torch.randn(50)
    lin = Linear(w, b, torch.bfloat16, "dpbf16")
    assert lin.pad_to == 0 and len(lin.chunks) == 1  # row-invariant as it is, by construction
    x = torch.randn(40, 33)
    ref = torch.nn.functional.linear(x.to(torch.bfloat16).float(), w.to(torch.bfloat16).float(), b.to(torch.bfloat16).float())
    out = lin(x)
    assert out.shape == (40, 50) and out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)
    alone = torch.cat([lin(x[i:i + 1]) for i in range(16)])
    for m in range(1, 17):
        assert torch.equal(lin(x[:m]), alone[:m]), m


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_unavailable_device_is_a_clear_error():
    with pytest.raises(KangarooError, match="device 'cuda' is not available"):
        EngineConfig(device="cuda").check_device()


def test_auto_engine_falls_back_to_eager_for_a_model_it_cannot_fuse(caplog):
    model = tiny_model("llama", seed=0, hidden_act="gelu")
    backbone = Backbone(model)
    with caplog.at_level("WARNING"):
        engine, info = calibration.build_engine(backbone, EngineConfig(dtype="float32"))
    assert engine is backbone and info["source"] == "fallback"
    assert [r.message for r in caplog.records if r.levelname == "WARNING"] == [
        "fused engine unavailable (the fused engine supports SiLU-gated MLPs, this model uses 'gelu': use --engine eager); "
        "running HF's modules (eager engine)"]
    with pytest.raises(KangarooError, match="supports SiLU-gated MLPs"):
        calibration.build_engine(backbone, EngineConfig(engine="fused", dtype="float32"))


# ---------------------------------------------------------------- token trees
class _TreeWatch:
    """Counts the tree rounds whose accepted path left the first branch (and needed the cache fixed)."""

    def __init__(self, monkeypatch):
        from kangaroo import decoding

        self.trees = self.other_branch = self.deep_other_branch = self.moved = 0
        accept = decoding.accept

        def watched(draft, logits, sampler):
            new, path = accept(draft, logits, sampler)
            if draft.tree is not None:
                self.trees += 1
                self.other_branch += bool(path) and path[0] != 1
                self.deep_other_branch += len(path) >= 2 and path[0] != 1
                self.moved += not draft.tree.resident(path)
            return new, path

        monkeypatch.setattr(decoding, "accept", watched)


@pytest.mark.parametrize("attention", ATTENTIONS)
@pytest.mark.parametrize("dtype,kernel", CONFIGS[::2] + CONFIGS[1:2])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_token_trees_equal_plain_greedy_on_the_same_engine(arch, dtype, kernel, attention, monkeypatch):
    """Adapter trees (top-k siblings at depth 1) and lookup + adapter trees (two deep branches),
    with paths accepted through later branches, give plain greedy decoding's tokens."""
    watch = _TreeWatch(monkeypatch)
    rng = random.Random(f"tree-{arch}-{dtype}-{kernel}")
    for friendly in (False, True):
        model = tiny_model(arch, seed=2, damp_from=1) if friendly else tiny_model(arch, seed=1)
        engine = FusedEngine(Backbone(model), dtype, kernel, attention)
        for ℓ, width, branch in itertools.product((1, NUM_LAYERS - 1), (2, 4), (False, True)):
            adapter = Adapter.random(engine.backbone, ℓ, seed=rng.randrange(1000))
            config = KangarooConfig(exit_layer=ℓ, max_steps=rng.choice([3, 5]), threshold=rng.choice([0.0, 0.3]),
                                    tree_width=width, tree_threshold=0.0, lookup_branch=branch,
                                    lookup_tokens=rng.choice([4, 7]), lookup_ngram=1)
            base = torch.randint(0, VOCAB, (1, rng.randrange(8, 30)), generator=torch.Generator().manual_seed(rng.randrange(10**6)))
            ids = torch.cat([base, base, base[:, :5]], dim=1)  # repeats: prompt lookup proposes drafts
            eos_draw = rng.random()
            # on the kernel attention, with the KV cache (and the trees' stashes) in bfloat16 too
            for kv in (torch.float32, torch.bfloat16) if attention == "kernel" else (torch.float32,):
                engine.kv_dtype = kv
                expected = AutoregressiveDecoder(engine).generate(ids, 40).token_ids
                eos = {expected[len(expected) // 2]} if eos_draw < 0.3 else set()
                if eos:
                    expected = AutoregressiveDecoder(engine).generate(ids, 40, eos).token_ids
                result = KangarooDecoder(engine, adapter, config).generate(ids, 40, eos)
                assert result.token_ids == expected, f"{arch} {dtype} {kernel} {kv} ℓ={ℓ} width={width} branch={branch}"
    assert watch.trees > 50 and watch.other_branch > 5 and watch.deep_other_branch > 0 and watch.moved > 5, vars(watch)


@pytest.mark.parametrize("attention,kv", [("kernel", "float32"), ("sdpa", "float32"), ("kernel", "bfloat16")])
def test_tree_cache_after_a_later_branch_wins_equals_plain_decoding(attention, kv, monkeypatch):
    """After a round accepted through a branch that is not the first (so its keys and values were
    copied back from the stash, and its shallow states recomputed), every layer's cache equals the
    one plain one-token steps build (bit for bit) and a fresh float32 prefill (to rounding)."""
    watch = _TreeWatch(monkeypatch)
    model = tiny_model("qwen3", seed=2, damp_from=1)
    engine = FusedEngine(Backbone(model), torch.float32, "stock", attention)
    engine.kv_dtype = getattr(torch, kv)
    tol = dict(rtol=1e-4, atol=1e-5) if kv == "float32" else dict(rtol=1e-2, atol=1e-2)  # a bfloat16 cache: one rounding
    adapter = Adapter.random(engine.backbone, 1, seed=5)
    config = KangarooConfig(exit_layer=1, max_steps=4, threshold=0.0, tree_width=3, tree_threshold=0.0,
                            lookup_branch=True, lookup_tokens=6, lookup_ngram=1)
    base = torch.randint(0, VOCAB, (1, 20), generator=torch.Generator().manual_seed(3))
    ids = torch.cat([base, base, base[:, :4]], dim=1)
    decoder = KangarooDecoder(engine, adapter, config)
    committed, checked = ids[0].tolist(), 0
    for step in decoder.stream(ids, 60):
        committed += step.tokens
        if checked < watch.moved:  # this round's path was copied back into place
            checked = watch.moved
            n = len(committed) - 1  # the cache holds every committed token but the newest
            plain = KVCache(engine.num_layers)
            prefix = torch.tensor([committed[:len(ids[0])]])
            engine.run_layers(0, engine.num_layers, engine.embed(prefix), plain, 0)
            for p in range(prefix.shape[1], n):
                engine.run_layers(0, engine.num_layers, engine.embed(torch.tensor([[committed[p]]])), plain, p)
            fresh = KVCache(engine.num_layers)
            engine.run_layers(0, engine.num_layers, engine.embed(torch.tensor([committed[:n]])), fresh, 0)
            for i in range(engine.num_layers):
                assert decoder.cache.length(i) == n
                k, v = decoder.cache.keys[i][:, :, :n], decoder.cache.values[i][:, :, :n]
                assert torch.equal(k, plain.keys[i][:, :, :n]) and torch.equal(v, plain.values[i][:, :, :n]), i
                assert k.dtype == engine.kv_dtype
                torch.testing.assert_close(k, fresh.keys[i][:, :, :n], **tol)
                torch.testing.assert_close(v, fresh.values[i][:, :, :n], **tol)
    assert checked >= 2, vars(watch)


def test_tree_layout_and_accepting_rules():
    from kangaroo.tree import TreeLayout, greedy_accept_tree

    t = TreeLayout.of([0, 1, 2, 0, 4, 0])  # root -> 1 -> 2 -> 3; root -> 4 -> 5; root -> 6
    assert t.depths == (0, 1, 2, 3, 1, 2, 1)
    assert t.segments == ((0, 4, 0), (4, 6, 1), (6, 7, 1))
    assert t.resident([6]) and not t.resident([4, 5]) and not t.resident([1, 2, 3])
    tokens = [10, 11, 12, 20, 21, 30]
    assert greedy_accept_tree(tokens, t, [20, 0, 0, 0, 21, 9, 0]) == ([20, 21, 9], [4, 5])
    assert greedy_accept_tree(tokens, t, [10, 11, 12, 7, 0, 0, 0]) == ([10, 11, 12, 7], [1, 2, 3])
    assert greedy_accept_tree(tokens, t, [5, 0, 0, 0, 0, 0, 0]) == ([5], [])
    assert TreeLayout.chain(3).is_chain and TreeLayout.chain(3).resident([1, 2])
    with pytest.raises(ValueError, match="depth-first"):
        TreeLayout.of([0, 0, 1])  # row 3's parent (row 1) was left behind for row 2's branch
    with pytest.raises(ValueError, match="earlier row"):
        TreeLayout.of([0, 2])


def test_eager_engine_keeps_to_chains():
    """HF's modules cannot attend row by row at tree depths: on the eager engine the adapter drafts
    chains and lookup stands aside, and the output is still plain greedy decoding's."""
    model = tiny_model("llama", seed=2, damp_from=1)
    backbone = Backbone(model)
    adapter = passthrough_adapter(Adapter.random(backbone, 1, seed=1))
    config = KangarooConfig(exit_layer=1, max_steps=4, threshold=0.0, tree_width=3, tree_threshold=0.0, lookup_branch=True)
    ids = torch.arange(30)[None] % 7
    result = KangarooDecoder(backbone, adapter, config).generate(ids, 30)
    assert result.token_ids == AutoregressiveDecoder(backbone).generate(ids, 30).token_ids
    with pytest.raises(ValueError, match="chains only"):
        from kangaroo.tree import TreeLayout

        backbone.run_layers(0, 1, backbone.embed(ids[:, :3]), KVCache(backbone.num_layers), 0, TreeLayout.of([0, 0]))


# ---------------------------------------------------------------- Q4_1 products (a GGUF file's own blocks)
@pytest.mark.skipif(not Q4, reason="needs a CPU with AVX512-BF16")
@pytest.mark.parametrize("shape", [(16, 32), (960, 576), (576, 1536)])
def test_q4_1_product_is_the_dequantised_product_and_row_invariant(shape):
    """The product over Q4_1 blocks equals x times the de-quantised weights (to bfloat16 rounding), in
    ggml's block layout as unpacked from a file's bytes, and every row gets its one-row bits."""
    N, K = shape
    w = torch.randn(N, K, generator=torch.Generator().manual_seed(N)) * 0.05
    q, d, m = quantized.quantize_q4_1(w)
    # ggml's bytes for these blocks (d, m, then input j | input j + 16 << 4), read back as a file's
    raw = _ggml_q4_1_bytes(q, d, m)
    q2, d2, m2 = quantized.unpack_q4_1(raw, N, K)
    assert np.array_equal(_ggml_q4_1_bytes(q, d, m), raw)
    assert np.array_equal(q2, q) and np.array_equal(d2, d) and np.array_equal(m2, m)
    lin = quantized.Q4Linear(q, d, m, bias=torch.randn(N))
    x = torch.randn(9, K, generator=torch.Generator().manual_seed(K))
    ref = x.to(torch.bfloat16).float() @ quantized.dequantize(q, d, m).T + lin.bias
    torch.testing.assert_close(lin(x).float(), ref, rtol=2e-2, atol=2e-2)
    assert row_invariant(lin, K)


def _q8_1_reference(x: torch.Tensor, q, d, m) -> torch.Tensor:
    """llama.cpp's Q4_1 x Q8_1 product in float64: each 32-input block of a bfloat16 row as int8
    (``dx = max |x| / 127``, ``qx = round(x / dx)``), then ``d dx (sum qx q) + m dx (sum qx)`` per block."""
    M, K = x.shape
    xb = x.to(torch.bfloat16).float().numpy().reshape(M, K // 32, 32)
    dx = np.abs(xb).max(axis=2) / np.float32(127.0)
    qx = np.rint(xb * np.where(dx > 0, np.float32(1.0) / np.where(dx > 0, dx, 1), 0)[..., None]).astype(np.int64)
    qw = q.astype(np.int64).reshape(q.shape[0], K // 32, 32)
    dots = np.einsum("mbi,nbi->mnb", qx, qw)  # exact integer block sums
    out = (dots * d.astype(np.float64)[None] + m.astype(np.float64)[None] * qx.sum(axis=2)[:, None, :]) * dx[:, None, :]
    return torch.from_numpy(out.sum(axis=2))


@pytest.mark.skipif(not Q4, reason="needs a CPU with AVX512-BF16")
@pytest.mark.parametrize("shape", [(32, 64), (960, 576), (576, 1536)])
def test_q4_1_prompts_take_llama_cpp_int8_product_when_switched_on(shape):
    """Prompts (more than MAX_ROWS rows) with the int8 path on compute llama.cpp's Q8_1 x Q4_1 product
    (to float32 sums and bfloat16 rounding), each row as it would alone among any prompt's rows;
    steps (up to MAX_ROWS rows) are untouched by the switch."""
    from kangaroo import attention as native

    module = native.load()
    if not module.linear_q4_int8_available():
        pytest.skip("needs AVX512-VNNI")
    N, K = shape
    w = torch.randn(N, K, generator=torch.Generator().manual_seed(N)) * 0.05
    q, d, m = quantized.quantize_q4_1(w)
    lin = quantized.Q4Linear(q, d, m, bias=torch.randn(N))
    x = torch.randn(MAX_ROWS + 23, K, generator=torch.Generator().manual_seed(K)) * 3
    x[5, :32] = 0  # an all-zero block (dx = 0)
    steps_before = lin(x[:MAX_ROWS])
    old_amx = module.linear_q4_prompt_amx(0) if module.linear_q4_amx_available() else 0
    old = module.linear_q4_prompt_int8(True)
    try:
        y = lin(x).float()
        ref = _q8_1_reference(x, q, d, m) + lin.bias.double()
        torch.testing.assert_close(y, ref.float(), rtol=1e-2, atol=1e-2 * float(ref.abs().max()))
        bf16 = x.to(torch.bfloat16).float() @ quantized.dequantize(q, d, m).T + lin.bias
        assert (y - ref.float()).abs().mean() < (bf16 - ref.float()).abs().mean()  # it is the int8 product, not bfloat16's
        other = torch.cat([x[7:8], torch.randn(MAX_ROWS + 2, K) * 100])  # row 7 among other rows, at another place
        assert torch.equal(lin(other)[0], lin(x)[7])
        assert torch.equal(lin(x[:MAX_ROWS]), steps_before)  # steps keep bfloat16 activations
        bad = x.clone()
        bad[3, 40] = float("nan")  # a row that is not finite gives NaN, and leaves the other rows alone
        y_bad = lin(bad)
        assert y_bad[3].isnan().all() and torch.equal(y_bad[4:], lin(x)[4:])
    finally:
        module.linear_q4_prompt_int8(old)
        if module.linear_q4_amx_available():
            module.linear_q4_prompt_amx(old_amx)
    bf_rows = lin(x)
    torch.testing.assert_close(bf_rows.float(), bf16, rtol=2e-2, atol=2e-2 * float(bf16.abs().max()))


@pytest.mark.parametrize("kernel", Q4_KERNELS)
@pytest.mark.parametrize("attention", ATTENTIONS)
@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_kangaroo_equals_plain_greedy_on_q4_1_layers(arch, attention, kernel):
    """On Q4_1 layers (here quantised from a tiny model), Kangaroo's chains and trees, with lookup
    drafts, give exactly the engine's plain greedy tokens: on q4_1, prompts on bfloat16 or int8
    activations; on q4_1_int8, steps of several rows on AVX-512 or (where the CPU has them) AMX tiles."""
    from kangaroo import attention as native

    module = native.load()
    rng = random.Random(f"q4-{arch}")
    model = tiny_model(arch, seed=2, damp_from=1)
    backbone = Backbone(model)
    engine = FusedEngine(backbone, torch.bfloat16, kernel, attention, q4_layers=q4_layers(backbone))
    assert engine.describe().startswith(f"fused/{kernel}/bfloat16") and engine.lm_head.kernel == "dpbf16"
    int8 = module.linear_q4_int8_available()
    amx = module.linear_q4_amx_available()
    accepted = 0
    old_amx = module.linear_q4_amx_rows(0)
    for i, (ℓ, γ, width, lookup) in enumerate(itertools.product((1, NUM_LAYERS - 1), (3, 8), (1, 3), (0, 6))):
        engine.prompt_int8 = int8 and i % 2 == 1  # prompts of 4..78 tokens: most take the prompt product
        module.linear_q4_amx_rows((2, 0, 5, 1)[i % 4] if amx else 0)  # which rows take AMX tiles changes no bit
        engine.prompt_amx_rows = 17 if amx and i % 3 == 0 else 0  # prompts as a bfloat16 AMX GEMM
        tiles = [t for t in native.PROMPT_TILES if attention == "kernel" and native.prompt_tiles_available(t)]
        engine.prompt_tiles = tiles[i % len(tiles)] if tiles else "float32"
        engine.kv_dtype = torch.bfloat16 if attention == "kernel" and i % 2 == 0 else torch.float32
        adapter = passthrough_adapter(Adapter.random(backbone, ℓ, seed=rng.randrange(1000)))
        config = KangarooConfig(exit_layer=ℓ, max_steps=γ, threshold=0.0, tree_width=width, lookup_tokens=lookup)
        base = torch.randint(0, VOCAB, (1, rng.randrange(2, 40)), generator=torch.Generator().manual_seed(rng.randrange(10**6)))
        ids = torch.cat([base, base], dim=1)  # repeats: lookup proposes drafts
        expected = AutoregressiveDecoder(engine).generate(ids, 30).token_ids
        module.linear_q4_amx_rows((0, 3, 1, 2)[i % 4] if amx else 0)
        result = KangarooDecoder(engine, adapter, config).generate(ids, 30)
        assert result.token_ids == expected, (arch, attention, ℓ, γ, width, lookup)
        accepted += result.accepted
    module.linear_q4_amx_rows(old_amx)
    assert accepted


@pytest.mark.skipif(not Q4_INT8, reason="needs a CPU with AVX512-BF16 and AVX512-VNNI")
@pytest.mark.parametrize("shape", [(32, 64), (960, 576), (576, 1536), (48, 96)])
def test_q4_1_int8_is_llama_cpp_product_at_every_row_count_on_either_unit(shape):
    """The q4_1_int8 product computes llama.cpp's Q8_1 x Q4_1 product for steps and prompts alike,
    row-invariant, and on AMX tiles (where the CPU has them) with exactly the AVX-512 path's bits,
    whatever the row count from which tiles are used (an odd number of input blocks included)."""
    from kangaroo import attention as native

    module = native.load()
    N, K = shape
    w = torch.randn(N, K, generator=torch.Generator().manual_seed(N + 1)) * 0.05
    q, d, m = quantized.quantize_q4_1(w)
    lin = quantized.Q4Linear(q, d, m, bias=torch.randn(N), int8=True)
    x = torch.randn(MAX_ROWS + 21, K, generator=torch.Generator().manual_seed(K + 1)) * 3
    x[2, :32] = 0  # an all-zero block (dx = 0)
    ref = (_q8_1_reference(x, q, d, m) + lin.bias.double()).float()
    old = module.linear_q4_amx_rows(0)
    old_prompt = module.linear_q4_prompt_amx(0)  # (module-wide: an engine's last prompt may have left it on)
    try:
        outputs = {}
        for amx_rows in [0] + ([1, 4, MAX_ROWS] if module.linear_q4_amx_available() else []):
            module.linear_q4_amx_rows(amx_rows)
            full = lin(x)
            torch.testing.assert_close(full.float(), ref, rtol=1e-2, atol=1e-2 * float(ref.abs().max()))
            for rows in (1, 2, 3, 7, 8, 12, MAX_ROWS):  # steps (one or two passes of up to 8 rows) and as in a prompt
                assert torch.equal(lin(x[:rows]), full[:rows]), (amx_rows, rows)
            assert torch.equal(torch.cat([lin(x[i:i + 1]) for i in range(x.shape[0])]), full)
            outputs[amx_rows] = full
        assert all(torch.equal(y, outputs[0]) for y in outputs.values())
    finally:
        module.linear_q4_amx_rows(old)
        module.linear_q4_prompt_amx(old_prompt)
    if not module.linear_q4_amx_available():
        with pytest.raises(RuntimeError, match="no AMX-INT8 tiles"):
            module.linear_q4_amx_rows(1)


@pytest.mark.skipif(not Q4, reason="needs a CPU with AVX512-BF16")
@pytest.mark.parametrize("shape", [(32, 64), (960, 576), (576, 1536), (48, 96)])
def test_prompts_as_a_bfloat16_amx_gemm(shape):
    """With the AMX prompt GEMM on from some row count, prompts at least that long compute with the
    weights de-quantised to bfloat16 (float32 sums), each row independent of the others; shorter
    calls and every step keep their own product."""
    from kangaroo import attention as native

    module = native.load()
    if not module.linear_q4_amx_available():
        with pytest.raises(RuntimeError, match="no AMX tiles"):
            module.linear_q4_prompt_amx(32)
        pytest.skip("needs AMX tiles")
    N, K = shape
    w = torch.randn(N, K, generator=torch.Generator().manual_seed(N + 2)) * 0.05
    q, d, m = quantized.quantize_q4_1(w)
    for int8 in (False, True):
        lin = quantized.Q4Linear(q, d, m, bias=torch.randn(N), int8=int8)
        x = torch.randn(2 * MAX_ROWS + 19, K, generator=torch.Generator().manual_seed(K + 2)) * 3
        module.linear_q4_prompt_amx(0)
        before = {n: lin(x[:n]) for n in (MAX_ROWS, MAX_ROWS + 5, x.shape[0])}
        old = module.linear_q4_prompt_amx(MAX_ROWS + 10)
        try:
            y = lin(x)
            ref = x.to(torch.bfloat16).float() @ quantized.dequantize(q, d, m).to(torch.bfloat16).float().T + lin.bias
            torch.testing.assert_close(y.float(), ref, rtol=1e-2, atol=1e-3 * float(ref.abs().max()))
            assert not torch.equal(y, before[x.shape[0]])  # it is another product than the prompt's default
            other = torch.cat([x[9:10], torch.randn(MAX_ROWS + 30, K) * 100])  # row 9 elsewhere among other rows
            assert torch.equal(lin(other)[0], y[9])
            for n in (MAX_ROWS, MAX_ROWS + 5):  # steps and prompts shorter than the setting: untouched
                assert torch.equal(lin(x[:n]), before[n])
        finally:
            module.linear_q4_prompt_amx(old)


@pytest.mark.skipif(not Q4_INT8, reason="needs a CPU with AVX512-BF16 and AVX512-VNNI")
def test_candidates_are_timed_with_their_attention_and_finalists_in_rounds(tmp_path, monkeypatch):
    """A single pass ranks kernels by the machine's drift; the finalists are timed again in turns,
    each with the attention the engine will run with."""
    monkeypatch.setenv("KANGAROO_CACHE", str(tmp_path))
    monkeypatch.setattr(calibration, "ContentionMeter", _Meter)
    backbone = Backbone(tiny_model("llama", seed=0))
    names = [f"{str(d).removeprefix('torch.')}/{k}" for d, k in calibration.candidates(EngineConfig())]
    assert len(names) >= 3
    first, later = names[-2], names[-1]  # the first pass favours `first`; every later round favours `later`
    calls = []

    def fake_step_ms(engine, *args, **kwargs):
        name = f"{str(engine.weight_dtype).removeprefix('torch.')}/{engine.kernel}"
        calls.append((name, engine.attention))
        again = sum(n == name for n, _ in calls) > 1
        if name == first:
            return 10.0 if not again else 13.0
        if name == later:
            return 11.5 if not again else 11.0
        return 50.0  # far behind: timed once, then out of the running

    monkeypatch.setattr(calibration, "step_ms", fake_step_ms)
    engine, info = calibration.build_engine(backbone, EngineConfig())
    assert f"{info['dtype']}/{info['kernel']}" == later and info["step_ms"][later] == 11.0 and info["step_ms"][first] == 13.0
    assert {n for n, _ in calls if [m for m, _ in calls].count(n) > 1} == {first, later}
    assert [m for m, _ in calls].count(later) == 1 + calibration.FINAL_ROUNDS
    assert {a for _, a in calls} == {info["attention"]}  # every candidate timed with the attention it runs with
    assert engine.attention == info["attention"]


def test_a_choice_measured_on_busy_cpus_is_used_but_not_cached(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("KANGAROO_CACHE", str(tmp_path))
    busy = type("Busy", (_Meter,), {"share": 0.5})  # one of two cores busy with another process
    monkeypatch.setattr(calibration, "ContentionMeter", busy)
    backbone = Backbone(tiny_model("llama", seed=0))
    with caplog.at_level("WARNING", logger="kangaroo.calibration"):
        engine, info = calibration.build_engine(backbone, EngineConfig())
    assert info["source"] == "measured" and info["calibration_others_share"] == 0.5
    assert engine.describe().startswith(f"fused/{info['kernel']}/")  # the run still uses what it measured
    assert not (tmp_path / "engine" / "choices.json").exists()
    assert [r.getMessage() for r in caplog.records if "not cached" in r.getMessage()] == [
        "engine choice measured while other processes used 50% of the CPUs: used for this run, "
        "not cached (measured again next time)"]
    monkeypatch.setattr(calibration, "ContentionMeter", _Meter)  # quiet again: measured anew, then cached
    _, again = calibration.build_engine(backbone, EngineConfig())
    assert again["source"] == "measured" and again["calibration_others_share"] == 0.0
    assert (tmp_path / "engine" / "choices.json").exists()
    assert calibration.build_engine(backbone, EngineConfig())[1]["source"] == "cache"


def test_amx_rows_are_measured_then_cached():
    from kangaroo import attention as native

    module = native.load()
    backbone = Backbone(tiny_model("llama", seed=0))
    engine = FusedEngine(backbone, torch.bfloat16, "q4_1_int8", "kernel", q4_layers=q4_layers(backbone))
    products = [p for layer in engine.layers for p in (layer.gate_up, layer.down)]
    old = module.linear_q4_amx_rows(0)
    try:
        first = quantized.choose_amx_rows(products, repeats=2)
        if not module.linear_q4_amx_available():
            assert first == {"amx_rows": 0, "amx_rows_source": "unavailable"}
            return
        assert first["amx_rows_source"] == "measured" and first["amx_rows"] in (0,) + quantized.AMX_ROWS
        assert set(first["amx_rows_us"]) == {str(r) for r in quantized.AMX_ROWS}
        assert module.linear_q4_amx_rows(0) == first["amx_rows"]  # it also set the module
        again = quantized.choose_amx_rows(products, cached={"amx_rows": 3, "amx_rows_us": {}})
        assert again["amx_rows"] == 3 and again["amx_rows_source"] == "cache" and module.linear_q4_amx_rows(0) == 3
        prompts = quantized.choose_prompt_amx_rows(engine.layers[0].gate_up, engine.layers[0].down, repeats=2)
        assert prompts["prompt_amx_rows_source"] == "measured"
        assert prompts["prompt_amx_rows"] in (0,) + quantized.PROMPT_AMX_ROWS
        assert quantized.choose_prompt_amx_rows(engine.layers[0].gate_up, engine.layers[0].down,
                                                cached={"prompt_amx_rows": 64})["prompt_amx_rows_source"] == "cache"
    finally:
        module.linear_q4_amx_rows(old)


def test_q4_1_needs_a_gguf_model_with_q4_1_layers():
    backbone = Backbone(tiny_model("llama", seed=0))
    assert backbone.gguf_path is None and not quantized.has_q4_1_layers(None)
    assert all(k not in ("q4_1", "q4_1_int8") for _, k in calibration.candidates(EngineConfig(), backbone))
    with pytest.raises(KangarooError, match=r"^the q4_1_int8 kernel cannot run here \(it needs a CPU with AVX512-BF16 and AVX512-VNNI and a model loaded from a GGUF file with Q4_1 layers\): use --kernel stock or auto$"):
        calibration.build_engine(backbone, EngineConfig(kernel="q4_1_int8"))
    with pytest.raises(KangarooError, match=r"^the q4_1 kernel cannot run here \(it needs a CPU with AVX512-BF16 and a model loaded from a GGUF file with Q4_1 layers\): use --kernel stock or auto$"):
        calibration.build_engine(backbone, EngineConfig(kernel="q4_1"))


def _ggml_q4_1_bytes(q, d, m):
    """ggml's Q4_1 bytes ``[rows, blocks * 20]``: d, m (float16), then input j | input j + 16 << 4."""
    N = q.shape[0]
    blocks = q.reshape(N, -1, 32)
    return np.concatenate([d.reshape(N, -1, 1).view(np.uint8).reshape(N, -1, 2), m.reshape(N, -1, 1).view(np.uint8).reshape(N, -1, 2),
                           blocks[..., :16] | (blocks[..., 16:] << 4)], axis=2).reshape(N, -1)


@pytest.mark.skipif(not Q4, reason="needs a CPU with AVX512-BF16")
def test_q4_1_reads_a_gguf_file_and_refuses_one_that_does_not_match(tmp_path):
    """A GGUF file written with ggml's own writer (metadata arrays and strings before the tensors, Q and
    K rows in llama.cpp's RoPE-pair order): the engine reads its Q4_1 layers back, computes what the
    same blocks compute when handed over directly, and refuses a file whose blocks are not the
    loaded model's weights, with one line."""
    import gguf

    from kangaroo.engine import _interleave_rope_rows

    model = tiny_model("llama", seed=4)
    backbone = Backbone(model)
    layers = q4_layers(backbone)
    writer = gguf.GGUFWriter(str(tmp_path / "tiny.gguf"), "llama")
    writer.add_token_list([f"tok{i}" for i in range(VOCAB)])  # string arrays the header reader must skip
    writer.add_uint32("llama.block_count", NUM_LAYERS)
    for i, blocks in enumerate(layers):
        for name, (q, d, m) in blocks.items():
            writer.add_tensor(f"blk.{i}.{quantized.GGUF_NAMES[name]}.weight", _ggml_q4_1_bytes(q, d, m),
                              raw_dtype=gguf.GGMLQuantizationType.Q4_1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    path = str(tmp_path / "tiny.gguf")
    assert quantized.has_q4_1_layers(path) and not quantized.has_q4_1_layers(str(tmp_path / "missing.gguf"))
    model.kangaroo_gguf = path  # as kangaroo.loading records a GGUF source
    with pytest.raises(KangarooError, match=r"^cannot build the q4_1 engine: blk\.0\.attn_q\.weight does not de-quantise to the loaded model's weights$"):
        calibration.build_engine(backbone, EngineConfig(kernel="q4_1"))
    with torch.no_grad():  # the model now holds exactly the file's weights (HF's Q and K row order)
        for i, blocks in enumerate(layers):
            w = backbone.layer_weights(i)
            a = w["attention"]
            order = _interleave_rope_rows(torch.arange(a["head_dim"] * a["heads"]).float()[:, None], a["heads"], a["head_dim"])
            k_order = _interleave_rope_rows(torch.arange(a["head_dim"] * a["kv_heads"]).float()[:, None], a["kv_heads"], a["head_dim"])
            a["q"][order[:, 0].long()] = quantized.dequantize(*blocks["q"])
            a["k"][k_order[:, 0].long()] = quantized.dequantize(*blocks["k"])
            for name, target in (("v", a["v"]), ("o", a["o"]), ("gate", w["gate"]), ("up", w["up"]), ("down", w["down"])):
                target.copy_(quantized.dequantize(*blocks[name]))
    engine, info = calibration.build_engine(backbone, EngineConfig(kernel="q4_1"))
    assert info["kernel"] == "q4_1" and engine.describe().startswith("fused/q4_1")
    direct = FusedEngine(backbone, torch.bfloat16, "q4_1", engine.attention, q4_layers=layers)
    for setting in ("kv_dtype", "prompt_int8", "prompt_tiles", "prompt_amx_rows"):  # as calibrated for the chosen engine
        setattr(direct, setting, getattr(engine, setting))
    ids = torch.randint(0, VOCAB, (1, 30), generator=torch.Generator().manual_seed(0))
    assert AutoregressiveDecoder(engine).generate(ids, 12).token_ids == AutoregressiveDecoder(direct).generate(ids, 12).token_ids
