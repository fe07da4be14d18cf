import os
import sys
from pathlib import Path

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


# What the tiny tokenizer learns its merges from: English, code, numbers and some text in other
# scripts, so that it merges like a real byte-level BPE while emoji and rare characters still
# split over several byte tokens.
_CORPUS = [
    "the cat sat on a mat and then it ran to see what was there in the house of blue red green",
    "Hello there! How are you today? I am fine, thank you. Tell me a joke about kangaroos.",
    "Once upon a time there was a little kangaroo who could hop higher than any other animal.",
    "Write a short poem about the sea. Now make it rhyme. Translate German to English: Guten Morgen.",
    "Tom has 3 apples and buys 4 more. How many apples does he have? 1 2 3 4 5 6 7 8 9 10 100 2024",
    "def add(a: int, b: int) -> int:\n    return a + b  # numbers, names, (brackets) [lists] {dicts}",
    "Name three marsupials: the kangaroo, the koala and the wombat. You are terse and helpful.",
    "Count to ten. Why is the sky blue? The quick brown fox jumps over the lazy dog.",
    "naïve café, Straße, résumé. 你好，世界。日本語のテキスト。한국어 텍스트. Привет, мир!",
]
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TINY_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2, as in SmolLM2


def tiny_tokenizer(vocab_size: int = 640):
    """A byte-level BPE chat tokenizer built in-process (no download), laid out like SmolLM2's:
    ``<|im_start|>`` (bos, 1) and ``<|im_end|>`` (eos and pad, 2), a ChatML template.

    Byte-level, so any text round-trips and multi-byte characters can split over tokens. The BPE
    trainer breaks ties by the pair itself, so the merges are the same in every run.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=TINY_SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(_CORPUS * 4, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|im_end|>",
        unk_token="<|endoftext|>", chat_template=TINY_CHAT_TEMPLATE, clean_up_tokenization_spaces=False,
    )


@pytest.fixture(scope="session")
def tiny_chat_model_dir(tmp_path_factory):
    """A tiny random Llama (hidden 64) saved with the tiny in-process chat tokenizer (:func:`tiny_tokenizer`)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tiny_tokenizer()
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


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 4-layer random Llama with the tiny tokenizer; deep layers damped so early drafts often agree.

    Its embedding is padded past the tokenizer to 49,152 rows, as many real models' are (and as
    bench/costs.py's random token ids, drawn below 20,000, need)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         initializer_range=0.25, tie_word_embeddings=True)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # peaked, stable argmaxes; layers 2.. barely change the exit-layer state
        for layer in model.model.layers[2:]:
            layer.self_attn.o_proj.weight.mul_(0.05)
            layer.mlp.down_proj.weight.mul_(0.05)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    folder = tmp_path_factory.mktemp("tiny-smollm2")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
