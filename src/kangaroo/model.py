"""The target model cut into layer ranges: the only module that touches Hugging Face internals.

Kangaroo needs four pieces of a decoder LLM, each callable on its own:

* ``embed(ids)``: the token embedding;
* ``run_layers(start, end, hidden, cache, pos)``: decoder layers ``[start, end)`` over ``hidden`` at
  positions ``pos .. pos+T-1``, reading and writing their KV in ``cache`` (``last=1``: only the last
  row's output is needed, as after a prompt; the adapter's ``adapter_forward`` takes the same);
* ``final_norm(hidden)`` and ``lm_head(hidden)``: the model's own norm and output projection (the
  LM head is shared with the adapter, never copied).

So the self-draft model is ``embed -> run_layers(0, ℓ) -> adapter -> lm_head`` and verification is
``run_layers(ℓ, L) -> final_norm -> lm_head`` over exit-layer hidden states already computed while
drafting. We call HF's decoder-layer modules as they are (no forked modelling code); the only HF
details we depend on are gathered here: the attribute names of the decoder stack, the rotary
embedding call, the keyword the layers take the cache under, and the attention-mask format.
"""

from __future__ import annotations

import copy
import inspect
import logging

import torch
from torch import nn

from .errors import KangarooError

logger = logging.getLogger(__name__)

#: ``config.model_type`` values whose decoder layers we drive and test (tests/test_lossless.py).
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
#: attention implementations whose mask format we build (bool for SDPA, additive float for eager).
SUPPORTED_ATTENTION = ("sdpa", "eager")


def _cache_keyword(layer: nn.Module) -> str:
    """The keyword a decoder layer takes its cache under (``cache`` since transformers 5.2x, else ``past_key_values``)."""
    params = inspect.signature(layer.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


_WARMED = False


def warm_vector_math() -> None:
    """Call torch's vectorised math functions once on one thread, before any multi-threaded call.

    oneMKL resolves each VML function's kernel on its first call, and concurrent first calls from
    torch's worker threads can run a low-accuracy kernel on one thread's share (pytorch/pytorch#188792;
    fixed upstream the same way, by a warm-up call). Here torch 2.13's first 2-thread ``Tensor.cos``
    came out wrong in 13 of 100 fresh processes (errors up to 1.5e-4), and in 0 of 100 after one
    single-threaded call (Intel machine, 2026-12-06, docs/ENGINE.md §4). HF's rotary embedding (the
    eager engine computes it every forward, the fused engine once per table) and HF's norms go
    through these functions, so a wrong first call changed greedy texts."""
    global _WARMED
    if _WARMED:
        return
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        x = torch.linspace(-300.0, 300.0, 4096)
        for fn in (torch.cos, torch.sin, torch.exp, torch.tanh, torch.sigmoid, torch.nn.functional.silu,
                   torch.erf, lambda t: torch.log(t.abs() + 1), lambda t: torch.sqrt(t.abs()),
                   lambda t: torch.rsqrt(t.abs() + 1)):
            fn(x)
            fn(x.double())
        torch.softmax(x.view(64, 64), dim=-1)
    finally:
        torch.set_num_threads(threads)
    _WARMED = True


class Backbone:
    """A HF causal LM seen as ``embed``, layer ranges, ``final_norm`` and ``lm_head``: the eager
    engine, running HF's own modules (the reference the fused engine is tested against).

    Args:
        model: a ``*ForCausalLM`` of a supported architecture, e.g. ``LlamaForCausalLM``.

    Raises:
        KangarooError: for an unsupported architecture or attention implementation.
    """

    name = "eager"

    def __init__(self, model: nn.Module) -> None:
        config = model.config
        model_type = getattr(config, "model_type", type(model).__name__)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise KangarooError(
                f"unsupported architecture '{model_type}': kangaroo supports {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        attn = getattr(config, "_attn_implementation", None) or "eager"
        if attn not in SUPPORTED_ATTENTION:
            raise KangarooError(
                f"unsupported attention implementation '{attn}': load the model with attn_implementation='sdpa' or 'eager'"
            )
        self.model = model
        self.config = config
        self.model_type = model_type
        self.attn_implementation = attn
        decoder = model.get_decoder()
        self.layers: nn.ModuleList = decoder.layers
        self.embed_tokens: nn.Module = model.get_input_embeddings()
        self.norm: nn.Module = decoder.norm
        self.rotary_emb: nn.Module = decoder.rotary_emb
        self.lm_head: nn.Module = model.get_output_embeddings()
        self.num_layers = len(self.layers)
        self.layer_types = list(getattr(config, "layer_types", None) or ["full_attention"] * self.num_layers)
        # Mistral-style configs give one window for all layers; Qwen-style ones mark sliding layers by type.
        window = getattr(config, "sliding_window", None)
        use_window = getattr(config, "use_sliding_window", True)
        self.windows = [
            window if window and use_window and (model_type == "mistral" or t == "sliding_attention") else None
            for t in self.layer_types
        ]
        self._cache_kw = _cache_keyword(self.layers[0])
        self._rotary_takes_layer_type = "layer_type" in inspect.signature(self.rotary_emb.forward).parameters
        if self.device.type == "cpu":
            warm_vector_math()

    # ------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    @property
    def max_positions(self) -> int | None:
        return getattr(self.config, "max_position_embeddings", None)

    # ------------------------------------------------------------------ pieces
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``[B, T]`` token ids -> ``[B, T, D]`` embeddings."""
        return self.embed_tokens(input_ids)

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        """The model's final norm, ``[B, T, D] -> [B, T, D]``."""
        return self.norm(hidden)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm + LM head over last-layer states: ``[B, T, D] -> [B, T, V]`` (float32)."""
        return self.project(self.norm(hidden)).float()

    def greedy(self, hidden: torch.Tensor) -> torch.Tensor:
        """Greedy tokens ``[T]`` after last-layer states ``[1, T, D]``: the argmax of :meth:`logits`."""
        return self.logits(hidden)[0].argmax(-1)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """The LM head alone, ``[B, T, D] -> [B, T, V]`` in the model's dtype."""
        return self.lm_head(x)

    def draft_head(self, adapter: nn.Module):
        """``(head, vocab)``: the LM head, or its rows for the adapter's draft vocabulary (see
        :meth:`kangaroo.engine.FusedEngine.draft_head`)."""
        vocab = getattr(adapter, "draft_vocab", None)
        if vocab is None:
            return self.project, None
        weight = self.lm_head.weight[vocab].detach()
        bias = None if self.lm_head.bias is None else self.lm_head.bias[vocab].detach()
        return (lambda x: nn.functional.linear(x, weight, bias)), vocab

    def adapter_forward(self, adapter: nn.Module, hidden: torch.Tensor, cache, pos: int, last: int | None = None) -> torch.Tensor:
        """The adapter's own (HF-module) forward over exit-layer states ``[B, T, D]`` at ``pos..``
        (``[B, last, D]``: its last rows only, as :meth:`FusedEngine.adapter_forward`)."""
        out = adapter(hidden, self, cache, pos)
        return out if last is None else out[:, -last:]

    def describe(self) -> str:
        return f"eager/{str(self.dtype).removeprefix('torch.')}"

    def position_embeddings(self, hidden: torch.Tensor, pos: int, layer_type: str = "full_attention"):
        """RoPE ``(cos, sin)`` for positions ``pos .. pos+T-1`` of ``hidden`` ``[B, T, D]``."""
        positions = torch.arange(pos, pos + hidden.shape[1], device=hidden.device).unsqueeze(0)
        if self._rotary_takes_layer_type:
            return self.rotary_emb(hidden, positions, layer_type)
        return self.rotary_emb(hidden, positions)

    def attention_mask(self, q_len: int, pos: int, window: int | None, dtype: torch.dtype, device) -> torch.Tensor | None:
        """Causal mask for ``q_len`` queries at positions ``pos..`` over ``pos + q_len`` keys.

        Returns ``None`` when every query may see every key (one query, no window cut, or a
        fresh prefill where SDPA's own ``is_causal`` is exact); else ``[1, 1, q_len, pos + q_len]``,
        boolean (True = attend) for SDPA or additive float for eager attention.
        """
        kv_len = pos + q_len
        if window is None or kv_len <= window:
            if q_len == 1 or (pos == 0 and self.attn_implementation == "sdpa"):
                return None
        q_idx = torch.arange(pos, kv_len, device=device).unsqueeze(1)  # [q, 1]
        kv_idx = torch.arange(kv_len, device=device).unsqueeze(0)  # [1, kv]
        allowed = kv_idx <= q_idx
        if window is not None:
            allowed &= kv_idx > q_idx - window
        allowed = allowed[None, None]
        if self.attn_implementation == "sdpa":
            return allowed
        return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)

    #: token trees need the step engine's per-row attention (kangaroo.tree); HF's modules attend in one call
    supports_trees = False

    def prompt_reuse_key(self, prompt_len: int) -> None:
        """None: HF's modules compute a prompt in shapes that depend on its length, so a kept prefix
        could differ in its bits (see :meth:`~kangaroo.engine.FusedEngine.prompt_reuse_key`)."""
        return None

    def run_layers(self, start: int, end: int, hidden: torch.Tensor, cache, pos: int, tree=None,
                   last: int | None = None) -> torch.Tensor:
        """Decoder layers ``[start, end)`` over ``hidden`` ``[B, T, D]`` at positions ``pos .. pos+T-1``.

        Every layer in the range must hold exactly ``pos`` cached positions; each appends ``T``.
        Returns the hidden states after layer ``end - 1``, ``[B, T, D]`` (``last``: ``[B, last, D]``,
        sliced here: HF's layers compute every row). ``tree`` must be None or a chain.
        """
        if tree is not None and not tree.is_chain:
            raise ValueError("the eager engine verifies chains only; token trees need the fused engine")
        if start >= end or last is not None:
            out = hidden if start >= end else self.run_layers(start, end, hidden, cache, pos, tree)
            return out if last is None else out[:, -last:]
        rope = {}
        masks = {}
        for i in range(start, end):
            layer_type, window = self.layer_types[i], self.windows[i]
            if layer_type not in rope:
                rope[layer_type] = self.position_embeddings(hidden, pos, layer_type)
            if window not in masks:
                masks[window] = self.attention_mask(hidden.shape[1], pos, window, hidden.dtype, hidden.device)
            hidden = self.layers[i](
                hidden,
                attention_mask=masks[window],
                position_embeddings=rope[layer_type],
                use_cache=True,
                **{self._cache_kw: cache},
            )
            if isinstance(hidden, tuple):  # transformers releases whose layers return (hidden, ...)
                hidden = hidden[0]
        return hidden

    # ------------------------------------------------------------------ weights for the step engine
    def layer_weights(self, i: int) -> dict:
        """Decoder layer ``i`` as plain tensors (no copies): norms, attention and the gated MLP.

        Keys: ``input_norm``/``post_norm`` (weight, eps), ``attention`` (see :func:`attention_weights`),
        ``gate``/``up``/``down`` weights, ``window`` (sliding window or None), ``layer_type``.
        """
        layer = self.layers[i]
        mlp = layer.mlp
        act = getattr(self.config, "hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise KangarooError(f"the fused engine supports SiLU-gated MLPs, this model uses {act!r}: use --engine eager")
        if any(getattr(m, "bias", None) is not None for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj)):
            raise KangarooError("the fused engine does not support MLP biases: use --engine eager")
        return {
            "input_norm": norm_weights(layer.input_layernorm),
            "post_norm": norm_weights(layer.post_attention_layernorm),
            "attention": attention_weights(layer.self_attn),
            "gate": mlp.gate_proj.weight, "up": mlp.up_proj.weight, "down": mlp.down_proj.weight,
            "window": self.windows[i],
            "layer_type": self.layer_types[i],
        }

    @property
    def gguf_path(self) -> str | None:
        """The GGUF file the model was loaded from (:mod:`kangaroo.loading` records it), else None."""
        return getattr(self.model, "kangaroo_gguf", None)

    def final_norm_weights(self) -> tuple[torch.Tensor, float]:
        return norm_weights(self.norm)

    def rope_table(self, n: int, layer_type: str = "full_attention") -> tuple[torch.Tensor, torch.Tensor]:
        """HF's own RoPE ``(cos, sin)`` for positions ``0..n-1``, each ``[n, head_dim]`` float32.

        The same values in every process and at every size: ``__init__`` has made torch's first
        ``cos``/``sin`` calls single-threaded (:func:`warm_vector_math`), whose first multi-threaded
        call could return half a table wrong and so change greedy texts (``docs/ENGINE.md`` §4)."""
        probe = torch.zeros(1, n, 1, device=self.device, dtype=torch.float32)
        positions = torch.arange(n, device=self.device).unsqueeze(0)
        args = (probe, positions, layer_type) if self._rotary_takes_layer_type else (probe, positions)
        with torch.no_grad():
            cos, sin = self.rotary_emb(*args)
        return cos[0].float(), sin[0].float()

    # ------------------------------------------------------------------ identity
    def attention_module(self, layer: int = 0) -> nn.Module:
        """The HF attention module of ``layer`` (the adapter builds one of the same class)."""
        return self.layers[layer].self_attn

    def new_attention(self, kv_heads: int | None = None) -> nn.Module:
        """A fresh attention module of the target's own class and head layout (full attention, no
        sliding window; ``kv_heads`` key/value heads if given), for the adapter."""
        config = copy.copy(self.config)
        if getattr(config, "layer_types", None) is not None:
            config.layer_types = ["full_attention"] * len(config.layer_types)
        if kv_heads is not None:
            config.num_key_value_heads = kv_heads
        return type(self.attention_module(0))(config, layer_idx=0)

    def new_norm(self) -> nn.Module:
        """A fresh RMSNorm of the target's class over its hidden size, with its epsilon."""
        return self.norm_class()(self.config.hidden_size, eps=getattr(self.config, "rms_norm_eps", 1e-6))

    def cache_kwargs(self, cache) -> dict:
        """The keyword argument that hands ``cache`` to an HF attention module or decoder layer."""
        return {} if cache is None else {self._cache_kw: cache}

    def norm_class(self) -> type[nn.Module]:
        """The model's RMSNorm class (the adapter builds its norms from it)."""
        return type(self.norm)

    def fingerprint(self) -> dict:
        """What identifies this model for an adapter: architecture numbers and an embedding probe.

        The probe is 16 fixed embedding entries as floats, compared with a tolerance so that the
        same weights loaded in another dtype still match.
        """
        c = self.config
        weight = self.embed_tokens.weight
        idx = torch.linspace(0, weight.numel() - 1, 16, dtype=torch.float64).long()  # float32 rounds 28,311,551 up: out of range
        probe = weight.detach().reshape(-1)[idx.to(weight.device)].float().cpu().tolist()
        return {
            "model_type": self.model_type,
            "num_hidden_layers": self.num_layers,
            "hidden_size": c.hidden_size,
            "num_attention_heads": c.num_attention_heads,
            "num_key_value_heads": getattr(c, "num_key_value_heads", c.num_attention_heads),
            "vocab_size": c.vocab_size,
            "embedding_probe": probe,
        }


def norm_weights(norm: nn.Module) -> tuple[torch.Tensor, float]:
    """An HF RMSNorm as ``(weight [D], eps)``."""
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))
    return norm.weight, float(eps)


def attention_weights(attn: nn.Module) -> dict:
    """An HF attention module (the target's or the adapter's) as plain tensors.

    Keys: ``q``/``k``/``v``/``o`` weights and ``q_bias``/``k_bias``/``v_bias`` (None when absent),
    ``q_norm``/``k_norm`` (Qwen3's per-head norms, else None), ``heads``, ``kv_heads``, ``head_dim``,
    ``scaling``.
    """
    head_dim = attn.head_dim
    return {
        "q": attn.q_proj.weight, "k": attn.k_proj.weight, "v": attn.v_proj.weight, "o": attn.o_proj.weight,
        "q_bias": attn.q_proj.bias, "k_bias": attn.k_proj.bias, "v_bias": attn.v_proj.bias, "o_bias": attn.o_proj.bias,
        "q_norm": norm_weights(attn.q_norm) if hasattr(attn, "q_norm") else None,
        "k_norm": norm_weights(attn.k_norm) if hasattr(attn, "k_norm") else None,
        "heads": attn.q_proj.out_features // head_dim,
        "kv_heads": attn.k_proj.out_features // head_dim,
        "head_dim": head_dim,
        "scaling": float(attn.scaling),
    }


# ---------------------------------------------------------------------- HF internals used elsewhere
def new_forward_cache(model: nn.Module) -> tuple[str, object]:
    """``(keyword, cache)``: an empty ``DynamicCache`` for ``model``'s own batched forward and the
    keyword that forward takes it under (``cache`` since transformers 5.2x; ``past_key_values``
    still works there, with a warning, and is the only one before)."""
    from transformers import DynamicCache

    return _cache_keyword(model), DynamicCache()


def keep_cache_rows(cache, rows: torch.Tensor) -> None:
    """Keep only batch rows ``rows`` (``[B']`` indices) of a ``DynamicCache``, in place."""
    cache.batch_select_indices(rows)


def strip_quantization_markers(model: nn.Module) -> None:
    """Make a de-quantised GGUF-loaded model look like an ordinary float model.

    transformers marks a GGUF-loaded model as quantized (``hf_quantizer``, ``is_quantized``,
    ``quantization_method``, ``config.quantization_config``) and then refuses ``save_pretrained``
    ("quantized with gguf and is not serializable") even though the weights are plain tensors. When
    ``GgufConfig(dequantize=True)`` was honoured these are already gone; this handles the rest.
    Raises ``RuntimeError`` if any weight is still packed.
    """
    from transformers import PreTrainedModel

    packed = sorted({type(m).__name__ for m in model.modules() if "gguf" in type(m).__name__.lower()})
    if packed:
        raise RuntimeError(f"GGUF weights were left packed ({', '.join(packed)}); cannot convert to float")
    for name in ("hf_quantizer", "quantization_method", "_weight_conversions"):
        if name in vars(model):
            delattr(model, name)
    if getattr(model, "hf_quantizer", None) is not None:  # class-level or property: overwrite
        model.hf_quantizer = None
    if getattr(model, "is_quantized", False):
        model.is_quantized = False
    for sub in model.modules():
        config = getattr(sub, "config", None)
        if isinstance(sub, PreTrainedModel) and config is not None:
            if hasattr(config, "quantization_config"):
                delattr(config, "quantization_config")
            if getattr(config, "_is_quantized", False):
                config._is_quantized = False


class record_candidates:
    """Count the tokens transformers' assisted generation proposes per round, on one model object.

    ``with record_candidates(model) as drafted: model.generate(..., prompt_lookup_num_tokens=k)``
    fills ``drafted`` with one count per round. It wraps this model instance's
    ``_get_candidate_generator`` (a private transformers method) and the ``get_candidates`` of the
    generator it returns, as instance attributes removed on exit: no class is patched, so other
    models and threads are unaffected.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.drafted: list[int] = []

    def __enter__(self) -> list[int]:
        original = type(self.model)._get_candidate_generator
        drafted = self.drafted

        def get_candidate_generator(*args, **kwargs):
            generator = original(self.model, *args, **kwargs)
            propose = generator.get_candidates

            def get_candidates(input_ids, *a, **k):
                out = propose(input_ids, *a, **k)
                drafted.append(int(out[0].shape[-1] - input_ids.shape[-1]))
                return out

            generator.get_candidates = get_candidates
            return generator

        self.model._get_candidate_generator = get_candidate_generator
        return drafted

    def __exit__(self, *exc) -> None:
        self.model.__dict__.pop("_get_candidate_generator", None)
