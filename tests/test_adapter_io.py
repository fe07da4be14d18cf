"""Adapter files: round trip, and a clear error for every way they can be wrong."""

from __future__ import annotations

import json

import pytest
import torch
from tiny import tiny_model

from kangaroo.adapter import Adapter, AdapterConfig
from kangaroo.errors import KangarooError
from kangaroo.model import Backbone


@pytest.fixture()
def saved(tmp_path):
    bb = Backbone(tiny_model("qwen3", seed=1))
    adapter = Adapter.random(bb, 2, seed=4)
    adapter.save(tmp_path / "ad", AdapterConfig(base_model="tiny-qwen3", exit_layer=2, fingerprint=bb.fingerprint()))
    return bb, adapter, tmp_path / "ad"


def test_round_trip_and_shared_lm_head(saved):
    bb, adapter, path = saved
    loaded, config = Adapter.load(path, bb)
    assert config.exit_layer == 2 and config.base_model == "tiny-qwen3" and config.dtype == "float32"
    for (k, a), (_, b) in zip(adapter.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
    assert not any("lm_head" in k or "embed" in k for k in loaded.state_dict())  # the LM head is shared, not copied
    assert sorted(p.name for p in path.iterdir()) == ["adapter.safetensors", "adapter_config.json"]


def test_loads_in_another_dtype(saved):
    bb, _, path = saved
    bb16 = Backbone(tiny_model("qwen3", seed=1).to(torch.bfloat16))
    loaded, _ = Adapter.load(path, bb16)
    assert next(loaded.parameters()).dtype == torch.bfloat16


def test_wrong_exit_layer(saved):
    bb, _, path = saved
    with pytest.raises(KangarooError, match="exit layer 2, not 3"):
        Adapter.load(path, bb, exit_layer=3)


def test_other_model_same_shape(saved):
    _, _, path = saved
    with pytest.raises(KangarooError, match="another model.*different embedding"):
        Adapter.load(path, Backbone(tiny_model("qwen3", seed=99)))


def test_other_architecture_or_size(saved):
    _, _, path = saved
    with pytest.raises(KangarooError, match="another model"):
        Adapter.load(path, Backbone(tiny_model("llama", seed=1)))
    with pytest.raises(KangarooError, match="another model.*hidden_size"):
        Adapter.load(path, Backbone(tiny_model("qwen3", seed=1, hidden_size=32)))


def test_missing_and_corrupt_files(saved, tmp_path):
    bb, _, path = saved
    with pytest.raises(KangarooError, match="adapter not found"):
        Adapter.load(tmp_path / "nope", bb)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(KangarooError, match="not an adapter folder"):
        Adapter.load(empty, bb)
    weights = path / "adapter.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])
    with pytest.raises(KangarooError, match="corrupt adapter weights"):
        Adapter.load(path, bb)
    weights.write_bytes(b"garbage")
    with pytest.raises(KangarooError, match="corrupt adapter weights"):
        Adapter.load(path, bb)
    weights.write_bytes(good)
    (path / "adapter_config.json").write_text("{not json")
    with pytest.raises(KangarooError, match="corrupt adapter config"):
        Adapter.load(path, bb)
    (path / "adapter_config.json").write_text(json.dumps({"unexpected": 1}))
    with pytest.raises(KangarooError, match="corrupt adapter config"):
        Adapter.load(path, bb)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_full_multi_head_adapter(arch, tmp_path):
    """kv_heads = query heads: warm start repeats each key/value head (same function as the grouped
    layout), the option survives save/load, and a head count that does not divide is refused."""
    bb = Backbone(tiny_model(arch, seed=4))
    grouped = Adapter.from_backbone(bb, 2)
    full = Adapter.from_backbone(bb, 2, kv_heads=4)
    assert full.self_attn.k_proj.weight.shape[0] == 2 * grouped.self_attn.k_proj.weight.shape[0]
    h = torch.randn(1, 9, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(full(h, bb, None, 0), grouped(h, bb, None, 0), rtol=1e-5, atol=1e-5)

    trained = Adapter.random(bb, 2, seed=1, kv_heads=4)
    trained.save(tmp_path / "mha", AdapterConfig(base_model="tiny", exit_layer=2, fingerprint=bb.fingerprint(), kv_heads=4))
    loaded, cfg = Adapter.load(tmp_path / "mha", bb)
    assert cfg.kv_heads == 4 and loaded.kv_heads == 4
    for (name, a), (_, b) in zip(trained.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    with pytest.raises(KangarooError, match="divide"):
        Adapter(bb, 2, kv_heads=3)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_mlp_adapter(arch, tmp_path):
    """An adapter with a residual MLP (--adapter-mlp): add_mlp starts as the adapter it extends, the
    size survives save/load, and weights that do not match the config's MLP are refused."""
    bb = Backbone(tiny_model(arch, seed=4))
    plain = Adapter.random(bb, 2, seed=1)
    wider = plain.add_mlp(bb, 24)
    assert wider.mlp_hidden == 24 and wider.num_parameters() == plain.num_parameters() + 64 + 3 * 64 * 24
    h = torch.randn(1, 7, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(wider(h, bb, None, 0), plain(h, bb, None, 0), rtol=0, atol=0)
        wider.down.weight.normal_(std=0.1)
        assert not torch.allclose(wider(h, bb, None, 0), plain(h, bb, None, 0))
        widest = wider.add_mlp(bb, 40, seed=3)  # widening keeps the trained units and adds silent ones
        assert widest.mlp_hidden == 40 and widest.num_parameters() == wider.num_parameters() + 3 * 64 * 16
        torch.testing.assert_close(widest(h, bb, None, 0), wider(h, bb, None, 0), rtol=1e-6, atol=1e-6)
        assert torch.equal(widest.down.weight[:, :24], wider.down.weight) and not widest.down.weight[:, 24:].any()
    with pytest.raises(ValueError, match="widens"):
        widest.add_mlp(bb, 40)
    config = AdapterConfig(base_model="tiny", exit_layer=2, fingerprint=bb.fingerprint(), mlp_hidden=24)
    wider.save(tmp_path / "mlp", config)
    loaded, cfg = Adapter.load(tmp_path / "mlp", bb)
    assert cfg.mlp_hidden == 24 and loaded.mlp_hidden == 24
    for (name, a), (_, b) in zip(wider.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    plain.save(tmp_path / "lies", config)  # the config says MLP, the weights have none
    with pytest.raises(KangarooError, match="do not fit"):
        Adapter.load(tmp_path / "lies", bb)
    raw = json.loads((tmp_path / "mlp" / "adapter_config.json").read_text())
    (tmp_path / "mlp" / "adapter_config.json").write_text(json.dumps({**raw, "mlp_hidden": -3}))
    with pytest.raises(KangarooError, match="corrupt adapter config.*mlp_hidden"):
        Adapter.load(tmp_path / "mlp", bb)
