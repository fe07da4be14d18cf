"""Tiny random models of every supported architecture, built in-process (no download)."""

from __future__ import annotations

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")
NUM_LAYERS = 4
VOCAB = 96

_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=NUM_LAYERS,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    # wide weights give peaked next-token distributions, so float32 argmaxes are never near ties
    initializer_range=0.25,
    tie_word_embeddings=False,
    attn_implementation="sdpa",
)


def tiny_config(arch: str, **overrides):
    if arch == "llama":
        return LlamaConfig(**{**_COMMON, **overrides})
    if arch == "mistral":  # a short window so that long prompts exercise the sliding-window mask; heads of
        # 64 like SmolLM2's, so the decode-attention kernel's vector path runs here too (others: any-size path)
        return MistralConfig(**{**_COMMON, "sliding_window": 48, "head_dim": 64, **overrides})
    if arch == "qwen2":  # mixed layer types: the last 2 layers slide over a 48-token window
        return Qwen2Config(**{**_COMMON, "use_sliding_window": True, "sliding_window": 48, "max_window_layers": 2, **overrides})
    if arch == "qwen3":
        return Qwen3Config(**{**_COMMON, "head_dim": 16, **overrides})
    raise ValueError(arch)


_CLASSES = {"llama": LlamaForCausalLM, "mistral": MistralForCausalLM, "qwen2": Qwen2ForCausalLM, "qwen3": Qwen3ForCausalLM}


def tiny_model(arch: str, seed: int = 0, damp_from: int | None = None, **overrides):
    """A random float32 model in eval mode.

    ``damp_from=j`` scales the residual-branch outputs of layers ``j..`` by 0.05, so the deep layers
    barely change the exit-layer state: drafts from an adapter that passes its input through then
    agree with the target often, which exercises the all-accepted path.
    """
    torch.manual_seed(seed)
    model = _CLASSES[arch](tiny_config(arch, **overrides)).eval()
    if damp_from is not None:
        damp_deep_layers(model, damp_from)
    return model.requires_grad_(False)


def damp_deep_layers(model, start: int, factor: float = 0.05):
    """Scale the residual-branch outputs of layers ``start..`` so they barely change the hidden state."""
    with torch.no_grad():
        for layer in model.model.layers[start:]:
            layer.self_attn.o_proj.weight.mul_(factor)
            layer.mlp.down_proj.weight.mul_(factor)
    return model


def passthrough_adapter(adapter):
    """Zero the adapter's attention (and MLP) output: A(h) = norm(h), a good drafter for damped models."""
    with torch.no_grad():
        adapter.self_attn.o_proj.weight.zero_()
        if getattr(adapter, "mlp_hidden", 0):
            adapter.down.weight.zero_()
    return adapter


def hf_greedy(model, ids: torch.Tensor, max_new_tokens: int, eos_token_id=None) -> list[int]:
    """The reference: transformers' own greedy ``generate``."""
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=eos_token_id,
        pad_token_id=0,
    )
    return out[0, ids.shape[1] :].tolist()


def q4_layers(backbone) -> list[dict]:
    """Every layer's matrices quantised to Q4_1 as ggml does (rows of Q and K in the engine's RoPE-pair
    order, as a GGUF file stores them): what ``FusedEngine(..., "q4_1", q4_layers=...)`` runs for a
    model that did not come from a GGUF file."""
    from kangaroo.quantized import layer_matrices, quantize_q4_1

    return [{name: quantize_q4_1(m) for name, m in layer_matrices(backbone, i).items()}
            for i in range(backbone.num_layers)]
