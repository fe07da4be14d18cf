"""The screened greedy LM head (kangaroo.screened_head): exactly ``logits.argmax(-1)`` of the dpbf16
head, on every row, whatever the number of rows, ties to the first index; and it does prune."""

from __future__ import annotations

import pytest
import torch

from kangaroo import attention as native
from kangaroo.kernels import Linear, kernel_available
from kangaroo.screened_head import ScreenedHead


def _available() -> bool:
    module = native.load() if kernel_available("dpbf16", torch.bfloat16, "cpu") else None
    return module is not None and module.head_argmax_available()


pytestmark = pytest.mark.skipif(not _available(), reason="needs a CPU with AVX512-BF16 and AVX512-VNNI")


def _head(weight: torch.Tensor) -> tuple[Linear, ScreenedHead]:
    head = Linear(weight, None, torch.bfloat16, "dpbf16", check=False)
    screen = ScreenedHead.for_head(head, weight)
    assert screen is not None
    return head, screen


def _reference(head: Linear, x: torch.Tensor) -> torch.Tensor:
    return head(x).float().argmax(-1)


@pytest.mark.parametrize("vocab,dim", [(1000, 64), (4099, 96), (512, 576), (48, 2)])
def test_screen_is_the_full_heads_argmax_on_any_rows(vocab, dim):
    g = torch.Generator().manual_seed(vocab + dim)
    weight = torch.randn(vocab, dim, generator=g) * torch.rand(vocab, 1, generator=g)  # rows of different norms
    head, screen = _head(weight)
    for scale in (0.0, 1e-3, 1.0, 30.0):
        for rows in (1, 2, 3, 8, 9, 16, 20):
            x = torch.randn(rows, dim, generator=g) * scale
            x[0] = weight[int(torch.randint(vocab, (1,), generator=g))] * scale  # a row pointing at one token
            got = screen(x)
            assert torch.equal(got, _reference(head, x)), (scale, rows)
            # each row on its own gives the same token (row invariance)
            assert torch.equal(torch.cat([screen(x[i:i + 1]) for i in range(rows)]), got)


def test_ties_and_near_ties_go_to_the_first_index():
    g = torch.Generator().manual_seed(1)
    vocab, dim = 700, 64
    weight = torch.randn(vocab, dim, generator=g) * 0.1
    best = torch.randn(dim, generator=g)
    for i in (650, 40, 17):  # identical rows in three blocks: equal logits, the first index wins
        weight[i] = best
    head, screen = _head(weight)
    x = torch.stack([best, -best, best * 1e-3])
    logits = head(x).float()
    assert logits[0, 17] == logits[0, 40] == logits[0, 650]
    assert int(screen(x[:1])[0]) == 17
    assert torch.equal(screen(x), logits.argmax(-1))
    # near-ties: rows one bfloat16 step apart in one weight, on either side of the tied rows
    for sign in (-1e9, 1e9):
        near = weight.clone()
        near[3] = best.to(torch.bfloat16).float()
        near[3, 0] = float(torch.nextafter(near[3, 0].to(torch.bfloat16), torch.tensor(sign, dtype=torch.bfloat16)))
        head, screen = _head(near)
        assert torch.equal(screen(x), _reference(head, x)), sign


def test_a_crowd_the_int8_logits_cannot_order_is_recomputed_exactly():
    """Large rows with small logits, a crowd within the int8 weights' error of each other: the
    screened logits alone pick the wrong token in about a third of the rows (checked with the bound
    zeroed), so this fails if the bound is too tight."""
    g = torch.Generator().manual_seed(0)
    wrong_without_bound = 0
    for _ in range(10):
        x = torch.randn(3, 64, generator=g)
        c = torch.randn(64, generator=g) * 10
        c = c - (c @ x[0]) / (x[0] @ x[0]) * x[0] + x[0] / (x[0] @ x[0]) * 5  # logit 5 for x[0]
        weight = torch.randn(1000, 64, generator=g) * 0.1
        weight[::5] = c + torch.randn(200, 64, generator=g) * 0.05
        head, screen = _head(weight)
        expected = _reference(head, x)
        assert torch.equal(screen(x), expected)
        screen.meta[:, 1:] = 0  # the bound without its weight and row terms
        wrong_without_bound += int((screen(x) != expected).sum())
    assert wrong_without_bound > 0


def test_screen_prunes_and_padding_never_wins():
    g = torch.Generator().manual_seed(2)
    vocab, dim = 2003, 128  # not a multiple of 16: the packed head has zero padding rows
    weight = torch.randn(vocab, dim, generator=g)
    head, screen = _head(weight)
    x = weight[[5, 100, 2002]] * 3  # clear winners
    assert torch.equal(screen(x), torch.tensor([5, 100, 2002]))
    assert int(screen.last_survivors.max()) < vocab // 20  # only a few tokens were recomputed exactly
    # every real logit negative: the padding's zero logits must still not be chosen
    neg = torch.zeros(vocab, dim)
    neg[:, 0] = -1 - torch.rand(vocab, generator=g)
    head, screen = _head(neg)
    x = torch.ones(2, dim)
    assert torch.equal(screen(x), _reference(head, x))
    assert int(screen(x)[0]) < vocab


def test_rows_that_are_not_finite_are_left_to_the_full_head():
    weight = torch.randn(100, 32)
    head, screen = _head(weight)
    x = torch.randn(3, 32)
    x[1, 5] = float("nan")
    assert torch.equal(screen(x), _reference(head, x))  # torch's own rule for NaN, as before the screen
    x[1, 5] = float("inf")
    assert torch.equal(screen(x), _reference(head, x))


def test_screen_is_only_built_for_a_bias_free_dpbf16_head():
    weight = torch.randn(64, 32)
    broken = weight.clone()
    broken[3, 3] = float("inf")
    assert ScreenedHead.for_head(Linear(broken, None, torch.bfloat16, "dpbf16", check=False), broken) is None
    assert ScreenedHead.for_head(Linear(weight, torch.randn(64), torch.bfloat16, "dpbf16", check=False), weight) is None
    assert ScreenedHead.for_head(Linear(weight, None, torch.float32, "stock", check=False), weight) is None


def _amx() -> bool:
    return bool(native.load().head_argmax_amx_available())


@pytest.mark.skipif(not _available() or not _amx(), reason="needs AMX-INT8 tiles")
@pytest.mark.parametrize("vocab,dim", [(112, 64), (1000, 576), (4099, 128), (300, 1280)])
def test_amx_pass_gives_the_same_sums_as_avx512(vocab, dim):
    """Pass 1 on AMX tiles (rows split into high and low bytes) forms the same int32 sums as the
    AVX-512 pass, so tokens and survivor counts are equal bit for bit, whatever the rows: tiles of 16
    rows and a remainder, an odd number of output blocks per thread (7 blocks), K above 1,024 (a
    smaller row scale), rows at the int16 extremes (a row with one large entry)."""
    g = torch.Generator().manual_seed(vocab * dim)
    weight = torch.randn(vocab, dim, generator=g) * torch.rand(vocab, 1, generator=g)
    head, screen = _head(weight)
    assert screen.q8t.shape == (screen.q8.shape[0], dim // 4, 16, 4)
    for rows in (1, 2, 5, 16, 17, 33):
        x = torch.randn(rows, dim, generator=g) * 3
        x[0, 1] = 1e3  # |x16| = qmax at one entry, small elsewhere
        x[-1] = weight[vocab - 1] * 5
        runs = []
        for amx_rows in (0, 1, rows):
            screen.amx_rows = amx_rows
            runs.append((screen(x), screen.last_survivors))
        screen.amx_rows = 0
        for tokens, survivors in runs[1:]:
            assert torch.equal(tokens, runs[0][0]) and torch.equal(survivors, runs[0][1]), rows
        assert torch.equal(runs[0][0], _reference(head, x))


@pytest.mark.skipif(not _available() or not _amx(), reason="needs AMX-INT8 tiles")
def test_amx_rows_is_measured_then_cached():
    from kangaroo.quantized import AMX_ROWS
    from kangaroo.screened_head import choose_amx_rows

    weight = torch.randn(2048, 128)
    _, screen = _head(weight)
    info = choose_amx_rows(screen, repeats=2)
    assert info["head_amx_rows_source"] == "measured" and info["head_amx_rows"] in (0, *AMX_ROWS)
    assert screen.amx_rows == info["head_amx_rows"] and set(info["head_amx_rows_us"]) == {str(r) for r in AMX_ROWS}
    cached = choose_amx_rows(screen, cached={"head_amx_rows": 6, "head_amx_rows_us": {}})
    assert cached["head_amx_rows_source"] == "cache" and screen.amx_rows == 6
