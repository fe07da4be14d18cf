import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # tests/tiny.py


@pytest.fixture(autouse=True)
def _threads(request):
    """Tiny models run fastest on one thread; the real model gets all cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(before if request.node.get_closest_marker("slow") else 1)
    yield
    torch.set_num_threads(before)


def default_model_folder():
    """The cached safetensors copy of the default model, fetched if missing (scripts/setup.sh does it first)."""
    from kangaroo.loading import DEFAULT_MODEL, cache_dir, load_model

    folder = cache_dir() / "models" / DEFAULT_MODEL
    if not (folder / "tokenizer.json").is_file():
        load_model()
    return folder


@pytest.fixture(scope="session")
def tiny_chat_model_dir(tmp_path_factory):
    """A tiny random Llama (vocab 49152, hidden 64) saved with SmolLM2's real tokenizer and chat template."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder = default_model_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.25,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    out = tmp_path_factory.mktemp("tiny_chat_model")
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
