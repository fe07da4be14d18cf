"""Decode attention: a few query rows over the KV cache, with the same bits for a row whether it is
verified among others or decoded alone.

Kangaroo is lossless only if verification computes each drafted token's logits exactly as a one-token
step would. Torch's SDPA does not promise that across query counts (its CPU kernel blocks and sums
queries and keys differently for other shapes), so until now the engine attended verification rows
one by one, each with the very call a one-token step makes. That keeps the bits but costs one SDPA
call per row and layer: at 1,000 cached tokens an 8-token verification spent 14 of its 30 ms there.

``decode_attention`` (``csrc/decode_attention.cpp``) attends all rows of a step in one call, and
computes each row with arithmetic that depends on nothing but that row's query, its key range and the
cache: keys are cut at fixed absolute positions (every 128), a (kv head, chunk) work item takes every
row that has keys in the chunk while they are in cache, scores are reduced in one fixed tree, the
exponentials and value sums run in key order with padded (never peeled) vector tails, and the chunks
are combined in position order. So plain decoding and verification run the same kernel and agree bit
for bit, and ``check`` proves it on this machine before the kernel is used.
Work items are spread over the threads by their work, not in contiguous ranges (a step's last chunk
often holds a few keys).

The same compiled module provides the engine's RMSNorm over ``[T, D]`` rows (:func:`rms_norm`): one
fixed summation order per row, and ~1 µs a call where ``F.rms_norm`` takes ~8 µs on a step's few rows.

Prompts (more than 16 rows, which no step recomputes) attend in flash-attention tiles instead
(:func:`prompt_attention`): keys transposed once per call, broadcast FMAs, an online softmax; not
row-invariant, and faster (an 810-token prompt: 4.98 -> 2.72 ms a layer); where measured faster, with
bfloat16 products (``vdpbf16ps``), or on AMX tiles where the CPU has them (:func:`choose_prompt_tiles`).

The kernel is C++ compiled at first use for the machine at hand (``-march=native``), in one module
with the engine's bfloat16 and Q4_1 products (``csrc/linear_bf16.cpp``, ``csrc/linear_q4.cpp``) and
fused step ops (``csrc/step_ops.cpp``):
~80–100 s on 2 cores, then cached under ``$KANGAROO_CACHE/ext`` per CPU, compiler flags, torch version and
sources. It is
CPU only, with float32 queries over a float32 or a bfloat16 cache (:func:`bf16_cache_native`). Where it cannot be built, or fails its check,
or measures slower than per-row SDPA for the model's shapes, the engine keeps per-row SDPA.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import sysconfig
import time
from pathlib import Path

import torch
from torch.nn import functional as F

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "decode_attention.cpp"
#: one compiled module: the attention kernel and RMSNorm (SOURCE, which defines the module), the
#: bfloat16 product of kangaroo.kernels ("dpbf16"), the Q4_1 product, the screened greedy LM head,
#: the step engine's fused small ops and its compiled layer loop (layer_stack.cpp)
SOURCES = (SOURCE, SOURCE.parent / "linear_bf16.cpp", SOURCE.parent / "linear_q4.cpp", SOURCE.parent / "head_argmax.cpp",
           SOURCE.parent / "step_ops.cpp", SOURCE.parent / "layer_stack.cpp")
HEADERS = (SOURCE.parent / "exp512.h", SOURCE.parent / "module.h")
CFLAGS = ["-O3", "-march=native", "-fopenmp"]
CHOICES = ("auto", "kernel", "sdpa")

_state: dict = {}  # "module" (or None), "build_s", "compiled", "compile_s", "reason": see status()


def _cpu_id() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            lines = [line for line in f if line.startswith(("model name", "flags"))][:2]
    except OSError:
        lines = []
    return "".join(lines)


def build_id() -> str:
    """A digest of the kernels' sources, compiler flags, CPU, torch and Python: names their build, and
    keys the timings made with them (``calibration``), so that changed kernels are timed again."""
    if "build_id" not in _state:
        _state["build_id"] = hashlib.sha1("\n".join([*(src.read_text() for src in SOURCES + HEADERS), " ".join(CFLAGS), _cpu_id(),
                                                     torch.__version__, sys.version]).encode()).hexdigest()[:12]
    return _state["build_id"]


def _name() -> str:
    return f"kangaroo_decode_attention_{build_id()}"


def _ensure_ninja() -> None:
    """torch builds with the first ``ninja`` on PATH. The ``ninja`` wheel puts one beside this Python,
    which is on PATH only when the environment is activated, and it is taken whenever it is there:
    two ninja versions read each other's build log as out of date, so with a system ninja besides the
    wheel's, every switch between an activated shell and ``.venv/bin/python`` compiled the kernels
    again (docs/ENGINE.md §8)."""
    scripts = sysconfig.get_path("scripts")
    if not scripts or not (Path(scripts) / "ninja").exists():
        return  # whatever ninja PATH has, or none (the build then fails with its reason)
    found = shutil.which("ninja")
    if found is None or Path(found).resolve() != (Path(scripts) / "ninja").resolve():
        os.environ["PATH"] = scripts + os.pathsep + os.environ.get("PATH", "")


def _clear_stale_lock(build: Path, max_age_s: float = 300.0) -> None:
    """torch's build waits for as long as a ``lock`` file stands in the build folder; a compile that
    was killed leaves one behind, and every later run would hang. A compile takes ~80 s, so a lock
    older than ``max_age_s`` is a leftover: remove it."""
    lock = build / "lock"
    try:
        age = time.time() - lock.stat().st_mtime
    except OSError:
        return
    if age > max_age_s:
        logger.warning("removing a stale build lock %s (%.0f s old; an interrupted compile)", lock, age)
        lock.unlink(missing_ok=True)


def load():
    """The compiled kernel module, building it on first use; None (with the reason in
    :func:`status`) where it cannot be had."""
    if "module" in _state:
        return _state["module"]
    from torch.utils import cpp_extension

    from .fetch import cache_dir

    name = _name()
    build = cache_dir() / "ext" / name
    built_before = {so: so.stat().st_mtime for so in build.glob("*.so")}
    fresh = not built_before
    start = time.perf_counter()
    module, reason = None, None
    try:
        build.mkdir(parents=True, exist_ok=True)
        _clear_stale_lock(build)
        _ensure_ninja()
        if fresh:
            logger.info("compiling our kernels for this machine (attention, bfloat16 and Q4_1 products, step ops; once, ~80–100 s)")
        module = cpp_extension.load(name, [str(src) for src in SOURCES], extra_cflags=CFLAGS, extra_ldflags=["-fopenmp"],
                                    build_directory=str(build), verbose=False)
    except Exception as exc:  # noqa: BLE001 - any build failure means: no kernel, per-row SDPA
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
    elapsed = round(time.perf_counter() - start, 2)
    # ninja also rebuilds a module it finds out of date (e.g. the same sources built from another
    # checkout into this cache folder): that is a compile too
    fresh = fresh or any(so.stat().st_mtime != built_before.get(so) for so in build.glob("*.so"))
    record = build / "compile.json"
    if fresh and module is not None:
        try:
            record.write_text(json.dumps({"compile_s": elapsed, "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}))
        except OSError:
            pass
    try:
        compile_s = json.loads(record.read_text())["compile_s"]
    except (OSError, ValueError, KeyError):
        compile_s = elapsed if fresh else None
    _state.update(module=module, build_s=elapsed, compiled=fresh and module is not None, compile_s=compile_s, reason=reason)
    if module is None:
        logger.warning("decode-attention kernel unavailable (%s): attending verification rows one by one", reason)
    return module


def status() -> dict:
    """``available``, ``build_s`` (compile or load seconds in this process), ``compiled`` (this
    process compiled it), ``compile_s`` (what its first compile on this machine took) and ``reason``
    (why it is unavailable)."""
    return {"available": _state.get("module") is not None, "build_s": _state.get("build_s"),
            "compiled": _state.get("compiled", False), "compile_s": _state.get("compile_s"),
            "reason": _state.get("reason")}


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, begins: list[int], ends: list[int],
                     scale: float) -> torch.Tensor:
    """Rows ``q`` ``[T, H, D]`` (head dimension contiguous) over ``keys``/``values`` ``[H_kv, S, D]``
    (float32, or bfloat16: see :func:`bf16_cache_native`); row ``t`` attends keys ``begins[t] ..
    ends[t] - 1``. Returns ``[T, H, D]`` float32."""
    return _state["module"].decode_attention(q, keys, values, begins, ends, scale)


def bf16_cache_native(head_dim: int = 64) -> bool:
    """Whether :func:`decode_attention` computes on a bfloat16 cache of this head size with bfloat16
    dot products (AVX512-BF16 builds, head sizes 64/128/256); elsewhere it widens the cache to float32
    on each call, which costs time instead of saving it."""
    module = _state.get("module")
    return module is not None and module.decode_attention_bf16_native() and head_dim in (64, 128, 256)


def top1_prob(logits: torch.Tensor) -> tuple[int, float]:
    """The first index of the largest of ``logits`` ``[..., V]`` (last row) and its softmax
    probability: one compiled pass where the module is loaded and the logits are on the CPU (what a
    draft step's second early exit needs), else torch's softmax and max."""
    module = _state.get("module")
    if module is not None and logits.device.type == "cpu":
        return module.top1_prob(logits)
    conf, idx = torch.softmax(logits.reshape(-1, logits.shape[-1])[-1].float(), dim=-1).max(dim=-1)
    return int(idx), float(conf)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of ``x`` ``[T, D]`` (float32, rows contiguous) with ``weight`` ``[D]``, from the same
    compiled module: each row in one fixed summation order, ~1 µs a call where ``F.rms_norm`` takes
    ~8 µs on a step's few rows (60 norms a token: ~0.5 ms of a 13 ms step)."""
    return _state["module"].rms_norm(x, weight, eps)


def linear_bf16(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x W^T (+ b)`` from the same compiled module (``csrc/linear_bf16.cpp``): ``x`` ``[M, K]``
    bfloat16, ``packed`` ``[N/16, K/2, 16, 2]`` bfloat16 (see :class:`kangaroo.kernels.Linear`),
    ``bias`` ``[N]`` float32 -> ``[M, N]`` bfloat16."""
    return _state["module"].linear_bf16(x, packed, bias)


def linear_q4(x: torch.Tensor, nibbles: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
              int8: bool = False) -> torch.Tensor:
    """``x W^T (+ b)`` over Q4_1 weights (``csrc/linear_q4.cpp``): ``x`` ``[M, K]`` bfloat16, ``nibbles``
    ``[N/16, K/32, 4, 32]`` int16 and ``scales`` ``[N/16, K/32, 2, 16]`` float16 (see
    :mod:`kangaroo.quantized`), ``bias`` ``[N]`` float32 -> ``[M, N]`` bfloat16; ``int8``: on int8
    activations at every row count (llama.cpp's product), else bfloat16 ones for steps."""
    return _state["module"].linear_q4(x, nibbles, scales, bias, int8)


def rope(x: torch.Tensor, cs: torch.Tensor) -> torch.Tensor:
    """RoPE of ``x`` ``[T, heads, d]`` (interleaved pairs) by ``cs`` ``[T, 1, d/2, 2]`` (cos, sin): the
    engine's rotation wherever the module is loaded (``csrc/step_ops.cpp``)."""
    return _state["module"].rope(x, cs)


def rope_attend(qkv: torch.Tensor, cs: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start: int, heads: int,
                kv_heads: int, scale: float, window: int, first_out: int = 0, step_rows: int = 16) -> torch.Tensor:
    """An attention block between its products: ``qkv`` ``[T, (H + 2 H_kv) d]`` rotated (:func:`rope`),
    keys and values written into the layer's buffers ``[H_kv, capacity, d]`` at ``start ..``, and
    each row from ``first_out`` on attended over its prefix: up to ``step_rows`` rows with
    :func:`decode_attention` (row-invariant), more (a prompt) with :func:`prompt_attention`.
    ``[T - first_out, H d]``."""
    return _state["module"].rope_attend(qkv, cs, keys, values, start, heads, kv_heads, scale, window, first_out, step_rows)


def rope_attend_tree(qkv: torch.Tensor, cs: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, pos: int, segments,
                     heads: int, kv_heads: int, scale: float, window: int, key_stash: torch.Tensor,
                     value_stash: torch.Tensor) -> torch.Tensor:
    """A token tree's attention block between its products (:func:`rope_attend` for a
    :class:`~kangaroo.tree.TreeLayout`'s ``segments``): every row's rotated keys and values go to the
    stashes ``[H_kv, T, d]``, each segment's into the layer's buffers at ``pos + depth``, and each
    segment's rows attend with :func:`decode_attention`, as one-token steps would. ``[T, H d]``."""
    first, stop, depth = (list(x) for x in zip(*segments))
    return _state["module"].rope_attend_tree(qkv, cs, keys, values, pos, first, stop, depth, heads, kv_heads, scale,
                                             window, key_stash, value_stash)


def prompt_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start: int, window: int,
                     scale: float) -> torch.Tensor:
    """A prompt's causal attention: rows ``q`` ``[T, H, d]`` at positions ``start ..`` over ``keys`` /
    ``values`` ``[H_kv, S, d]`` (the last ``window`` keys when > 0), in flash-attention tiles
    (``csrc/decode_attention.cpp``; head sizes other than 64, 128, 256 through the decode kernel). Faster than :func:`decode_attention` on many rows, but a row's
    bits depend on its tile: only for rows that no step re-computes (prompts). The module's prompt
    setting (:func:`choose_prompt_tiles`, set by the engine before each prompt) decides whether the
    tiles compute in float32, in bfloat16 or in bfloat16 on AMX tiles. ``[T, H, d]``."""
    return _state["module"].prompt_attention(q, keys, values, start, window, scale)



def add_rms_norm(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``x += y`` in place (``x`` ``[T, D]`` float32), then :func:`rms_norm` of it."""
    return _state["module"].add_rms_norm(x, y, weight, eps)


def silu_mul(gu: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` of a fused gate/up product ``[T, 2I]`` (gate first), in its dtype."""
    return _state["module"].silu_mul(gu)


def sdpa_rows(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, begins: list[int], ends: list[int],
              scale: float) -> torch.Tensor:
    """The same rows, each by its own SDPA call over exactly its keys: the engine's attention without
    the kernel (a one-token step makes the very call each verified row makes), and the kernel's reference."""
    gqa = q.shape[1] != keys.shape[0]
    rows = [F.scaled_dot_product_attention(q[t][None, :, None], keys[None, :, b:e], values[None, :, b:e],
                                           scale=scale, enable_gqa=gqa)[0, :, 0]
            for t, (b, e) in enumerate(zip(begins, ends))]
    return torch.stack(rows)


def check(heads: int, kv_heads: int, head_dim: int, seed: int = 0) -> str | None:
    """Prove the kernels on this machine for these shapes: every row of a multi-row call equals its
    one-row call bit for bit (chunk borders, windows and 1..16 rows included) and matches SDPA (or
    ``F.rms_norm``) to float32 rounding. Returns None, or what failed."""
    gen = torch.Generator().manual_seed(seed)
    cap = 700
    keys = torch.randn(kv_heads, cap, head_dim, generator=gen)
    values = torch.randn(kv_heads, cap, head_dim, generator=gen)
    scale = head_dim ** -0.5
    weight = torch.rand(heads * head_dim, generator=gen) + 0.5
    x = torch.randn(16, heads * head_dim, generator=gen) * 3
    normed = rms_norm(x, weight, 1e-6)
    if not all(torch.equal(rms_norm(x[t:t + 1].clone(), weight, 1e-6)[0], normed[t]) for t in range(16)):
        return "rms_norm: a row differs from its one-row call"
    if not torch.allclose(normed, F.rms_norm(x, (x.shape[1],), weight, 1e-6), atol=1e-5, rtol=1e-5):
        return "rms_norm differs from F.rms_norm"
    for pos, T, window in ((0, 3, None), (120, 16, None), (250, 8, None), (383, 5, 100), (600, 16, None), (640, 1, 37)):
        q = torch.randn(T, heads, head_dim, generator=gen) * 2
        ends = [pos + t + 1 for t in range(T)]
        begins = [0 if window is None else max(0, e - window) for e in ends]
        rows = decode_attention(q, keys, values, begins, ends, scale)
        for t in range(T):
            alone = decode_attention(q[t:t + 1].clone(), keys, values, begins[t:t + 1], ends[t:t + 1], scale)
            if not torch.equal(alone[0], rows[t]):
                return f"row {t} of {T} at position {pos} differs from its one-row call"
        ref = sdpa_rows(q, keys, values, begins, ends, scale)
        if not torch.allclose(rows, ref, atol=1e-5, rtol=1e-4):
            return f"differs from SDPA by {(rows - ref).abs().max().item():.2e} at position {pos}"
    return None


def choose(choice: str, heads: int, kv_heads: int, head_dim: int, device: torch.device,
           cached: dict | None = None) -> tuple[str, dict]:
    """Resolve ``choice`` (:data:`CHOICES`) for a model's attention shapes: ``("kernel" | "sdpa", info)``.

    ``auto`` takes the kernel where it builds, passes :func:`check` and measures faster than per-row
    SDPA on a one-token step plus an 8-row verification at 512 cached tokens; an earlier
    measurement (``cached``: ``{"attention", "attention_us"}``) is reused, so that every process on a
    machine runs the same engine (settings tuned for it stay valid). ``kernel`` insists (a one-line
    error where it cannot be had); ``sdpa`` never builds it."""
    from .errors import KangarooError

    if choice not in CHOICES:
        raise KangarooError(f"unknown attention {choice!r}: use one of {', '.join(CHOICES)}")
    if choice == "sdpa":
        return "sdpa", {"attention": "sdpa", "attention_source": "given"}
    if device.type != "cpu":
        if choice == "kernel":
            raise KangarooError(f"the decode-attention kernel is CPU only: on {device.type} use --attention sdpa or auto")
        return "sdpa", {"attention": "sdpa", "attention_source": "device"}
    module = load()
    problem = status()["reason"] if module is None else check(heads, kv_heads, head_dim)
    if problem is not None:
        if choice == "kernel":
            raise KangarooError(f"the decode-attention kernel cannot be used here ({problem}): use --attention sdpa")
        if module is not None:
            logger.warning("decode-attention kernel failed its check (%s): attending rows one by one", problem)
        return "sdpa", {"attention": "sdpa", "attention_source": "unavailable", "attention_reason": problem}
    info = {"attention_build_s": status()["build_s"], "attention_compiled": status()["compiled"],
            "attention_compile_s": status()["compile_s"]}
    if choice == "kernel":
        return "kernel", {**info, "attention": "kernel", "attention_source": "given"}
    if cached and cached.get("attention") in ("kernel", "sdpa"):
        return cached["attention"], {**info, "attention": cached["attention"], "attention_source": "cache",
                                     "attention_us": cached.get("attention_us")}
    timings = _time_both(heads, kv_heads, head_dim)
    pick = "kernel" if timings["kernel"] <= timings["sdpa"] else "sdpa"
    return pick, {**info, "attention": pick, "attention_source": "measured", "attention_us": timings}


#: how prompt tiles compute (:func:`prompt_attention`), by the module's mode number: float32; bfloat16
#: products (``vdpbf16ps`` on bfloat16 queries, keys, values and probabilities; float32 sums and
#: softmax); the same numbers on AMX tiles (``tdpbf16ps``: whole tiles of scores and value sums, no
#: online softmax), where the CPU and the OS grant them
PROMPT_TILES = {"amx": 2, "bfloat16": 1, "float32": 0}


def prompt_tiles_available(name: str) -> bool:
    """Whether prompt tiles ``name`` (a key of :data:`PROMPT_TILES`) can run on this machine."""
    module = load()
    return module is not None and module.prompt_attention_tiles_available(PROMPT_TILES[name])


def set_prompt_tiles(name: str) -> str:
    """Make prompts' tiles compute as ``name`` (module-wide); returns the previous setting's name."""
    old = _state["module"].prompt_attention_tiles(PROMPT_TILES[name])
    return next(n for n, mode in PROMPT_TILES.items() if mode == old)


def choose_prompt_tiles(heads: int, kv_heads: int, head_dim: int, cached: dict | None = None, rows: int = 512,
                        repeats: int = 7) -> dict:
    """The faster of :data:`PROMPT_TILES` for a ``rows``-token prompt of these attention shapes (an
    earlier measurement, ``cached``, is reused). Only prompts change numerics: steps and verification
    keep the row-invariant float32 kernel, so Kangaroo stays identical to plain decoding.
    Returns ``{"prompt_tiles", "prompt_tiles_source", "prompt_tiles_us"}``."""
    names = [n for n in PROMPT_TILES if prompt_tiles_available(n)]
    if names == ["float32"] or head_dim not in (64, 128, 256):
        return {"prompt_tiles": "float32", "prompt_tiles_source": "unavailable"}
    if cached and cached.get("prompt_tiles") in names and set(cached.get("prompt_tiles_us") or ()) == set(names):
        return {"prompt_tiles": cached["prompt_tiles"], "prompt_tiles_source": "cache",
                "prompt_tiles_us": cached.get("prompt_tiles_us")}
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(rows, heads, head_dim, generator=gen)
    keys, values = (torch.randn(kv_heads, rows, head_dim, generator=gen) for _ in range(2))
    timings = time_switch(set_prompt_tiles, {name: name for name in names},
                          lambda: prompt_attention(q, keys, values, 0, 0, head_dim ** -0.5), repeats)
    pick = min(names, key=lambda name: timings[name])
    return {"prompt_tiles": pick, "prompt_tiles_source": "measured", "prompt_tiles_us": timings}


def _time_both(heads: int, kv_heads: int, head_dim: int, context: int = 512, repeats: int = 30) -> dict:
    """Microseconds of a one-token step + an 8-row verification's attention, per implementation."""
    gen = torch.Generator().manual_seed(1)
    keys = torch.randn(kv_heads, context + 8, head_dim, generator=gen)
    values = torch.randn(kv_heads, context + 8, head_dim, generator=gen)
    q = torch.randn(8, heads, head_dim, generator=gen)
    scale = head_dim ** -0.5
    out = {}
    for name, fn in (("kernel", decode_attention), ("sdpa", sdpa_rows)):
        def once():
            fn(q[:1], keys, values, [0], [context + 1], scale)
            fn(q, keys, values, [0] * 8, [context + t + 1 for t in range(8)], scale)
        out[name] = round(time_call(once, repeats) * 1e6, 1)
    return out


def time_switch(switch, settings: dict, fn, repeats: int) -> dict:
    """Microseconds of ``fn`` under each of ``settings`` (``{name: value}``) of a module-wide
    ``switch`` (which returns its old value; restored after each), e.g. the prompt paths' switches."""
    timings = {}
    for name, value in settings.items():
        previous = switch(value)
        try:
            timings[name] = round(time_call(fn, repeats) * 1e6, 1)
        finally:
            switch(previous)
    return timings


def time_call(fn, repeats: int, quantile: float = 0.5) -> float:
    """Seconds of one call of ``fn``: the ``quantile`` of ``repeats`` timed calls after an untimed one."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    times.sort()
    return times[int(len(times) * quantile)]
