"""GGUF's Q4_1 weights as the step engine's ``q4_1`` products compute with them.

A Q4_1 file stores each run of 32 inputs of a weight row as 4-bit ``q`` (0..15), a float16 scale
``d`` and minimum ``m``: ``w = d q + m``. Loading a GGUF through transformers de-quantises these to
float32, and the ``bfloat16`` engine then rounds them again. The ``q4_1`` products instead read the
file's own blocks, a quarter of bfloat16's bytes, and compute ``d (sum x q) + m (sum x)`` per block
(``csrc/linear_q4.cpp``): exactly the distributed weights, and fewer bytes to stream per step.

ggml's block (20 bytes): ``d`` (f16), ``m`` (f16), then 16 bytes ``qs`` where input ``j`` of the block
is the low nibble of ``qs[j]`` and input ``j + 16`` the high nibble of ``qs[j]``.
"""

from __future__ import annotations

import numpy as np
import torch

#: ggml block of Q4_1: 32 inputs in 20 bytes
BLOCK, BLOCK_BYTES = 32, 20


def unpack_q4_1(raw: np.ndarray, rows: int, cols: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A Q4_1 tensor's bytes (``[rows, cols / 32 * 20]`` uint8, as GGUF stores it) as ``q``
    ``[rows, cols]`` uint8, ``d`` and ``m`` ``[rows, cols / 32]`` float16."""
    nb = cols // BLOCK
    blocks = np.ascontiguousarray(raw).reshape(rows, nb, BLOCK_BYTES)
    d = blocks[:, :, 0:2].copy().view(np.float16)[..., 0]
    m = blocks[:, :, 2:4].copy().view(np.float16)[..., 0]
    qs = blocks[:, :, 4:]  # [rows, nb, 16]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=2).reshape(rows, cols)
    return q, d, m


def quantize_q4_1(w: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ggml's Q4_1 quantisation of ``w`` ``[rows, cols]`` (cols a multiple of 32), for weights that
    do not come from a Q4_1 file (tests): ``q``, ``d``, ``m`` as :func:`unpack_q4_1` returns them."""
    rows, cols = w.shape
    x = w.detach().float().cpu().numpy().reshape(rows, cols // BLOCK, BLOCK)
    lo, hi = x.min(axis=2), x.max(axis=2)
    d = (hi - lo) / 15.0
    inv = np.where(d > 0, 1.0 / np.where(d > 0, d, 1.0), 0.0)
    q = np.clip(np.round((x - lo[..., None]) * inv[..., None]), 0, 15).astype(np.uint8).reshape(rows, cols)
    return q, d.astype(np.float16), lo.astype(np.float16)


def dequantize(q: np.ndarray, d: np.ndarray, m: np.ndarray) -> torch.Tensor:
    """``w = d q + m`` in float32, ``[rows, cols]``."""
    rows, cols = q.shape
    w = q.reshape(rows, -1, BLOCK).astype(np.float32) * d.astype(np.float32)[..., None] + m.astype(np.float32)[..., None]
    return torch.from_numpy(w.reshape(rows, cols))


def pack(q: np.ndarray, d: np.ndarray, m: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's layout (``csrc/linear_q4.cpp``): ``nibbles`` ``[N/16, K/32, 4, 32]`` int16 (word
    ``2o + s`` of chunk ``c`` holds input pair ``4c + k``'s ``q`` of output ``o`` in nibble ``k``) and
    ``scales`` ``[N/16, K/32, 2, 16]`` float16, for ``N`` a multiple of 16."""
    N, K = q.shape
    nb = K // BLOCK
    # q [N/16, 16 (o), nb, 4 (c), 4 (k), 2 (s)] -> [N/16, nb, c, o, s, k]
    parts = q.reshape(N // 16, 16, nb, 4, 4, 2).transpose(0, 2, 3, 1, 5, 4).astype(np.uint16)
    words = parts[..., 0] | (parts[..., 1] << 4) | (parts[..., 2] << 8) | (parts[..., 3] << 12)
    nibbles = words.reshape(N // 16, nb, 4, 32).view(np.int16)
    scales = np.stack([d.reshape(N // 16, 16, nb), m.reshape(N // 16, 16, nb)], axis=2)  # [N/16, 16, 2, nb]
    scales = scales.transpose(0, 3, 2, 1)  # [N/16, nb, 2, 16]
    return torch.from_numpy(np.ascontiguousarray(nibbles)), torch.from_numpy(np.ascontiguousarray(scales))


# ---------------------------------------------------------------------------- the file's blocks
#: GGUF tensor name of each fused-engine matrix of decoder layer i (llama.cpp's names)
GGUF_NAMES = {"q": "attn_q", "k": "attn_k", "v": "attn_v", "o": "attn_output",
              "gate": "ffn_gate", "up": "ffn_up", "down": "ffn_down"}


class Q4Linear:
    """``y = x Wᵀ (+ b)`` for ``W`` held as Q4_1 blocks, on the compiled ``linear_q4`` product:
    ``x`` ``[M, K]`` (any float dtype, cast to bfloat16) -> ``[M, N]`` bfloat16. Row-invariant by
    construction (``csrc/linear_q4.cpp``); N must be a multiple of 16 and K of 32."""

    kernel = "q4_1"
    dtype = torch.bfloat16

    def __init__(self, q: np.ndarray, d: np.ndarray, m: np.ndarray, bias: torch.Tensor | None = None) -> None:
        from . import attention as native

        module = native.load()
        if module is None or not module.linear_q4_available():
            raise ValueError("the q4_1 product needs a CPU with AVX512-BF16 (and the compiled module)")
        self.out_features, self.in_features = q.shape
        if self.out_features % 16 or self.in_features % BLOCK:
            raise ValueError(f"a Q4_1 product needs N % 16 == 0 and K % 32 == 0, got [{self.out_features} x {self.in_features}]")
        self.nibbles, self.scales = pack(q, d, m)
        self.bias = None if bias is None else bias.detach().float().contiguous()
        self.device = torch.device("cpu")
        self._product = native.linear_q4

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self._product(x.to(torch.bfloat16), self.nibbles, self.scales, self.bias)


def has_q4_1_layers(path: str | None) -> bool:
    """Whether the GGUF file at ``path`` stores every decoder-layer matrix the engine multiplies by in
    Q4_1 (tensor types only; :func:`gguf_layers` checks the values)."""
    if path is None:
        return False
    try:
        import gguf

        names = tuple(GGUF_NAMES.values())
        types = [t.tensor_type.name for t in gguf.GGUFReader(path).tensors
                 if t.name.startswith("blk.") and t.name.split(".")[2] in names]
    except Exception:  # an unreadable file: the kernel is simply not offered
        return False
    return bool(types) and all(t == "Q4_1" for t in types)


def gguf_layers(path: str, backbone) -> list[dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]]:
    """Every decoder layer's matrices as the GGUF file at ``path`` stores them in Q4_1: per layer,
    ``{name: (q, d, m)}`` for q, k, v, o, gate, up, down, rows in the fused engine's order (llama.cpp
    stores Q and K with each RoPE pair side by side, as the engine does).

    Raises ValueError, with the reason, unless every one of them is Q4_1 and de-quantises to exactly
    the weights ``backbone`` (the model loaded from that file) holds.
    """
    import gguf

    from .engine import _interleave_rope_rows

    reader = gguf.GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    layers = []
    for i in range(backbone.num_layers):
        w = backbone.layer_weights(i)
        a = w["attention"]
        expected = {"q": _interleave_rope_rows(a["q"], a["heads"], a["head_dim"]),
                    "k": _interleave_rope_rows(a["k"], a["kv_heads"], a["head_dim"]),
                    "v": a["v"], "o": a["o"], "gate": w["gate"], "up": w["up"], "down": w["down"]}
        if any(a[b] is not None for b in ("q_bias", "k_bias", "v_bias", "o_bias")) or a["q_norm"] is not None:
            raise ValueError("the Q4_1 product runs Llama-style layers (no attention biases or per-head norms)")
        blocks = {}
        for name, ref in expected.items():
            t = tensors.get(f"blk.{i}.{GGUF_NAMES[name]}.weight")
            if t is None:
                raise ValueError(f"{path} has no blk.{i}.{GGUF_NAMES[name]}.weight")
            if t.tensor_type.name != "Q4_1":
                raise ValueError(f"blk.{i}.{GGUF_NAMES[name]}.weight is {t.tensor_type.name}, not Q4_1")
            rows, cols = ref.shape
            q, d, m = unpack_q4_1(np.asarray(t.data), rows, cols)
            if not torch.equal(dequantize(q, d, m), ref.detach().float().cpu()):
                raise ValueError(f"blk.{i}.{GGUF_NAMES[name]}.weight does not de-quantise to the loaded model's weights")
            blocks[name] = (q, d, m)
        layers.append(blocks)
    return layers
