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
    with pytest.raises(RuntimeError, match="float32 only"):
        attention.decode_attention(q.double(), k.double(), k.double(), [0, 0], [5, 6], 1.0)


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
