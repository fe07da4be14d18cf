"""The step engine: the target's layer ranges, the adapter and the LM head as lean fused steps.

:class:`~kangaroo.model.Backbone` runs Hugging Face's own decoder-layer modules. That is the
reference, but on a CPU about half of a small model's step is per-op dispatch: some 6,000 ATen ops
per token for SmolLM2-135M (mul, add, transpose, cat, pow, view ...), around ``aten::mm`` calls that
themselves take the other half. :class:`FusedEngine` computes the same layers from the same weights
with about 15 ops per layer:

* one product for Q, K and V together and one for the MLP's gate and up projections, on the kernel
  and weight dtype chosen for this machine (:mod:`kangaroo.kernels`, made row-invariant there);
* RMSNorm (compiled with the attention kernel where it is loaded, else ``F.rms_norm``), one complex
  multiply for RoPE (the Q and K rows are
  permuted once so that each rotary pair sits side by side; attention scores are unchanged because
  queries and keys are permuted alike);
* for steps of up to :data:`~kangaroo.kernels.MAX_ROWS` tokens (every decoding step and verification),
  one call of the compiled decode-attention kernel per layer (:mod:`kangaroo.attention`), whose rows
  do not depend on each other bit for bit; without it, one SDPA call per row (the one-token step's
  call for that row). Prompts (more than ``MAX_ROWS`` rows, which no step re-computes) take the same
  module's flash-attention tiles (:func:`kangaroo.attention.prompt_attention`; else one causal SDPA
  call);
* RoPE tables computed once by HF's own rotary module, masks built once per call, keys and values
  written into the pre-allocated :class:`~kangaroo.kv_cache.KVCache` at their positions.

The residual stream, norms, attention and caches stay in float32; only the products take the
engine's weight dtype. Why not ``torch.compile``: on 2 CPU cores inductor took ~120 s to compile one
shape of the model (``docs/ENGINE.md``), and Kangaroo needs a step per row count for shallow layers,
deep layers, adapter and LM head; the fused eager step removes the same dispatch overhead with no
compile time at all.

Every step of a given token computes its logits bit for bit the same way whether it runs alone
(plain decoding) or among up to :data:`~kangaroo.kernels.MAX_ROWS` tokens (verification): the
products are row-invariant by construction, attention is row-invariant by construction (kernel) or
runs row by row (SDPA), and the remaining ops work row by row. :func:`kangaroo.attention.check`
proves the kernel on the machine at hand; the lossless tests prove it end to end.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

from . import attention as attn_kernel
from . import quantized
from .kernels import MAX_ROWS, QUANTIZED_KERNELS, Linear
from .kv_cache import KVCache
from .model import Backbone, attention_weights, norm_weights
from .screened_head import ScreenedHead
from .tree import TreeLayout

#: rows per decode-attention call: a prompt goes in blocks, so that the kernel's per-chunk partial
#: sums stay in cache (32, 64 and 128 measured alike); decoding steps have at most MAX_ROWS
PROMPT_BLOCK = 64

logger = logging.getLogger(__name__)


def _interleave_rope_rows(w: torch.Tensor | None, heads: int, head_dim: int) -> torch.Tensor | None:
    """Reorder each head's rows (or a per-head norm weight) from HF's half-split RoPE layout
    ``[x_0..x_{d/2-1}, y_0..y_{d/2-1}]`` to pairs ``[x_0, y_0, x_1, y_1, ...]``, so that RoPE becomes
    a complex multiply. ``w`` is ``[heads * head_dim, ...]`` or ``[head_dim]``."""
    if w is None:
        return None
    half = head_dim // 2
    order = torch.stack([torch.arange(half), torch.arange(half, head_dim)], dim=1).reshape(-1)  # [d]
    shaped = w.reshape(heads, head_dim, *w.shape[1:])
    return shaped[:, order.to(w.device)].reshape(w.shape)


@dataclass
class _Attention:
    """One attention block's weights, fused: ``qkv`` ``[(H + 2 H_kv) d, D]``, ``o`` ``[D, H d]``."""

    qkv: Linear | quantized.Q4Linear
    o: Linear | quantized.Q4Linear
    q_norm: tuple[torch.Tensor, float] | None
    k_norm: tuple[torch.Tensor, float] | None
    heads: int
    kv_heads: int
    head_dim: int
    scaling: float

    @classmethod
    def build(cls, w: dict, dtype: torch.dtype, kernel: str, q4: dict | None = None, int8: bool = False) -> "_Attention":
        """From HF's weights ``w`` (:func:`kangaroo.model.attention_weights`), or with the products over
        Q4_1 blocks ``q4`` (``{name: (q, d, m)}``, rows already in RoPE-pair order; ``int8``: on int8
        activations, :class:`~kangaroo.quantized.Q4Linear`)."""
        H, Hkv, d = w["heads"], w["kv_heads"], w["head_dim"]
        norms = [None if n is None else (_interleave_rope_rows(n[0].detach().float(), 1, d), n[1])
                 for n in (w["q_norm"], w["k_norm"])]
        if q4 is not None:
            if any(w[b] is not None for b in ("q_bias", "k_bias", "v_bias", "o_bias")):
                raise ValueError("the q4_1 kernel runs attention without biases")
            qkv = [np.concatenate(parts) for parts in zip(q4["q"], q4["k"], q4["v"])]
            return cls(quantized.Q4Linear(*qkv, int8=int8), quantized.Q4Linear(*q4["o"], int8=int8), norms[0], norms[1], H, Hkv, d,
                       w["scaling"])
        q = _interleave_rope_rows(w["q"].detach(), H, d)
        k = _interleave_rope_rows(w["k"].detach(), Hkv, d)
        weight = torch.cat([q, k, w["v"].detach()])
        biases = [w["q_bias"], w["k_bias"], w["v_bias"]]
        bias = None
        if any(b is not None for b in biases):
            parts = [b.detach() if b is not None else torch.zeros(n, dtype=weight.dtype, device=weight.device)
                     for b, n in zip(biases, (H * d, Hkv * d, Hkv * d))]
            bias = torch.cat([_interleave_rope_rows(parts[0], H, d), _interleave_rope_rows(parts[1], Hkv, d), parts[2]])
        o_bias = w["o_bias"].detach() if w["o_bias"] is not None else None
        return cls(Linear(weight, bias, dtype, kernel), Linear(w["o"].detach(), o_bias, dtype, kernel),
                   norms[0], norms[1], H, Hkv, d, w["scaling"])


@dataclass
class _Layer:
    input_norm: tuple[torch.Tensor, float]
    attention: _Attention
    post_norm: tuple[torch.Tensor, float]
    gate_up: Linear | quantized.Q4Linear  # [2 I, D]
    down: Linear | quantized.Q4Linear  # [D, I]
    window: int | None
    layer_type: str


def _norm(x: torch.Tensor, norm: tuple[torch.Tensor, float]) -> torch.Tensor:
    return F.rms_norm(x, (x.shape[-1],), norm[0], norm[1])


def _native_norm(x: torch.Tensor, norm: tuple[torch.Tensor, float]) -> torch.Tensor:
    """The compiled RMSNorm (:func:`kangaroo.attention.rms_norm`) of ``[T, D]`` rows."""
    return attn_kernel.rms_norm(x, norm[0], norm[1])


def _mlp(h: torch.Tensor, gate_up: Linear, down: Linear, fused: bool = False) -> torch.Tensor:
    """SiLU-gated MLP of normed rows ``h`` ``[T, D]`` with ``gate_up`` ``[2 I, D]`` (gate rows first):
    ``down(silu(gate) * up)``, ``[T, D]`` (a target layer's and the adapter's). ``fused``: the
    gating in one compiled call (:func:`kangaroo.attention.silu_mul`; the engine uses it on every path
    while the module is loaded, so all paths agree bit for bit)."""
    gu = gate_up(h)  # [T, 2I]
    if fused:
        return down(attn_kernel.silu_mul(gu))
    inner = gu.shape[-1] // 2
    return down(F.silu(gu[:, :inner]) * gu[:, inner:])


def _attend_rows(rows, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start: int, window: int | None,
                 scale: float) -> torch.Tensor:
    """Rows ``q`` ``[T, H, d]`` at positions ``start .. start+T-1``, each over its prefix up to itself
    (the last ``window`` keys for a sliding-window layer) in ``keys``/``values`` ``[H_kv, S, d]``,
    by ``rows`` (the decode-attention kernel or per-row SDPA), at most PROMPT_BLOCK rows a call.
    Returns ``[T, H, d]``."""
    T = q.shape[0]
    ends = list(range(start + 1, start + T + 1))
    begins = [0] * T if window is None else [max(0, e - window) for e in ends]
    parts = [rows(q[b:b + PROMPT_BLOCK], keys, values, begins[b:b + PROMPT_BLOCK], ends[b:b + PROMPT_BLOCK], scale)
             for b in range(0, T, PROMPT_BLOCK)]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


class FusedEngine:
    """The target as fused steps, with the :class:`~kangaroo.model.Backbone` interface the decoders use.

    Args:
        backbone: the target (its HF weights are read, never copied from source code).
        dtype: weight dtype of the products (``torch.float32`` or ``torch.bfloat16``; float16 on CUDA).
        kernel: product kernel (:data:`kangaroo.kernels.KERNELS`), or ``q4_1``: the decoder layers'
            products over the Q4_1 blocks of the GGUF file the model came from (or ``q4_layers``), the
            LM head and adapter on ``dpbf16`` (:mod:`kangaroo.quantized`); ``q4_1_int8``: the same
            blocks on int8 activations (llama.cpp's arithmetic) for steps and prompts alike.
        attention: how steps of up to :data:`~kangaroo.kernels.MAX_ROWS` rows attend over the cache:
            ``"kernel"`` (:mod:`kangaroo.attention`, all rows in one call, row-invariant by
            construction; CPU, must be loaded) or ``"sdpa"`` (one SDPA call per row).
        q4_layers: with ``q4_1`` or ``q4_1_int8``, each layer's ``{name: (q, d, m)}`` (tests quantise tiny models);
            None = read them from the model's GGUF file.
    """

    name = "fused"

    supports_trees = True  # per-row attention at each row's depth (kangaroo.tree)

    def __init__(self, backbone: Backbone, dtype: torch.dtype, kernel: str, attention: str = "sdpa",
                 q4_layers: list[dict] | None = None) -> None:
        self.backbone = backbone
        self.weight_dtype, self.kernel = dtype, kernel
        # the kernel of every product that is not a decoder layer's quantised matrix
        self.dense_kernel = "dpbf16" if kernel in QUANTIZED_KERNELS else kernel
        self.int8 = kernel == "q4_1_int8"  # every product of the layers on int8 activations
        if kernel in QUANTIZED_KERNELS:
            if dtype != torch.bfloat16:
                raise ValueError(f"the {kernel} kernel computes with bfloat16 activations")
            if q4_layers is None:
                if backbone.gguf_path is None:
                    raise ValueError(f"the {kernel} kernel reads a GGUF file's Q4_1 layers; this model was not loaded from one")
                q4_layers = quantized.gguf_layers(backbone.gguf_path, backbone)
        if attention not in ("kernel", "sdpa"):
            raise ValueError(f"attention must be 'kernel' or 'sdpa', got {attention!r}")
        if attention == "kernel" and attn_kernel.load() is None:
            raise ValueError(f"the decode-attention kernel is unavailable: {attn_kernel.status()['reason']}")
        self.attention = attention
        # prompts on the Q4_1 products: int8 activations (llama.cpp's numerics, faster where
        # measured so) or bfloat16 as steps; kangaroo.calibration sets it by measurement
        self.prompt_int8 = False
        self.prompt_tiles = "float32"  # how prompts' attention tiles compute (attention.PROMPT_TILES; set by calibration)
        self.amx_rows = 0  # q4_1_int8: steps of this many rows or more on AMX tiles (same bits; set by calibration)
        self.prompt_amx_rows = 0  # Q4_1 kernels: prompts of this many rows or more as a bfloat16 AMX GEMM (calibration)
        self.act_dtype = torch.float32
        # the KV cache's element type on the kernel attention: float32, or bfloat16 (half the bytes to
        # stream per step; chosen in kangaroo.calibration for bfloat16 engines)
        self.kv_dtype = torch.float32
        self.num_layers = backbone.num_layers
        self.config = backbone.config
        self.max_positions = backbone.max_positions
        with torch.no_grad():
            self.layers = [self._build_layer(backbone.layer_weights(i), None if q4_layers is None else q4_layers[i])
                           for i in range(self.num_layers)]
            self.final_norm_w = tuple_float(backbone.final_norm_weights())
            head = backbone.lm_head
            self.lm_head = Linear(head.weight, head.bias, dtype, self.dense_kernel)
            # greedy steps need only the head's argmax: int8 screen + exact recompute (None: full head)
            self.greedy_head = ScreenedHead.for_head(self.lm_head, head.weight)
            self.embed_weight = backbone.embed_tokens.weight.detach()
        self._stack = None  # the compiled layer loop, built at first use (:meth:`_build_stack`)
        self._rope: dict[str, torch.Tensor] = {}  # layer type -> complex [n, d/2] (cos + i sin)
        self._adapters: dict[int, tuple] = {}  # id(adapter) -> (adapter, its fused attention, norms, MLP or None)
        self._heads: dict[int, tuple] = {}  # id(adapter) -> (adapter, draft-vocabulary head)

    def _build_layer(self, w: dict, q4: dict | None = None) -> _Layer:
        if q4 is not None:
            gate_up = quantized.Q4Linear(*[np.concatenate(parts) for parts in zip(q4["gate"], q4["up"])], int8=self.int8)
            down = quantized.Q4Linear(*q4["down"], int8=self.int8)
        else:
            gate_up = Linear(torch.cat([w["gate"].detach(), w["up"].detach()]), None, self.weight_dtype, self.kernel)
            down = Linear(w["down"].detach(), None, self.weight_dtype, self.kernel)
        return _Layer(
            input_norm=tuple_float(w["input_norm"]),
            attention=_Attention.build(w["attention"], self.weight_dtype, self.kernel, q4, self.int8),
            post_norm=tuple_float(w["post_norm"]),
            gate_up=gate_up,
            down=down,
            window=w["window"],
            layer_type=w["layer_type"],
        )

    def _build_stack(self):
        """``(stack, rope types)``: the layers registered with the compiled layer loop
        (``csrc/layer_stack.cpp``, which runs a chain's or a tree's layer range in one call, 0.3–0.5 ms
        of Python a one-token step less), or ``(None, [])`` where a layer needs the Python loop (no
        fused ops, per-head norms, a product on another kernel)."""
        module = attn_kernel.load()
        if module is None or not hasattr(module, "LayerStack"):
            return None, []
        stack, types = module.LayerStack(), {}
        for layer in self.layers:
            if not self._stack_layer(stack, layer, types.setdefault(layer.layer_type, len(types))):
                return None, []
        self._kv_shapes = [(layer.attention.kv_heads, layer.attention.head_dim) for layer in self.layers]
        return stack, list(types)

    def _stack_layer(self, stack, layer: _Layer, rope: int) -> bool:
        """Register ``layer`` with the compiled ``stack`` (its RoPE rows ``rope``); False where it cannot
        take it (per-head norms, a product on another kernel)."""
        a = layer.attention
        specs = [p.native() for p in (a.qkv, a.o, layer.gate_up, layer.down)]
        if a.q_norm is not None or a.k_norm is not None or any(spec is None for spec in specs):
            return False
        stack.add_layer(*layer.input_norm, *layer.post_norm, [t for spec in specs for t in spec[:3]],
                        [spec[3] for spec in specs], a.heads, a.kv_heads, a.scaling, layer.window or 0, rope, self.int8)
        return True

    # ------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        return self.embed_weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.weight_dtype

    def describe(self) -> str:
        kv = "/bfloat16-kv" if self.kv_dtype == torch.bfloat16 and self.fused_ops else ""
        return f"fused/{self.kernel}/{str(self.weight_dtype).removeprefix('torch.')}/{self.attention}-attention{kv}"

    # ------------------------------------------------------------------ pieces
    def _act(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` in the activation dtype: itself when it is already (a no-op ``.to`` still costs ~1 µs,
        several times a round)."""
        return x if x.dtype is self.act_dtype else x.to(self.act_dtype)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``[1, T]`` ids -> ``[1, T, D]`` float32 embeddings."""
        return self._act(F.embedding(input_ids, self.embed_weight))

    @property
    def fused_ops(self) -> bool:
        """Whether layers run the compiled module's fused small ops (:mod:`kangaroo.attention`:
        RoPE, cache write and attention in one call, residual add + norm, SiLU gating): whenever
        the decode-attention kernel is in use, on every path alike."""
        return self.attention == "kernel"

    def prompt_reuse_key(self, prompt_len: int) -> tuple | None:
        """What a kept prompt's keys and values depend on, when a prompt of ``prompt_len`` tokens
        prefilled in two calls (a prefix, then the rest at its position, each of more than
        :data:`~kangaroo.kernels.MAX_ROWS` rows) gives every layer the bits one call gives it; None
        where it may not (:class:`~kangaroo.decoding.PromptCache` then prefills it all).

        Exact where each prompt row's arithmetic depends on that row and its prefix only: the
        compiled layers with row-invariant products (``dpbf16``, ``q4_1``, ``q4_1_int8``), the
        compiled prompt attention with float32 or bfloat16 tiles over keys from position 0 (no
        sliding window shorter than the prompt: a window moves a tile's first key with the tile),
        and no prompt GEMM on AMX tiles (its row count picks the path). Checked bit for bit in
        ``tests/test_prompt_cache.py``. The key holds the settings a prompt's arithmetic follows, so a
        cache written under other settings is never reused."""
        windows = [layer.window for layer in self.layers if layer.window]
        if not (self.attention == "kernel" and self.kernel in ("dpbf16", *QUANTIZED_KERNELS)
                and self.prompt_tiles in ("float32", "bfloat16") and self.prompt_amx_rows == 0
                and all(w >= prompt_len for w in windows)):
            return None
        return id(self), self.kv_dtype, self.prompt_tiles, self.prompt_int8, self.amx_rows

    @property
    def norm(self):
        """RMSNorm of ``[T, D]`` rows: compiled with the attention kernel (the same module), else F.rms_norm."""
        return _native_norm if self.attention == "kernel" else _norm

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.norm(self._act(hidden[0]), self.final_norm_w)[None]

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """The LM head alone, ``[1, T, D] -> [1, T, V]``."""
        return self.lm_head(x[0])[None]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm + LM head, ``[1, T, D] -> [1, T, V]`` float32."""
        return self.project(self.final_norm(hidden)).float()

    def greedy(self, hidden: torch.Tensor) -> torch.Tensor:
        """Greedy tokens ``[T]`` after last-layer states ``[1, T, D]``: ``logits(hidden)[0].argmax(-1)``,
        found by the screened head (:mod:`kangaroo.screened_head`) where it runs, reading it mostly
        as int8."""
        if self.greedy_head is None:
            return self.logits(hidden)[0].argmax(-1)
        return self.greedy_head(self.final_norm(hidden)[0])

    def draft_head(self, adapter):
        """``(head, vocab)``: the product drafting uses on adapter outputs ``[1, T, D] -> [1, T, V']``
        and the token ids of its rows (None: the whole LM head). An adapter with a draft vocabulary
        gets the LM head's rows for those tokens only."""
        vocab = getattr(adapter, "draft_vocab", None)
        if vocab is None:
            return self.project, None
        cached = self._heads.get(id(adapter))
        if cached is None or cached[0] is not adapter:
            head = self.backbone.lm_head
            with torch.no_grad():
                rows = self._draft_linear(head.weight[vocab], None if head.bias is None else head.bias[vocab])
            cached = self._heads[id(adapter)] = (adapter, rows)
        rows = cached[1]
        return (lambda x: rows(x[0])[None]), vocab

    def _draft_linear(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        """A product only drafting uses (adapter, draft head): drafts need no bit-exactness, so with
        the Q4_1 kernels it runs on Q4_1 blocks quantised here (a quarter of bfloat16's bytes; a
        drafted token then costs less next to the cheaper target step), else on the dense kernel."""
        N, K = weight.shape
        if self.kernel in QUANTIZED_KERNELS and bias is None and N % 16 == 0 and K % quantized.BLOCK == 0:
            return quantized.Q4Linear(*quantized.quantize_q4_1(weight), int8=self.int8)
        return Linear(weight, bias, self.weight_dtype, self.dense_kernel, check=False)

    def _draft_q4(self, w: dict) -> dict | None:
        """The adapter attention's Q4_1 blocks (see :meth:`_draft_linear`), or None where it runs dense."""
        if self.kernel not in QUANTIZED_KERNELS or any(w[b] is not None for b in ("q_bias", "k_bias", "v_bias", "o_bias")):
            return None
        mats = quantized.attention_matrices(w)
        if any(m.shape[1] % quantized.BLOCK for m in mats.values()) or sum(mats[n].shape[0] for n in "qkv") % 16 \
                or mats["o"].shape[0] % 16:
            return None
        return {name: quantized.quantize_q4_1(m) for name, m in mats.items()}

    def rope(self, pos: int, T: int, layer_type: str = "full_attention", depths: torch.Tensor | None = None) -> torch.Tensor:
        """RoPE as complex rotations for positions ``pos..pos+T-1`` (or ``pos + depths`` for a tree's
        rows): ``[T, 1, d/2]``."""
        table = self._rope.get(layer_type)
        top = pos + (T if depths is None else int(depths.max()) + 1)
        if table is None or table.shape[0] < top:
            n = max(top, 2 * (0 if table is None else table.shape[0]), 256)
            cos, sin = self.backbone.rope_table(n, layer_type)
            half = cos.shape[-1] // 2
            table = torch.complex(cos[:, :half], sin[:, :half])  # HF's table repeats each half
            self._rope[layer_type] = table
        return table[pos:pos + T, None] if depths is None else table[pos + depths, None]

    def step_rope(self, pos: int, T: int, layer_type: str = "full_attention", depths: torch.Tensor | None = None) -> torch.Tensor:
        """:meth:`rope` in the form :meth:`attend` takes: with the fused ops, its real view
        ``[T, 1, d/2, 2]`` (cos, sin) for the compiled RoPE; else the complex rotations."""
        rope = self.rope(pos, T, layer_type, depths)
        return torch.view_as_real(rope) if self.fused_ops else rope

    def mask(self, T: int, pos: int, window: int | None) -> torch.Tensor | None:
        """Boolean ``[T, pos + T]`` (True = attend), or None where SDPA needs none (one row, or a causal prompt at 0)."""
        S = pos + T
        if (T == 1 or pos == 0) and (window is None or S <= window):
            # a fresh prompt is plain causal: SDPA's is_causal skips the masked half of the
            # scores (a 772-token prompt's attention took half of its prefill with a mask)
            return None
        q_idx = torch.arange(pos, S, device=self.device)[:, None]
        kv_idx = torch.arange(S, device=self.device)[None]
        allowed = kv_idx <= q_idx
        if window is not None:
            allowed &= kv_idx > q_idx - window
        return allowed

    # ------------------------------------------------------------------ layers
    def run_layers(self, start: int, end: int, hidden: torch.Tensor, cache: KVCache | None, pos: int,
                   tree: TreeLayout | None = None, last: int | None = None) -> torch.Tensor:
        """Decoder layers ``[start, end)`` over ``hidden`` ``[1, T, D]`` at positions ``pos..pos+T-1``;
        every layer in the range holds ``pos`` cached positions and appends ``T``. Returns ``[1, T, D]``,
        or with ``last`` ``[1, last, D]``: the last layer's earlier rows then only write their keys and
        values, as in :meth:`adapter_forward` (a prompt's prefill needs only the next token; its
        attention, o-projection and MLP over the other rows were ~2.5% of a long prompt's time).

        With ``tree`` (a :class:`~kangaroo.tree.TreeLayout` of ``T`` rows, row 0 at ``pos``), row ``i``
        sits at ``pos + depth_i`` and attends over the prefix and its ancestors only; the rows' keys
        and values are kept in ``cache.stash`` for :meth:`KVCache.commit`."""
        if start >= end:
            return hidden if last is None else hidden[:, -last:]
        x = self._act(hidden[0])  # [T, D]
        T = x.shape[0]
        if tree is not None and (tree.rows != T or T > MAX_ROWS or last is not None):
            raise ValueError(f"a tree of {tree.rows} rows over {T} states (at most {MAX_ROWS} rows, all of them out)")
        if last is not None and not 1 <= last <= T:
            raise ValueError(f"last={last}: asks for rows out of {T}")
        first = 0 if last is None else T - last  # the last layer's first row out
        depths = None if tree is None or tree.is_chain else torch.tensor(tree.depths, device=self.device)
        module = attn_kernel.load() if T > MAX_ROWS else None
        if module is not None:  # a prompt: the module-wide switches follow this engine
            module.linear_q4_prompt_int8(self.prompt_int8)
            module.linear_q4_prompt_amx(self.prompt_amx_rows)
            attn_kernel.set_prompt_tiles(self.prompt_tiles)
        ropes, masks, norm = {}, {}, self.norm
        if self.fused_ops:
            # the compiled module's fused ops: the residual add and the next norm in one call, x
            # updated in place (a copy: the caller keeps ``hidden``), SiLU gating in one call
            x = x.clone().contiguous()
            if self._stack is None:
                self._stack = self._build_stack()
            stack, types = self._stack
            if cache is not None and stack is not None:
                # the layers in one compiled call: the loop below, op for op
                keys, values, starts = cache.slots_range(range(start, end), T, self._kv_shapes, x, self.kv_dtype)
                segments, stashes = ([], [], []), ([], [])
                if tree is not None:
                    segments = tuple(list(s) for s in zip(*tree.segments))
                    stashes = cache.new_stashes(range(start, end), self._kv_shapes, T, x.device, self.kv_dtype)
                stack.run(x, start, end, keys, values, starts, [self.step_rope(pos, T, t, depths) for t in types],
                          MAX_ROWS, *segments, *stashes, first)
                return (x[first:] if first else x)[None]
            h = norm(x, self.layers[start].input_norm)
            for i in range(start, end):
                layer = self.layers[i]
                f = first if i + 1 == end else 0
                if layer.layer_type not in ropes:
                    ropes[layer.layer_type] = self.step_rope(pos, T, layer.layer_type, depths)
                out = self.attend(layer.attention, h, cache, i, ropes[layer.layer_type], None, layer.window, tree=tree,
                                  first_out=f)
                x = x[f:]  # a view: the fused ops update the caller's rows in place
                h = attn_kernel.add_rms_norm(x, out, *layer.post_norm)
                out = _mlp(h, layer.gate_up, layer.down, fused=True)
                if i + 1 < end:
                    h = attn_kernel.add_rms_norm(x, out, *self.layers[i + 1].input_norm)
                else:
                    x.add_(out)
            return x[None]
        for i in range(start, end):
            layer = self.layers[i]
            f = first if i + 1 == end else 0
            if layer.layer_type not in ropes:
                ropes[layer.layer_type] = self.step_rope(pos, T, layer.layer_type, depths)
            if layer.window not in masks:  # only prompts longer than MAX_ROWS, without the kernel, attend in one masked call
                masks[layer.window] = self.mask(T, pos, layer.window) if T > MAX_ROWS and self.attention != "kernel" else None
            h = norm(x, layer.input_norm)
            x = x[f:] + self.attend(layer.attention, h, cache, i, ropes[layer.layer_type], masks[layer.window],
                                    layer.window, tree=tree, first_out=f)
            x = x + _mlp(norm(x, layer.post_norm), layer.gate_up, layer.down)
        return x[None] if last is None else x[None, -last:]

    def attend(self, a: _Attention, h: torch.Tensor, cache: KVCache | None, layer_idx: int, rope: torch.Tensor,
               mask: torch.Tensor | None, window: int | None = None, batched: bool = False,
               tree: TreeLayout | None = None, first_out: int = 0) -> torch.Tensor:
        """Attention block over normed states ``h`` ``[T, D]`` with ``rope`` from :meth:`step_rope`;
        returns the o-projection ``[T, D]``, or ``[T - first_out, D]``: with the fused ops, rows before
        ``first_out`` only write their keys and values (elsewhere all rows attend and are sliced).

        Steps of up to :data:`~kangaroo.kernels.MAX_ROWS` rows attend row-invariantly unless ``batched``
        (the adapter with SDPA, whose drafts need no bit-exactness); prompts take the kernel's
        flash-attention tiles where it is loaded, else one causal SDPA call.
        A ``tree``'s segments are written at their depth and each row attends over its own keys.
        """
        T, Hkv, d = h.shape[0], a.kv_heads, a.head_dim
        qkv = a.qkv(h)  # [T, (H + 2 H_kv) d], in the products' dtype
        if self.fused_ops and cache is not None and a.q_norm is None:
            # RoPE, the cache writes and attention in one compiled call (a tree's: segment by segment
            # at pos + depth, every row's keys and values kept in the stash for the commit)
            pos = cache.length(layer_idx)
            keys, values, _ = cache.slots(layer_idx, T, Hkv, d, h, self.kv_dtype)
            if tree is None:
                out = attn_kernel.rope_attend(qkv, rope, keys, values, pos, a.heads, Hkv, a.scaling, window or 0,
                                              first_out, MAX_ROWS)
                return a.o(out)
            key_stash, value_stash = cache.new_stash(layer_idx, Hkv, d, T, h.device, self.kv_dtype)
            out = attn_kernel.rope_attend_tree(qkv, rope, keys, values, pos, tree.segments, a.heads, Hkv, a.scaling,
                                               window or 0, key_stash, value_stash)
            return a.o(out)
        out = self._attend_unfused(a, qkv, cache, layer_idx, rope, mask, window, batched, tree)
        return out[first_out:] if first_out else out

    def _attend_unfused(self, a: _Attention, qkv: torch.Tensor, cache: KVCache | None, layer_idx: int, rope: torch.Tensor,
                        mask: torch.Tensor | None, window: int | None, batched: bool, tree: TreeLayout | None) -> torch.Tensor:
        """:meth:`attend` from the QKV product ``[T, (H + 2 H_kv) d]`` on, with torch ops around the
        compiled attention (Qwen3's per-head norms) or without the module; ``[T, D]``."""
        T, H, Hkv, d = qkv.shape[0], a.heads, a.kv_heads, a.head_dim
        fused = self.fused_ops
        qkv = self._act(qkv)
        qk = qkv[:, : (H + Hkv) * d].view(T, H + Hkv, d)
        v = qkv[:, (H + Hkv) * d:].view(T, Hkv, d)
        if a.q_norm is not None:  # Qwen3: RMSNorm per head before RoPE
            qk = torch.cat([_norm(qk[:, :H], a.q_norm), _norm(qk[:, H:], a.k_norm)], dim=1)
        if fused:
            qk = attn_kernel.rope(qk, rope)
        else:
            qk = torch.view_as_real(torch.view_as_complex(qk.reshape(T, H + Hkv, d // 2, 2)) * rope).view(T, H + Hkv, d)
        q_rows, k, v = qk[:, :H], qk[:, H:].transpose(0, 1)[None], v.transpose(0, 1)[None]  # [T, H, d], [1, H_kv, T, d] x2
        if fused and cache is not None:  # the cache's element type (rope_attend's rounding, for the per-head-norm path)
            k, v = k.to(self.kv_dtype), v.to(self.kv_dtype)
        rows = attn_kernel.decode_attention if self.attention == "kernel" else attn_kernel.sdpa_rows
        if tree is not None:
            return a.o(self._attend_tree(a, q_rows, k, v, cache, layer_idx, tree, window, rows))
        if cache is not None:
            k, v = cache.update(k, v, layer_idx)  # [1, H_kv, S, d]
            if not batched and (T <= MAX_ROWS or self.attention == "kernel"):
                # every step of up to MAX_ROWS rows, one-token steps included: each row over exactly
                # its own keys, with the bits it gets alone (the kernel by construction; SDPA one
                # call per row, the very call a one-token step makes). Prompts too where the kernel
                # is loaded, in flash tiles (prompt_attention), which beat SDPA's causal kernel here
                if T > MAX_ROWS and self.attention == "kernel":
                    out = attn_kernel.prompt_attention(q_rows, k[0], v[0], k.shape[2] - T, window or 0, a.scaling)
                    return a.o(out.view(T, H * d))
                return a.o(_attend_rows(rows, q_rows, k[0], v[0], k.shape[2] - T, window, a.scaling).view(T, H * d))
        out = F.scaled_dot_product_attention(q_rows.transpose(0, 1)[None], k, v, attn_mask=mask if T > 1 else None,
                                             scale=a.scaling, is_causal=mask is None and T > 1, enable_gqa=H != Hkv)
        return a.o(out[0].transpose(0, 1).reshape(T, H * d))

    def _attend_tree(self, a: _Attention, q_rows: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: KVCache,
                     layer_idx: int, tree: TreeLayout, window: int | None, rows) -> torch.Tensor:
        """Tree rows (``q_rows`` ``[T, H, d]``, new ``k``/``v`` ``[1, H_kv, T, d]``): each segment is
        written at ``pos + depth`` of its first row, so in depth-first order the slots before a row
        hold exactly its ancestors; the segment's rows then attend as a step's rows do (``rows``:
        the decode-attention kernel or per-row SDPA). Returns ``[T, H d]``."""
        T, pos = q_rows.shape[0], cache.length(layer_idx)
        cache.stash[layer_idx] = (k, v)
        out = []
        for first, stop, depth in tree.segments:
            keys, values = cache.write(k[:, :, first:stop], v[:, :, first:stop], layer_idx, pos + depth)
            out.append(_attend_rows(rows, q_rows[first:stop], keys[0], values[0], pos + depth, window, a.scaling))
        return torch.cat(out).view(T, -1)

    # ------------------------------------------------------------------ adapter
    def adapter_forward(self, adapter, hidden: torch.Tensor, cache: KVCache | None, pos: int,
                        last: int | None = None) -> torch.Tensor:
        """The Kangaroo adapter (RMSNorm -> attention -> residual [-> MLP -> residual] -> RMSNorm)
        over exit-layer states ``[1, T, D]`` at ``pos..``, on this engine's kernels. Returns ``[1, T, D]``,
        or its ``last`` rows only: every row's keys and values still enter the cache, but the earlier
        rows' outputs are not computed (a single attention layer: a row's output feeds nothing but
        the draft from that row, so drafting after a prompt needs only its last row; with the fused
        ops this skips the prompt's attention, ~10 ms for 800 tokens)."""
        if getattr(adapter, "stateless", False):  # EarlyExitHead: the model's final norm
            out = self.final_norm(hidden)
            return out if last is None else out[:, -last:]
        fused = self._adapters.get(id(adapter))
        if fused is None or fused[0] is not adapter:
            with torch.no_grad():
                w = attention_weights(adapter.self_attn)
                attn = _Attention.build(w, self.weight_dtype, self.dense_kernel, self._draft_q4(w), self.int8)
                norms = tuple_float(norm_weights(adapter.input_norm)), tuple_float(norm_weights(adapter.post_norm))
                mlp = None
                if getattr(adapter, "mlp_hidden", 0):  # (norm, [gate; up], down), as a target layer's MLP
                    mlp = (tuple_float(norm_weights(adapter.mlp_norm)), self._draft_linear(adapter.gate_up.weight),
                           self._draft_linear(adapter.down.weight))
            fused = self._adapters[id(adapter)] = (adapter, attn, norms, mlp, self._adapter_stack(attn, norms[0], mlp))
        _, attn, (n1, n2), mlp, stack = fused
        x = self._act(hidden[0])
        T, norm = x.shape[0], self.norm
        first = 0 if last is None else max(T - last, 0)
        if stack is not None and cache is not None and self.fused_ops:
            # with an MLP the adapter is a decoder layer (then the final norm): the compiled layer
            # loop runs it as it runs the target's, in one parallel region, with the bits of the ops
            # below and less dispatch (docs/ENGINE.md §2)
            x = x.clone().contiguous()
            keys, values, starts = cache.slots_range(range(1), T, [(attn.kv_heads, attn.head_dim)], x, self.kv_dtype)
            stack.run(x, 0, 1, keys, values, starts, [self.step_rope(pos, T)], MAX_ROWS, [], [], [], [], [], first)
            return norm(x[first:], n2)[None]
        # drafts need no bit-exactness: one batched SDPA call unless the kernel (faster) is loaded
        kernel = self.attention == "kernel"
        out = self.attend(attn, norm(x, n1), cache, 0, self.step_rope(pos, T), None if kernel else self.mask(T, pos, None),
                          batched=not kernel, first_out=first)
        x = x[first:] + out
        if mlp is not None:
            n3, gate_up, down = mlp
            x = x + _mlp(norm(x, n3), gate_up, down, fused=self.fused_ops)
        return norm(x, n2)[None]

    def _adapter_stack(self, attn: _Attention, n1: tuple, mlp: tuple | None):
        """The adapter as a one-layer compiled stack (input norm, attention, post norm = its MLP's
        norm, MLP), or None where the ops run it (no MLP, no fused ops, what :meth:`_stack_layer` refuses)."""
        module = attn_kernel.load() if self.fused_ops else None
        if module is None or not hasattr(module, "LayerStack") or mlp is None:
            return None
        n3, gate_up, down = mlp
        stack = module.LayerStack()
        layer = _Layer(n1, attn, n3, gate_up, down, window=None, layer_type="full_attention")
        return stack if self._stack_layer(stack, layer, rope=0) else None


def tuple_float(norm: tuple[torch.Tensor, float]) -> tuple[torch.Tensor, float]:
    """A norm ``(weight, eps)`` with its weight detached in float32 (the engine's activation dtype)."""
    return norm[0].detach().float(), norm[1]


#: what the decoders run on: HF's own modules (``Backbone``) or the fused steps
Engine = Backbone | FusedEngine
