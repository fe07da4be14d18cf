"""``model.generate(custom_generate=kangaroo_generate)`` gives plain greedy output."""

import pytest
import torch
from tiny import VOCAB, hf_greedy, passthrough_adapter, tiny_model

from kangaroo.adapter import Adapter, AdapterConfig
from kangaroo.config import KangarooConfig
from kangaroo.errors import KangarooError
from kangaroo.hf_generate import kangaroo_generate
from kangaroo.model import Backbone


def test_custom_generate_equals_greedy(tmp_path):
    model = tiny_model("qwen2", seed=11, damp_from=2)
    bb = Backbone(model)
    adapter = passthrough_adapter(Adapter.random(bb, 2))
    adapter.save(tmp_path / "ad", AdapterConfig(base_model="tiny", exit_layer=2, fingerprint=bb.fingerprint()))
    ids = torch.randint(0, VOCAB, (1, 30), generator=torch.Generator().manual_seed(3))
    expected = hf_greedy(model, ids, 25)
    for ad in (adapter, str(tmp_path / "ad")):
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=25, do_sample=False, pad_token_id=0,
                             custom_generate=kangaroo_generate, kangaroo_adapter=ad,
                             kangaroo_config=KangarooConfig(max_steps=4, threshold=0.0))
        assert out[0, :30].tolist() == ids[0].tolist() and out[0, 30:].tolist() == expected
    eos = expected[10]
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=25, do_sample=False, pad_token_id=0, eos_token_id=eos,
                         custom_generate=kangaroo_generate, kangaroo_adapter=adapter)
    assert out[0, 30:].tolist() == hf_greedy(model, ids, 25, eos_token_id=eos)


def test_custom_generate_refuses_sampling_and_missing_adapter():
    model = tiny_model("llama", seed=12)
    ids = torch.randint(0, VOCAB, (1, 5))
    with pytest.raises(KangarooError, match="kangaroo_adapter"):
        model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0, custom_generate=kangaroo_generate)
    with pytest.raises(KangarooError, match="greedy"):
        model.generate(ids, max_new_tokens=3, do_sample=True, pad_token_id=0, custom_generate=kangaroo_generate,
                       kangaroo_adapter=Adapter.random(Backbone(model), 1))
