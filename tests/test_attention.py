"""The decode-attention kernel (kangaroo.attention): it builds here, each row's bits do not depend on
the other rows, it computes attention (against SDPA), and the engine falls back cleanly without it."""

from __future__ import annotations

import logging
import os
import time

import pytest
import torch
from torch.nn import functional as F

from kangaroo import attention
from kangaroo.errors import KangarooError


@pytest.fixture(scope="module")
def kernel():
    module = attention.load()
    assert module is not None, f"the decode-attention kernel did not build: {attention.status()['reason']}"
    return module


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(9, 3, 64), (4, 2, 16), (4, 1, 256), (8, 8, 128), (6, 3, 24), (2, 2, 64)])
def test_rows_equal_their_one_row_calls_and_sdpa(kernel, heads, kv_heads, head_dim):
    assert attention.check(heads, kv_heads, head_dim, seed=head_dim) is None


def test_many_positions_rows_and_windows_are_bit_invariant(kernel):
    """Every row count 1..16 at positions around the 128-key chunk borders, with and without a window."""
    gen = torch.Generator().manual_seed(0)
    keys, values = torch.randn(3, 420, 64, generator=gen), torch.randn(3, 420, 64, generator=gen)
    for pos in (0, 1, 15, 16, 112, 120, 127, 128, 129, 250, 255, 256, 383, 400):
        for window in (None, 30, 130):
            T = 1 + (pos * 7 + (window or 0)) % 16
            T = min(T, 420 - pos)
            q = torch.randn(T, 9, 64, generator=gen)
            ends = [pos + t + 1 for t in range(T)]
            begins = [0 if window is None else max(0, e - window) for e in ends]
            rows = attention.decode_attention(q, keys, values, begins, ends, 0.125)
            for t in range(T):
                alone = attention.decode_attention(q[t:t + 1].clone(), keys, values, begins[t:t + 1], ends[t:t + 1], 0.125)
                assert torch.equal(alone[0], rows[t]), (pos, window, T, t)
            ref = attention.sdpa_rows(q, keys, values, begins, ends, 0.125)
            torch.testing.assert_close(rows, ref, rtol=1e-4, atol=1e-5)


def test_strided_queries_and_cache_views_are_read_in_place(kernel):
    """The engine passes q as a slice of the fused QKV rows and keys as a view of a larger buffer."""
    gen = torch.Generator().manual_seed(1)
    qk = torch.randn(5, 9 + 3, 64, generator=gen)
    buf_k, buf_v = torch.randn(1, 3, 512, 64, generator=gen), torch.randn(1, 3, 512, 64, generator=gen)
    k, v = buf_k[:, :, :300], buf_v[:, :, :300]
    ends = list(range(296, 301))
    out = attention.decode_attention(qk[:, :9], k[0], v[0], [0] * 5, ends, 0.125)
    ref = torch.cat([F.scaled_dot_product_attention(qk[t:t + 1, :9].transpose(0, 1)[None], k[:, :, :e], v[:, :, :e],
                                                    scale=0.125, enable_gqa=True)[0].transpose(0, 1) for t, e in enumerate(ends)])
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_bad_ranges_and_dtypes_are_refused(kernel):
    q, k = torch.randn(2, 4, 16), torch.randn(2, 10, 16)
    with pytest.raises(RuntimeError, match="bad key range"):
        attention.decode_attention(q, k, k, [0, 0], [5, 11], 1.0)
    with pytest.raises(RuntimeError, match="one key range per row"):
        attention.decode_attention(q, k, k, [0], [5], 1.0)
    with pytest.raises(RuntimeError, match="float32 queries"):
        attention.decode_attention(q.double(), k, k, [0, 0], [5, 6], 1.0)
    with pytest.raises(RuntimeError, match="float32 or bfloat16 keys and values"):
        attention.decode_attention(q, k.double(), k.double(), [0, 0], [5, 6], 1.0)
    with pytest.raises(RuntimeError, match="float32 or bfloat16 keys and values"):
        attention.decode_attention(q, k, k.bfloat16(), [0, 0], [5, 6], 1.0)


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(9, 3, 64), (4, 1, 256), (8, 8, 128), (4, 2, 16), (6, 3, 24)])
def test_bfloat16_cache_rows_are_bit_invariant_and_attend(kernel, heads, kv_heads, head_dim):
    """A bfloat16 cache: every row count 1..16 at positions around the chunk borders, with and without
    a window, gives each row its one-row bits; it is attention over the rounded keys and values (to
    bfloat16's rounding of queries and weights where computed natively, exactly elsewhere: the cache
    widened to float32 gives the float32 cache's bits)."""
    gen = torch.Generator().manual_seed(head_dim)
    keys, values = (torch.randn(kv_heads, 420, head_dim, generator=gen).bfloat16() for _ in range(2))
    native = attention.bf16_cache_native(head_dim)
    differed = False
    for pos in (0, 1, 15, 127, 128, 129, 255, 383, 400):
        for window in (None, 30, 131):
            T = min(1 + (pos * 7 + (window or 0)) % 16, 420 - pos)
            q = torch.randn(T, heads, head_dim, generator=gen)
            ends = [pos + t + 1 for t in range(T)]
            begins = [0 if window is None else max(0, e - window) for e in ends]
            scale = head_dim ** -0.5
            rows = attention.decode_attention(q, keys, values, begins, ends, scale)
            for t in range(T):
                alone = attention.decode_attention(q[t:t + 1].clone(), keys, values, begins[t:t + 1], ends[t:t + 1], scale)
                assert torch.equal(alone[0], rows[t]), (pos, window, T, t)
            widened = attention.decode_attention(q, keys.float(), values.float(), begins, ends, scale)
            differed |= not torch.equal(rows, widened)
            torch.testing.assert_close(rows, widened, rtol=3e-2, atol=3e-2)
            ref = attention.sdpa_rows(q, keys.float(), values.float(), begins, ends, scale)
            torch.testing.assert_close(rows, ref, rtol=3e-2, atol=3e-2)
    assert differed == native  # bfloat16 products where native, else exactly the widened cache's float32 arithmetic


def test_bfloat16_cache_writes_are_the_rounded_float32_writes(kernel):
    """rope_attend and rope_attend_tree write what they write into a float32 cache, rounded to bfloat16
    (nearest even), and a prompt over a bfloat16 cache is the prompt over its float32 widening."""
    gen = torch.Generator().manual_seed(7)
    H, Hkv, d, T, start = 9, 3, 64, 40, 10
    qkv = torch.randn(T, (H + 2 * Hkv) * d, generator=gen).bfloat16()
    angles = torch.rand(T, 1, d // 2, generator=gen) * 6.28
    cs = torch.stack([angles.cos(), angles.sin()], dim=-1)
    k32, v32 = torch.zeros(Hkv, 64, d), torch.zeros(Hkv, 64, d)
    k32[:, :start] = torch.randn(Hkv, start, d, generator=gen).bfloat16().float()  # earlier tokens, as a bfloat16 cache holds them
    v32[:, :start] = torch.randn(Hkv, start, d, generator=gen).bfloat16().float()
    k16, v16 = k32.bfloat16(), v32.bfloat16()
    out32 = attention.rope_attend(qkv, cs, k32, v32, start, H, Hkv, 0.125, 0)  # a prompt: > 16 rows
    out16 = attention.rope_attend(qkv, cs, k16, v16, start, H, Hkv, 0.125, 0)
    assert torch.equal(k16, k32.bfloat16()) and torch.equal(v16, v32.bfloat16())
    assert out16.shape == out32.shape == (T, H * d)
    torch.testing.assert_close(out16, out32, rtol=3e-2, atol=3e-2)
    q = torch.randn(T, H, d, generator=gen)
    assert torch.equal(attention.prompt_attention(q, k16[:, :start + T], v16[:, :start + T], start, 0, 0.125),
                       attention.prompt_attention(q, k16[:, :start + T].float(), v16[:, :start + T].float(), start, 0, 0.125))
    # a tree's rows: the stash and the cache slots hold the same rounded keys and values
    ks, vs = torch.empty(Hkv, 5, d, dtype=torch.bfloat16), torch.empty(Hkv, 5, d, dtype=torch.bfloat16)
    ks32, vs32 = torch.empty(Hkv, 5, d), torch.empty(Hkv, 5, d)
    segments = [(0, 3, 0), (3, 5, 1)]
    attention.rope_attend_tree(qkv[:5], cs[:5], k32, v32, start + T, segments, H, Hkv, 0.125, 0, ks32, vs32)
    attention.rope_attend_tree(qkv[:5], cs[:5], k16, v16, start + T, segments, H, Hkv, 0.125, 0, ks, vs)
    assert torch.equal(ks, ks32.bfloat16()) and torch.equal(vs, vs32.bfloat16())
    assert torch.equal(k16, k32.bfloat16()) and torch.equal(v16, v32.bfloat16())
    with pytest.raises(RuntimeError, match="stashes \\[H_kv, T, d\\] in the cache's dtype"):
        attention.rope_attend_tree(qkv[:5], cs[:5], k16, v16, start + T, segments, H, Hkv, 0.125, 0, ks32, vs32)


def test_choose_measures_insists_or_skips(kernel):
    pick, info = attention.choose("auto", 9, 3, 64, torch.device("cpu"))
    assert pick in ("kernel", "sdpa") and info["attention_source"] == "measured"
    assert pick == ("kernel" if info["attention_us"]["kernel"] <= info["attention_us"]["sdpa"] else "sdpa")
    assert attention.choose("kernel", 9, 3, 64, torch.device("cpu"))[0] == "kernel"
    again = attention.choose("auto", 9, 3, 64, torch.device("cpu"), cached={"attention": "sdpa", "attention_us": {}})
    assert again[0] == "sdpa" and again[1]["attention_source"] == "cache"
    assert attention.choose("sdpa", 9, 3, 64, torch.device("cpu")) == ("sdpa", {"attention": "sdpa", "attention_source": "given"})
    with pytest.raises(KangarooError, match="unknown attention 'flash'"):
        attention.choose("flash", 9, 3, 64, torch.device("cpu"))
    with pytest.raises(KangarooError, match="CPU only"):
        attention.choose("kernel", 9, 3, 64, torch.device("meta"))
    assert attention.choose("auto", 9, 3, 64, torch.device("meta"))[0] == "sdpa"


def test_without_the_kernel_auto_falls_back_with_one_warning_and_kernel_is_a_clear_error(monkeypatch, caplog):
    monkeypatch.setattr(attention, "_state", {"module": None, "reason": "no C++ compiler"})
    with caplog.at_level(logging.WARNING):
        pick, info = attention.choose("auto", 9, 3, 64, torch.device("cpu"))
    assert pick == "sdpa" and info["attention_reason"] == "no C++ compiler"
    with pytest.raises(KangarooError, match=r"cannot be used here \(no C\+\+ compiler\): use --attention sdpa"):
        attention.choose("kernel", 9, 3, 64, torch.device("cpu"))


def test_a_failed_build_is_one_warning_line(monkeypatch, caplog, tmp_path):
    """A compiler error (here: a source that does not compile) leaves per-row SDPA, with the reason."""
    bad = tmp_path / "broken.cpp"
    bad.write_text("this is not C++\n")
    monkeypatch.setattr(attention, "SOURCES", (bad,))
    monkeypatch.setattr(attention, "_state", {})
    monkeypatch.setenv("KANGAROO_CACHE", str(tmp_path / "cache"))
    with caplog.at_level(logging.WARNING):
        assert attention.load() is None
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and warnings[0].startswith("decode-attention kernel unavailable (")
    assert "\n" not in warnings[0] and not attention.status()["available"]


def test_a_stale_build_lock_is_removed_and_a_fresh_one_kept(tmp_path, caplog):
    """An interrupted compile leaves torch's lock file, on which every later build would wait forever."""
    lock = tmp_path / "lock"
    lock.write_text("")
    attention._clear_stale_lock(tmp_path)
    assert lock.exists()  # a compile may be running right now
    old = time.time() - 3600
    os.utime(lock, (old, old))
    with caplog.at_level(logging.WARNING):
        attention._clear_stale_lock(tmp_path)
    assert not lock.exists() and "stale build lock" in caplog.text


def test_fused_step_ops_match_the_torch_ops_they_replace(kernel):
    """RoPE, the cache write + attention, the residual add + norm and the SiLU gating of the compiled
    module compute what the torch ops compute (to rounding), write the cache slots they are given and
    nothing else, and leave each row's bits independent of the other rows."""
    gen = torch.Generator().manual_seed(3)
    T, H, Hkv, d, start, cap = 5, 9, 3, 64, 40, 64
    qkv = torch.randn(T, (H + 2 * Hkv) * d, generator=gen).to(torch.bfloat16)
    angles = torch.rand(T, 1, d // 2, generator=gen) * 6
    cs = torch.stack([angles.cos(), angles.sin()], dim=-1)  # [T, 1, d/2, 2]
    qk = qkv[:, :(H + Hkv) * d].float().view(T, H + Hkv, d)
    ref_qk = torch.view_as_real(torch.view_as_complex(qk.reshape(T, H + Hkv, d // 2, 2)) * torch.view_as_complex(cs)).view(T, H + Hkv, d)
    torch.testing.assert_close(attention.rope(qk, cs), ref_qk, rtol=1e-5, atol=1e-5)
    keys, values = torch.randn(Hkv, cap, d, generator=gen), torch.randn(Hkv, cap, d, generator=gen)
    k0, v0 = keys.clone(), values.clone()
    for window in (0, 20):
        out = attention.rope_attend(qkv, cs, keys, values, start, H, Hkv, 0.125, window)
        torch.testing.assert_close(keys[:, start:start + T], ref_qk[:, H:].transpose(0, 1), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(values[:, start:start + T], qkv[:, (H + Hkv) * d:].float().view(T, Hkv, d).transpose(0, 1))
        assert torch.equal(keys[:, :start], k0[:, :start]) and torch.equal(keys[:, start + T:], k0[:, start + T:])
        ends = [start + t + 1 for t in range(T)]
        begins = [max(0, e - window) if window else 0 for e in ends]
        ref = attention.sdpa_rows(ref_qk[:, :H], keys, values, begins, ends, 0.125).reshape(T, H * d)
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
        for t in range(T):  # a row alone, at its own position, gets the same bits
            alone = attention.rope_attend(qkv[t:t + 1], cs[t:t + 1], keys, values, start + t, H, Hkv, 0.125, window)
            assert torch.equal(alone[0], out[t]), (window, t)
        keys[:, start:], values[:, start:] = k0[:, start:], v0[:, start:]
    x, y = torch.randn(T, 576, generator=gen), torch.randn(T, 576, generator=gen).to(torch.bfloat16)
    w = torch.rand(576, generator=gen) + 0.5
    x_ref = x + y
    h = attention.add_rms_norm(x, y, w, 1e-5)
    assert torch.equal(x, x_ref)  # the residual add is exactly torch's
    assert torch.equal(h, attention.rms_norm(x_ref, w, 1e-5))
    gu = torch.randn(T, 2 * 1536, generator=gen).to(torch.bfloat16)
    ref = (F.silu(gu[:, :1536].float()) * gu[:, 1536:].float()).to(torch.bfloat16)
    got = attention.silu_mul(gu)
    torch.testing.assert_close(got.float(), ref.float(), rtol=1e-2, atol=1e-2)
    assert all(torch.equal(attention.silu_mul(gu[t:t + 1].clone())[0], got[t]) for t in range(T))


def test_top1_prob_is_torch_softmax_max_of_the_last_row(kernel, monkeypatch):
    """The draft's second early exit reads the compiled top-1 and its probability: torch's argmax
    (first of equal logits) and softmax maximum, over the last row, bfloat16 or float32, any length
    (vector body and scalar tail); without the module, torch computes it."""
    gen = torch.Generator().manual_seed(5)
    for dtype in (torch.bfloat16, torch.float32):
        for V in (1, 15, 16, 17, 8192, 49152):
            x = (torch.randn(3, V, generator=gen) * 4).to(dtype)
            x[-1, V // 2] = x[-1, V - 1] = x[-1].max()  # a tie: the first index wins
            conf, idx = torch.softmax(x[-1].float(), dim=-1).max(dim=-1)
            got = attention.top1_prob(x[None])
            assert got[0] == int(idx) and got[1] == pytest.approx(float(conf), rel=1e-5), (dtype, V)
    x = torch.tensor([-float("inf"), 5.0, 5.0, -float("inf")])
    assert attention.top1_prob(x) == (1, pytest.approx(0.5, rel=1e-6))
    idx, prob = attention.top1_prob(torch.tensor([1.0, float("nan"), 3.0]))
    assert idx == 1 and not prob < 0.99  # NaN logits: a NaN probability, never below η
    monkeypatch.setitem(attention._state, "module", None)
    assert attention.top1_prob(x) == (1, pytest.approx(0.5, rel=1e-6))


@pytest.mark.parametrize("T,start,heads,kv_heads,head_dim,window", [
    (810, 0, 9, 3, 64, 0),     # SmolLM2's prompt shape
    (100, 37, 8, 2, 128, 0),   # a prompt after cached positions
    (70, 0, 4, 4, 256, 0),
    (200, 50, 9, 3, 64, 64),   # a sliding window that starts inside the first chunk
    (33, 0, 16, 1, 64, 0),     # many query heads per kv head
    (17, 300, 6, 2, 64, 100),
    (70, 5, 6, 3, 24, 20),     # a head size without a tile: the decode kernel, 64 rows a call
])
@pytest.mark.parametrize("tiles", attention.PROMPT_TILES)
def test_prompt_attention_computes_causal_attention(kernel, T, start, heads, kv_heads, head_dim, window, tiles):
    """The prompt tiles attend each row over exactly its causal (windowed) key range: against per-row
    SDPA to rounding, with keys past the rows left unread, and strided query rows read in place. In
    bfloat16 tiles (vdpbf16ps or AMX), to the rounding of queries, keys, values and probabilities to
    bfloat16."""
    if not attention.prompt_tiles_available(tiles):
        pytest.skip(f"no {tiles} prompt tiles on this machine")
    gen = torch.Generator().manual_seed(T)
    S = start + T
    qkv = torch.randn(T, heads + 2, head_dim, generator=gen)  # rows strided as the engine's QKV output
    q = qkv[:, :heads]
    keys = torch.randn(kv_heads, S + 7, head_dim, generator=gen)
    values = torch.randn(kv_heads, S + 7, head_dim, generator=gen)
    ends = list(range(start + 1, S + 1))
    begins = [max(0, e - window) if window else 0 for e in ends]
    ref = attention.sdpa_rows(q.contiguous(), keys, values, begins, ends, 0.1)
    old = attention.set_prompt_tiles(tiles)
    try:
        out = attention.prompt_attention(q, keys, values, start, window, 0.1)
        if tiles == "float32" or head_dim not in (64, 128, 256):  # no bfloat16 tile for other head sizes
            torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
        else:
            rounded = [t.to(torch.bfloat16).float() for t in (q.contiguous(), keys, values)]
            ref_bf16 = attention.sdpa_rows(*rounded, begins, ends, 0.1)
            torch.testing.assert_close(out, ref_bf16, rtol=0, atol=1e-2)  # what is left: the probabilities' rounding
            torch.testing.assert_close(out, ref, rtol=0, atol=3e-2)
            assert not torch.allclose(out, ref, rtol=1e-4, atol=1e-5)  # it did compute in bfloat16
        keys[:, S:], values[:, S:] = float("nan"), float("nan")  # never read
        assert torch.equal(attention.prompt_attention(q, keys, values, start, window, 0.1), out)
    finally:
        attention.set_prompt_tiles(old)


def test_prompt_rows_go_to_the_tiles_and_first_out_skips_rows(kernel):
    """rope_attend sends more than step_rows rows to the prompt tiles and up to step_rows to the
    row-invariant decode kernel; with first_out it writes every row's keys but attends only the rest,
    and those rows get the bits they get when all rows attend through the same kernel."""
    gen = torch.Generator().manual_seed(5)
    T, H, Hkv, d = 40, 9, 3, 64
    qkv = torch.randn(T, (H + 2 * Hkv) * d, generator=gen)
    angles = torch.rand(T, 1, d // 2, generator=gen) * 6
    cs = torch.stack([angles.cos(), angles.sin()], dim=-1)
    bufs = lambda: (torch.zeros(Hkv, 64, d), torch.zeros(Hkv, 64, d))  # noqa: E731
    k1, v1 = bufs()
    tiles = attention.rope_attend(qkv, cs, k1, v1, 0, H, Hkv, 0.125, 0, 0, 16)
    k2, v2 = bufs()
    blocks = attention.rope_attend(qkv, cs, k2, v2, 0, H, Hkv, 0.125, 0, 0, T)  # all rows "step rows"
    assert torch.equal(k1, k2) and torch.equal(v1, v2)
    torch.testing.assert_close(tiles, blocks, rtol=1e-4, atol=1e-5)
    q = attention.rope(qkv[:, :H * d].view(T, H, d), cs)
    assert torch.equal(tiles.view(T, H, d), attention.prompt_attention(q, k1[:, :T], v1[:, :T], 0, 0, 0.125))
    k3, v3 = bufs()
    last = attention.rope_attend(qkv, cs, k3, v3, 0, H, Hkv, 0.125, 0, T - 3, 16)
    assert torch.equal(k3, k1) and torch.equal(v3, v1) and last.shape == (3, H * d)
    assert torch.equal(last, blocks[T - 3:])  # 3 rows: the decode kernel, row-invariant


def test_tree_attention_block_gives_each_row_its_one_token_bits(kernel):
    """rope_attend_tree: each segment is written at pos + depth of its first row and its rows attend
    over the prefix and their ancestors, with the bits rope_attend gives the same row alone at its
    position over the same keys; every row's rotated key and value lands in the stash."""
    gen = torch.Generator().manual_seed(9)
    H, Hkv, d, pos = 9, 3, 64, 40
    parents = [0, 1, 2, 0, 4]  # rows 1-3: a chain; rows 4-5: a branch from row 0 (depth-first)
    depths = [0, 1, 2, 3, 1, 2]
    segments = [(0, 4, 0), (4, 6, 1)]
    T = len(depths)
    qkv = torch.randn(T, (H + 2 * Hkv) * d, generator=gen).to(torch.bfloat16)
    angles = torch.rand(T, 1, d // 2, generator=gen) * 6
    cs = torch.stack([angles.cos(), angles.sin()], dim=-1)
    prefix_k, prefix_v = torch.randn(Hkv, 64, d, generator=gen), torch.randn(Hkv, 64, d, generator=gen)
    keys, values = prefix_k.clone(), prefix_v.clone()
    stash = torch.empty(2, Hkv, T, d)
    out = attention.rope_attend_tree(qkv, cs, keys, values, pos, segments, H, Hkv, 0.125, 0, stash[0], stash[1])
    for t in range(T):
        ancestors, r = [], t  # the row itself and its ancestors, root first
        while True:
            ancestors.insert(0, r)
            if r == 0:
                break
            r = parents[r - 1]
        k1, v1 = prefix_k.clone(), prefix_v.clone()
        for depth, row in enumerate(ancestors[:-1]):  # the ancestors' keys at their slots, as steps left them
            k1[:, pos + depth], v1[:, pos + depth] = stash[0][:, row], stash[1][:, row]
        alone = attention.rope_attend(qkv[t:t + 1], cs[t:t + 1], k1, v1, pos + depths[t], H, Hkv, 0.125, 0)
        assert torch.equal(alone[0], out[t]), t
        assert torch.equal(k1[:, pos + depths[t]], stash[0][:, t]) and torch.equal(v1[:, pos + depths[t]], stash[1][:, t])
    assert torch.equal(keys[:, :pos], prefix_k[:, :pos])


def test_the_ninja_beside_this_python_is_taken_first(tmp_path, monkeypatch):
    """Another ninja first on PATH (a system one) must not build the kernels: two ninja versions read
    each other's build log as out of date and recompile everything at every switch."""
    scripts, other = tmp_path / "venv-bin", tmp_path / "usr-bin"
    for d in (scripts, other):
        d.mkdir()
        (d / "ninja").write_text("#!/bin/sh\n")
        (d / "ninja").chmod(0o755)
    monkeypatch.setattr(attention.sysconfig, "get_path", lambda name: str(scripts))
    monkeypatch.setenv("PATH", str(other))
    attention._ensure_ninja()
    assert attention.shutil.which("ninja") == str(scripts / "ninja")
    attention._ensure_ninja()  # already first: PATH is left as it is
    assert os.environ["PATH"] == os.pathsep.join([str(scripts), str(other)])
    (scripts / "ninja").unlink()  # no ninja beside this Python: PATH's own is used
    monkeypatch.setenv("PATH", str(other))
    attention._ensure_ninja()
    assert os.environ["PATH"] == str(other)
