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
    construction (``csrc/linear_q4.cpp``); N must be a multiple of 16 and K of 32. With ``int8``
    (the ``q4_1_int8`` kernel) every call computes llama.cpp's Q8_1 x Q4_1 product (int8 activations,
    exact int32 block sums), on AMX tiles from :func:`choose_amx_rows` rows on, with the same bits."""

    dtype = torch.bfloat16

    def __init__(self, q: np.ndarray, d: np.ndarray, m: np.ndarray, bias: torch.Tensor | None = None,
                 int8: bool = False) -> None:
        from . import attention as native

        module = native.load()
        if module is None or not module.linear_q4_available():
            raise ValueError("the q4_1 product needs a CPU with AVX512-BF16 (and the compiled module)")
        if int8 and not module.linear_q4_int8_available():
            raise ValueError("the q4_1_int8 product needs a CPU with AVX512-VNNI (and the compiled module)")
        self.int8 = int8
        self.kernel = "q4_1_int8" if int8 else "q4_1"
        self.out_features, self.in_features = q.shape
        if self.out_features % 16 or self.in_features % BLOCK:
            raise ValueError(f"a Q4_1 product needs N % 16 == 0 and K % 32 == 0, got [{self.out_features} x {self.in_features}]")
        self.nibbles, self.scales = pack(q, d, m)
        self.bias = None if bias is None else bias.detach().float().contiguous()
        self.device = torch.device("cpu")
        self._product = native.linear_q4

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``[M, K] -> [M, N]``; prompts (M > ``kernels.MAX_ROWS``) as the module's prompt setting says
        (:func:`choose_prompt_product`; the engine sets it before each prompt)."""
        return self._product(x.to(torch.bfloat16), self.nibbles, self.scales, self.bias, self.int8)

    def native(self) -> tuple:
        """This product as the compiled layer loop takes it (``csrc/layer_stack.cpp``):
        ``(nibbles, scales, bias or an empty tensor, out_features)``."""
        return self.nibbles, self.scales, torch.empty(0) if self.bias is None else self.bias, self.out_features


#: how a Q4_1 product computes prompts (calls of more than ``kernels.MAX_ROWS`` rows): with bfloat16
#: activations, as steps do, or with int8 activations (llama.cpp's Q8_1 blocks, ``csrc/linear_q4.cpp``)
PROMPT_PRODUCTS = ("int8", "bfloat16")


def choose_prompt_product(gate_up: Q4Linear, down: Q4Linear, cached: dict | None = None, rows: int = 128,
                          repeats: int = 9) -> dict:
    """How this machine's Q4_1 products should compute prompts: the faster of :data:`PROMPT_PRODUCTS`
    on one layer's MLP products over ``rows`` prompt rows (an earlier measurement, ``cached``, is
    reused). Steps and verification are not affected: they keep bfloat16 activations, so the
    choice changes a prompt's numerics (as llama.cpp computes them) but never Kangaroo's identity
    with plain decoding. Returns ``{"prompt_product", "prompt_product_source", "prompt_product_us"}``."""
    from . import attention as native
    from .kernels import MAX_ROWS

    module = native.load()
    if module.linear_q4_step_rows() != MAX_ROWS:
        raise ValueError(f"the Q4_1 product keeps bfloat16 activations up to {module.linear_q4_step_rows()} rows, "
                         f"steps have up to {MAX_ROWS}: rebuild the kernels")
    if not module.linear_q4_int8_available():
        return {"prompt_product": "bfloat16", "prompt_product_source": "unavailable"}
    if cached and cached.get("prompt_product") in PROMPT_PRODUCTS:
        return {"prompt_product": cached["prompt_product"], "prompt_product_source": "cache",
                "prompt_product_us": cached.get("prompt_product_us")}
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(rows, gate_up.in_features, generator=gen).to(torch.bfloat16)
    h = torch.randn(rows, down.in_features, generator=gen).to(torch.bfloat16)
    timings = native.time_switch(module.linear_q4_prompt_int8, {name: name == "int8" for name in PROMPT_PRODUCTS},
                                 lambda: (gate_up(x), down(h)), repeats)
    pick = min(PROMPT_PRODUCTS, key=lambda name: timings[name])
    return {"prompt_product": pick, "prompt_product_source": "measured", "prompt_product_us": timings}


#: the row counts :func:`choose_amx_rows` (and the head screen's) times: steps of plain decoding (1) to
#: 16-node verifications
AMX_ROWS = (1, 2, 3, 4, 6, 8, 12, 16)
#: the prompt lengths :func:`choose_prompt_amx_rows` times
PROMPT_AMX_ROWS = (17, 32, 64, 128, 256)


def _amx_from(switch, products: list[Q4Linear], counts: tuple[int, ...], repeats: int) -> tuple[int, dict]:
    """Time ``products`` on ``counts`` rows each with a module ``switch`` (``switch(rows)``: AMX from
    ``rows`` rows on, 0 = never) off and on, two alternating rounds, best of each; return the smallest
    count from which AMX was faster at every larger measured count (0: never) and the timings (µs)."""
    from . import attention as native

    gen = torch.Generator().manual_seed(3)
    timings = {}
    for rows in counts:
        xs = {k: torch.randn(rows, k, generator=gen).to(torch.bfloat16) for k in {p.in_features for p in products}}
        rounds = [native.time_switch(switch, {"without": 0, "amx": 1}, lambda: [p(xs[p.in_features]) for p in products], repeats)
                  for _ in range(2)]
        timings[str(rows)] = {name: min(r[name] for r in rounds) for name in ("without", "amx")}
    return first_amx_rows(timings, counts), timings


def first_amx_rows(timings: dict, counts: tuple[int, ...], margin: float = 1.0) -> int:
    """The smallest of ``counts`` from which AMX tiles were faster at every larger count (0: never),
    from ``timings`` ``{str(count): {"without": µs, "amx": µs}}``: AMX must take less than ``margin``
    times the time without."""
    pick = 0
    for rows in reversed(counts):
        if timings[str(rows)]["amx"] >= margin * timings[str(rows)]["without"]:
            break
        pick = rows
    return pick


def choose_amx_rows(products: list[Q4Linear], cached: dict | None = None, repeats: int = 7) -> dict:
    """From how many rows this machine's int8-activation products (``q4_1_int8``) should run on AMX
    tiles instead of AVX-512 VNNI: both give the same bits (exact int32 block sums, then the same
    float operations), so this is a choice of speed only. Times ``products`` (e.g. every layer's
    MLP products, so that the weights stream from memory as in a step) on each of :data:`AMX_ROWS`
    both ways (:func:`_amx_from`); sets the module and returns ``{"amx_rows", "amx_rows_source",
    "amx_rows_us"}``; an earlier measurement, ``cached``, is reused."""
    from . import attention as native

    module = native.load()
    if module is None or not module.linear_q4_amx_available():
        return {"amx_rows": 0, "amx_rows_source": "unavailable"}
    if cached and isinstance(cached.get("amx_rows"), int):
        module.linear_q4_amx_rows(cached["amx_rows"])
        return {"amx_rows": cached["amx_rows"], "amx_rows_source": "cache", "amx_rows_us": cached.get("amx_rows_us")}
    pick, timings = _amx_from(module.linear_q4_amx_rows, products, AMX_ROWS, repeats)
    module.linear_q4_amx_rows(pick)
    return {"amx_rows": pick, "amx_rows_source": "measured", "amx_rows_us": timings}


def choose_prompt_amx_rows(gate_up: Q4Linear, down: Q4Linear, cached: dict | None = None, repeats: int = 5) -> dict:
    """From how many rows prompts should run as a bfloat16 GEMM on AMX tiles (weights de-quantised to
    bfloat16 once per prompt, ``csrc/linear_q4.cpp``) instead of the prompt product otherwise chosen
    (set it first): timed on one layer's MLP products over :data:`PROMPT_AMX_ROWS` rows. Prompts only
    (never a step), so Kangaroo's identity with plain decoding does not depend on it. The engine sets
    the module before each prompt; returns ``{"prompt_amx_rows", "prompt_amx_rows_source",
    "prompt_amx_rows_us"}``."""
    from . import attention as native

    module = native.load()
    if module is None or not module.linear_q4_amx_available():
        return {"prompt_amx_rows": 0, "prompt_amx_rows_source": "unavailable"}
    if cached and isinstance(cached.get("prompt_amx_rows"), int):
        return {"prompt_amx_rows": cached["prompt_amx_rows"], "prompt_amx_rows_source": "cache",
                "prompt_amx_rows_us": cached.get("prompt_amx_rows_us")}
    pick, timings = _amx_from(module.linear_q4_prompt_amx, [gate_up, down], PROMPT_AMX_ROWS, repeats)
    return {"prompt_amx_rows": pick, "prompt_amx_rows_source": "measured", "prompt_amx_rows_us": timings}


#: ggml tensor type ids (ggml.h)
Q4_1 = 3
_SCALAR = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUF value type -> bytes


def gguf_tensors(path: str) -> dict[str, tuple[int, tuple[int, ...], int]]:
    """The tensors of a GGUF file (v2/v3): ``{name: (ggml type, shape as rows.. cols, byte offset)}``.

    Reads only the header: ``gguf.GGUFReader`` parses every metadata value into numpy views first,
    3.7 s for SmolLM2's 49,152-token vocabulary, where this skips them in ~0.1 s."""
    import struct

    data = np.memmap(path, dtype=np.uint8, mode="r")
    mv = memoryview(data)
    if bytes(mv[:4]) != b"GGUF":
        raise ValueError(f"{path} is not a GGUF file")
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", mv, 4)
    if version not in (2, 3):
        raise ValueError(f"{path}: GGUF version {version} is not supported")
    pos, alignment = 24, 32

    def string(at):
        (n,) = struct.unpack_from("<Q", mv, at)
        return bytes(mv[at + 8:at + 8 + n]).decode("utf-8", "replace"), at + 8 + n

    def skip(kind, at):
        if kind in _SCALAR:
            return at + _SCALAR[kind]
        if kind == 8:
            (n,) = struct.unpack_from("<Q", mv, at)
            return at + 8 + n
        if kind == 9:
            elem, count = struct.unpack_from("<IQ", mv, at)
            at += 12
            if elem in _SCALAR:
                return at + count * _SCALAR[elem]
            for _ in range(count):
                at = skip(elem, at)
            return at
        raise ValueError(f"{path}: unknown GGUF value type {kind}")

    for _ in range(n_kv):
        key, pos = string(pos)
        (kind,) = struct.unpack_from("<I", mv, pos)
        pos += 4
        if key == "general.alignment" and kind == 4:
            (alignment,) = struct.unpack_from("<I", mv, pos)
        pos = skip(kind, pos)
    infos = {}
    for _ in range(n_tensors):
        name, pos = string(pos)
        (n_dims,) = struct.unpack_from("<I", mv, pos)
        dims = struct.unpack_from(f"<{n_dims}Q", mv, pos + 4)
        kind, offset = struct.unpack_from("<IQ", mv, pos + 4 + 8 * n_dims)
        pos += 4 + 8 * n_dims + 12
        infos[name] = (kind, tuple(reversed(dims)), offset)
    start = (pos + alignment - 1) // alignment * alignment
    return {name: (kind, shape, start + offset) for name, (kind, shape, offset) in infos.items()}


def has_q4_1_layers(path: str | None) -> bool:
    """Whether the GGUF file at ``path`` stores every decoder-layer matrix the engine multiplies by in
    Q4_1 (tensor types only; :func:`gguf_layers` checks the values)."""
    if path is None:
        return False
    try:
        names = tuple(GGUF_NAMES.values())
        kinds = [kind for name, (kind, _, _) in gguf_tensors(path).items()
                 if name.startswith("blk.") and name.split(".")[2] in names]
    except Exception:  # an unreadable file: the kernel is simply not offered
        return False
    return bool(kinds) and all(k == Q4_1 for k in kinds)


def attention_matrices(w: dict) -> dict[str, torch.Tensor]:
    """An attention block's product weights as the fused engine (and a GGUF file) orders their rows:
    ``q``/``k`` with each RoPE pair side by side, ``v``, ``o``; ``w`` from
    :func:`kangaroo.model.attention_weights`."""
    from .engine import _interleave_rope_rows

    return {"q": _interleave_rope_rows(w["q"].detach(), w["heads"], w["head_dim"]),
            "k": _interleave_rope_rows(w["k"].detach(), w["kv_heads"], w["head_dim"]),
            "v": w["v"].detach(), "o": w["o"].detach()}


def layer_matrices(backbone, i: int) -> dict[str, torch.Tensor]:
    """Decoder layer ``i``'s seven product weights in the engine's row order (:data:`GGUF_NAMES`' keys)."""
    w = backbone.layer_weights(i)
    return {**attention_matrices(w["attention"]), "gate": w["gate"].detach(), "up": w["up"].detach(),
            "down": w["down"].detach()}


def gguf_layers(path: str, backbone) -> list[dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]]:
    """Every decoder layer's matrices as the GGUF file at ``path`` stores them in Q4_1: per layer,
    ``{name: (q, d, m)}`` for q, k, v, o, gate, up, down, rows in the fused engine's order (llama.cpp
    stores Q and K with each RoPE pair side by side, as the engine does).

    Raises ValueError, with the reason, unless every one of them is Q4_1 and de-quantises to exactly
    the weights ``backbone`` (the model loaded from that file) holds.
    """
    tensors = gguf_tensors(path)
    data = np.memmap(path, dtype=np.uint8, mode="r")
    layers = []
    for i in range(backbone.num_layers):
        a = backbone.layer_weights(i)["attention"]
        expected = layer_matrices(backbone, i)
        if any(a[b] is not None for b in ("q_bias", "k_bias", "v_bias", "o_bias")) or a["q_norm"] is not None:
            raise ValueError("the Q4_1 product runs Llama-style layers (no attention biases or per-head norms)")
        blocks = {}
        for name, ref in expected.items():
            label = f"blk.{i}.{GGUF_NAMES[name]}.weight"
            if label not in tensors:
                raise ValueError(f"{path} has no {label}")
            kind, shape, offset = tensors[label]
            if kind != Q4_1:
                raise ValueError(f"{label} is not Q4_1 (ggml type {kind})")
            rows, cols = ref.shape
            if shape != (rows, cols) or cols % BLOCK:
                raise ValueError(f"{label} is {list(shape)}, the loaded weight {[rows, cols]}")
            nbytes = rows * cols // BLOCK * BLOCK_BYTES
            q, d, m = unpack_q4_1(np.asarray(data[offset:offset + nbytes]).reshape(rows, -1), rows, cols)
            if not torch.equal(dequantize(q, d, m), ref.detach().float().cpu()):
                raise ValueError(f"blk.{i}.{GGUF_NAMES[name]}.weight does not de-quantise to the loaded model's weights")
            blocks[name] = (q, d, m)
        layers.append(blocks)
    return layers
