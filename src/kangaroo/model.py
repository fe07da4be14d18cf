"""The target model cut into layer ranges: the only module that touches Hugging Face internals.

Kangaroo needs four pieces of a decoder LLM, each callable on its own:

* ``embed(ids)``: the token embedding;
* ``run_layers(start, end, hidden, cache, pos)``: decoder layers ``[start, end)`` over ``hidden`` at
  positions ``pos .. pos+T-1``, reading and writing their KV in ``cache``;
* ``final_norm(hidden)`` and ``lm_head(hidden)``: the model's own norm and output projection (the
  LM head is shared with the adapter, never copied).

So the self-draft model is ``embed -> run_layers(0, ℓ) -> adapter -> lm_head`` and verification is
``run_layers(ℓ, L) -> final_norm -> lm_head`` over exit-layer hidden states already computed while
drafting. We call HF's decoder-layer modules as they are (no forked modelling code); the only HF
details we depend on are gathered here: the attribute names of the decoder stack, the rotary
embedding call, the keyword the layers take the cache under, and the attention-mask format.
"""

from __future__ import annotations

import inspect
import logging
import os
import time
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn import functional as F

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


# Float32 matrix products with few rows on CPU. On the AMD EPYC machine this was measured on,
# torch 2.13's ``F.linear`` (MKL) is slow there, and slower for 2 or 3 rows than for 4: SmolLM2's
# [49152, 576] LM head on 2 cores takes 11 / 24 / 36 ms for 1 / 2 / 3 rows, ``W @ xᵀ`` with a
# contiguous ``x`` 3.7 / 5.3 / 6.6 ms (one row is doubled: the single-row path is the slow one); a
# whole 1-token forward of the model drops from ~61 to ~37 ms, a 2-token one from ~100 to ~48 ms.
# Same products in another summation order (logits differ by ~2e-6). MKL takes other paths on
# other CPUs (an Intel Xeon of the same class ran the stock LM head at 2.6 ms per row), so by default each
# Backbone times both on its own LM head once and keeps the faster (see small_rows_choice).
SMALL_ROWS = 8
_CHOICES: dict = {}


def small_rows_choice(weight: torch.Tensor) -> bool:
    """Whether to use :func:`rows_linear` for few float32 rows with this (LM-head) weight.

    ``KANGAROO_SMALL_ROWS=1`` / ``0`` forces it on / off; otherwise (``auto``) a float32 CPU weight
    is timed once per shape and thread count: ``F.linear`` against ``rows_linear`` on 1 and 2 rows,
    best of 3 after a warm-up, and the small-row product is kept if it is at least 10% faster.
    """
    setting = os.environ.get("KANGAROO_SMALL_ROWS", "auto").strip().lower() or "auto"
    if setting not in ("0", "1", "auto"):
        raise KangarooError(f"KANGAROO_SMALL_ROWS must be 0, 1 or auto, got {os.environ['KANGAROO_SMALL_ROWS']!r}")
    if setting != "auto":
        return setting == "1"
    if weight.device.type != "cpu" or weight.dtype != torch.float32 or weight.dim() != 2:
        return False
    key = (tuple(weight.shape), torch.get_num_threads())
    if key not in _CHOICES:
        x = torch.randn(2, weight.shape[1])

        def best(f) -> float:
            f()
            times = []
            for _ in range(3):
                t = time.perf_counter()
                f()
                times.append(time.perf_counter() - t)
            return min(times)

        with torch.no_grad():
            stock = best(lambda: (F.linear(x[:1], weight), F.linear(x, weight)))
            small = best(lambda: (rows_linear(x[:1], weight, None), rows_linear(x, weight, None)))
        _CHOICES[key] = small < 0.9 * stock
        logger.info("float32 products on 1+2 rows of a %s weight: F.linear %.1f ms, W @ xT %.1f ms -> %s",
                    list(weight.shape), stock * 1e3, small * 1e3, "W @ xT" if _CHOICES[key] else "F.linear")
    return _CHOICES[key]


def rows_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for ``x`` ``[..., D]`` with at most :data:`SMALL_ROWS` rows,
    as ``weight @ xᵀ`` (float32 CPU; see above). Returns ``[..., N]``, contiguous."""
    rows = x.numel() // x.shape[-1]
    flat = x.reshape(rows, x.shape[-1])
    flat = torch.cat([flat, flat]) if rows == 1 else flat.contiguous()
    y = (weight @ flat.t())[:, :rows].t().contiguous()  # [rows, N]
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], weight.shape[0])


def _small_rows_forward(module: nn.Linear):
    """A forward for ``module`` that takes :func:`rows_linear` for few float32 rows, else ``F.linear``."""

    def forward(x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and x.numel() <= SMALL_ROWS * x.shape[-1] and x.numel() and not torch.is_grad_enabled():
            return rows_linear(x, module.weight, module.bias)
        return F.linear(x, module.weight, module.bias)

    return forward


class Backbone:
    """A HF causal LM seen as ``embed``, layer ranges, ``final_norm`` and ``lm_head``.

    Args:
        model: a ``*ForCausalLM`` of a supported architecture, e.g. ``LlamaForCausalLM``.

    Raises:
        KangarooError: for an unsupported architecture or attention implementation.
    """

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
        # the small-row product (see rows_linear), if it is the faster one here; plain nn.Linear only
        self._small_rows = type(self.lm_head) is nn.Linear and small_rows_choice(self.lm_head.weight)
        self._fast_linears = [[(m, _small_rows_forward(m)) for m in layer.modules() if type(m) is nn.Linear]
                              for layer in self.layers]  # per layer: (module, its small-row forward)

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

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """The LM head alone, ``[B, T, D] -> [B, T, V]`` in the model's dtype (few float32 rows on
        CPU take :func:`rows_linear`)."""
        head = self.lm_head
        if self._takes_small_rows(x) and head.weight.dtype == torch.float32:
            return rows_linear(x, head.weight, head.bias)
        return head(x)

    def _takes_small_rows(self, x: torch.Tensor) -> bool:
        """Whether ``x`` ``[B, T, D]`` goes through :func:`rows_linear` (chosen for this machine,
        float32 on CPU, 1..8 rows, no gradient)."""
        return (self._small_rows and x.device.type == "cpu" and x.dtype == torch.float32
                and 0 < x.shape[0] * x.shape[1] <= SMALL_ROWS and not torch.is_grad_enabled())

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

    def run_layers(self, start: int, end: int, hidden: torch.Tensor, cache, pos: int) -> torch.Tensor:
        """Decoder layers ``[start, end)`` over ``hidden`` ``[B, T, D]`` at positions ``pos .. pos+T-1``.

        Every layer in the range must hold exactly ``pos`` cached positions; each appends ``T``.
        Returns the hidden states after layer ``end - 1``, ``[B, T, D]``.
        """
        if start >= end:
            return hidden
        if self._takes_small_rows(hidden):
            with self.small_row_linears(start, end):
                return self._run_layers(start, end, hidden, cache, pos)
        return self._run_layers(start, end, hidden, cache, pos)

    @contextmanager
    def small_row_linears(self, start: int, end: int):
        """Give layers ``[start, end)``'s ``nn.Linear`` modules the small-row forward, for this call
        only (an instance attribute that shadows ``nn.Linear.forward``; removed on exit)."""
        mods = [(m, f) for i in range(start, end) for m, f in self._fast_linears[i] if "forward" not in m.__dict__]
        for m, f in mods:
            m.forward = f
        try:
            yield
        finally:
            for m, _ in mods:
                del m.forward

    def _run_layers(self, start: int, end: int, hidden: torch.Tensor, cache, pos: int) -> torch.Tensor:
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

    # ------------------------------------------------------------------ identity
    def attention_module(self, layer: int = 0) -> nn.Module:
        """The HF attention module of ``layer`` (the adapter builds one of the same class)."""
        return self.layers[layer].self_attn

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
