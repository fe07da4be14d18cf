"""Choosing the engine configuration by measurement on the machine at hand, and remembering it.

The fastest way to run a small model differs between CPUs (an Intel Xeon with AMX runs bfloat16
products well, an AMD EPYC's MKL is slow on few float32 rows but its oneDNN bfloat16 path is not),
so ``EngineConfig(dtype="auto", kernel="auto")`` times one plain-decoding step of every candidate
(weight dtype x product kernel) on the loaded model and keeps the fastest. The choice is cached
per machine, thread count, torch version and model in ``$KANGAROO_CACHE/engine/choices.json``, so
only the first run on a machine pays for it (a few seconds for a 135M model). A choice measured
while other processes kept the CPUs busy is used for that run but not cached: one busy neighbour on
a 2-core machine can reverse the order of two kernels that differ by 10% (docs/ENGINE.md §3).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from . import attention as attn_kernel
from .config import EngineConfig
from .contention import ContentionMeter, busy
from .engine import FusedEngine
from .errors import KangarooError
from . import quantized, screened_head
from .kernels import KERNELS, QUANTIZED_KERNELS, REQUIRES, kernel_available
from .kv_cache import KVCache
from .model import Backbone

logger = logging.getLogger(__name__)

# how candidates are timed; part of the cache key, so that choices timed the older way are measured
# again (2: with the attention they run with, finalists in alternating rounds; see _measure)
TIMING_VERSION = 2
_CPU_FLAGS = ("avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx2")


def machine() -> dict:
    """CPU model, the instruction-set flags that decide kernels, cores and torch threads. The name
    carries the CPU family and model numbers: these machines call both Zen 4 and Zen 5 "AMD EPYC",
    and what each kernel costs differs between them (docs/ENGINE.md §8), so cached choices and
    reported figures keep them apart."""
    name, flags, ids = platform.processor() or "", set(), {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key = line.split(":", 1)[0].strip()
                if key in ("cpu family", "model") and key not in ids:
                    ids[key] = line.split(":", 1)[1].strip()
                elif line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    if len(ids) == 2:
        name = f"{name} (family {ids['cpu family']}, model {ids['model']})"
    return {
        "cpu": name,
        "cpu_flags": [f for f in _CPU_FLAGS if f in flags],
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


def candidates(config: EngineConfig, backbone: Backbone | None = None) -> list[tuple[torch.dtype, str]]:
    """(weight dtype, kernel) pairs the config allows on its device (``q4_1`` only for a ``backbone``
    loaded from a GGUF file whose layers are Q4_1)."""
    cuda = config.device.startswith("cuda")
    if config.dtype != "auto":
        dtypes = [getattr(torch, config.dtype)]
    else:
        dtypes = [torch.bfloat16] if cuda else [torch.float32, torch.bfloat16]
    kernels = KERNELS + QUANTIZED_KERNELS if config.kernel == "auto" else (config.kernel,)
    q4 = backbone is not None and quantized.has_q4_1_layers(backbone.gguf_path)
    options = [(d, k) for d in dtypes for k in kernels
               if kernel_available(k, d, config.device) and (k not in QUANTIZED_KERNELS or q4)]
    if not options and config.kernel != "auto":
        needs = f" (it needs {REQUIRES[config.kernel]})" if config.kernel in REQUIRES else ""
        raise KangarooError(f"the {config.kernel} kernel cannot run here{needs}: use --kernel stock or auto")
    return options


def step_ms(engine, repeats: int = 7, context: int = 64) -> float:
    """Median time of one plain greedy-decoding step (all layers + the head's argmax, one token) after
    ``context`` cached positions."""
    cache = KVCache(engine.num_layers, context + 16)
    ids = torch.arange(context, device=engine.device)[None] % 1000 + 10
    sync = torch.cuda.synchronize if engine.device.type == "cuda" else (lambda: None)
    times = []
    with torch.no_grad():
        engine.run_layers(0, engine.num_layers, engine.embed(ids), cache, 0)
        token = ids[:, -1:]
        for i in range(repeats + 2):
            cache.crop(context)
            sync()
            t = time.perf_counter()
            engine.greedy(engine.run_layers(0, engine.num_layers, engine.embed(token), cache, context))
            sync()
            if i >= 2:  # warm-up
                times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2] * 1e3


def _key(backbone: Backbone, config: EngineConfig) -> str:
    m = machine()
    fp = backbone.fingerprint()
    model = f"{fp['model_type']}-{fp['num_hidden_layers']}x{fp['hidden_size']}-v{fp['vocab_size']}"
    # the candidates are part of the key: a new kernel is measured, not hidden behind an older choice
    options = ",".join(f"{str(d).removeprefix('torch.')}/{k}" for d, k in candidates(config, backbone))
    return "|".join([m["cpu"], ",".join(m["cpu_flags"]), f"{m['threads']} threads", m["torch"], config.device,
                     model, config.dtype, config.kernel, options, f"timing {TIMING_VERSION}", f"kernels {attn_kernel.build_id()}"])


def _cache_file() -> Path:
    from .loading import cache_dir

    return cache_dir() / "engine" / "choices.json"


def _read_cache() -> dict:
    try:
        return json.loads(_cache_file().read_text())
    except (OSError, ValueError):
        return {}


def _write_cache(records: dict) -> None:
    """Add ``{key: record}`` to the cache file (one read and one atomic replace)."""
    path = _cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = _read_cache()
        data.update(records)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        os.replace(tmp, path)
    except OSError as exc:  # a read-only cache only costs a re-measurement next time
        logger.warning("could not cache the engine choice in %s: %s", path, exc)


def build_engine(backbone: Backbone, config: EngineConfig):
    """The engine ``config`` asks for, measured if it leaves a choice; returns ``(engine, info)``.

    ``info`` says what was chosen and why: ``engine``, ``dtype``, ``kernel``, ``source``
    (``given``, ``cache`` or ``measured``), ``step_ms`` per candidate when measured, ``build_s``.
    """
    eager = {"engine": "eager", "dtype": str(backbone.dtype).removeprefix("torch."), "kernel": "hf", "source": "given"}
    if config.engine == "eager":
        return backbone, eager
    try:
        return _build_fused(backbone, config)
    except KangarooError as exc:
        if config.engine == "fused" or config.kernel != "auto":  # a kernel asked for by name is the fused engine's
            raise
        # engine=auto: a model the fused steps cannot run still decodes, on HF's own modules
        logger.warning("fused engine unavailable (%s); running HF's modules (eager engine)", exc)
        return backbone, {**eager, "source": "fallback"}


def _build_fused(backbone: Backbone, config: EngineConfig):
    start, meter = time.perf_counter(), ContentionMeter().start()
    measured = {}  # cache records of the choices measured now, written at the end if the CPUs were quiet
    options = candidates(config, backbone)
    if not options:
        raise KangarooError(f"no product kernel for {config.device}: use --kernel stock")
    engine, source, timings = None, "given", None
    chosen_attention = {}

    def attend_as_chosen(engine):
        """Resolve the attention once (it depends on the model's shapes, not on the products) and
        give it to ``engine``: candidates are timed with the attention they will run with (per-row
        SDPA added ~6 ms to a ~5 ms step and hid a 10% difference between two kernels)."""
        if not chosen_attention:
            a = engine.layers[0].attention  # the model's attention shapes, as the engine read them
            key = _key(backbone, config) + f"|attention {a.heads}x{a.kv_heads}x{a.head_dim}"
            chosen_attention["key"] = key
            chosen_attention["result"] = attn_kernel.choose(config.attention, a.heads, a.kv_heads, a.head_dim, engine.device,
                                                            cached=_read_cache().get(key))
        engine.attention = chosen_attention["result"][0]  # loaded and checked by choose()

    choice = options[0]
    if len(options) > 1:
        key = _key(backbone, config)
        cached = _read_cache().get(key) or {}
        found = [o for o in options if [str(o[0]), o[1]] == cached.get("choice")]
        if found:
            choice, source, timings = found[0], "cache", cached.get("step_ms")
        else:
            choice, engine, timings = _measure(backbone, options, attend_as_chosen)
            source = "measured"
            measured[key] = {"choice": [str(choice[0]), choice[1]], "step_ms": timings, "machine": machine(),
                             "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if engine is None:
        try:
            engine = FusedEngine(backbone, *choice)
        except ValueError as exc:  # e.g. q4_1 and a GGUF file that does not match the loaded weights
            raise KangarooError(f"cannot build the {choice[1]} engine: {exc}") from exc
    attend_as_chosen(engine)
    engine.kv_dtype = _kv_dtype(config, engine)
    a = engine.layers[0].attention
    key = chosen_attention["key"]
    attention, attention_info = chosen_attention["result"]
    _remember(measured, key, attention_info, "attention")  # cached like the dtype and kernel: one engine per machine
    prompt_info = {}
    if attention == "kernel" and choice[0] == torch.bfloat16 and config.prefill == "auto":
        # prompts' attention tiles: float32, bfloat16 or bfloat16 on AMX tiles, measured once per machine;
        # only where the weights are bfloat16 already (a float32 engine keeps float32's accuracy on prompts too)
        tiles = attn_kernel.choose_prompt_tiles(a.heads, a.kv_heads, a.head_dim, _read_cache().get(key + "|prompt tiles"))
        _remember(measured, key + "|prompt tiles", tiles, "prompt_tiles")
        engine.prompt_tiles = tiles["prompt_tiles"]
        prompt_info |= tiles
    if choice[1] == "q4_1" and config.prefill == "auto":  # how its products compute prompts: measured once per machine, like the rest
        product_key = _key(backbone, config) + "|q4_1 prompt product"
        product = quantized.choose_prompt_product(engine.layers[0].gate_up, engine.layers[0].down, _read_cache().get(product_key))
        _remember(measured, product_key, product, "prompt_product")
        engine.prompt_int8 = product["prompt_product"] == "int8"
        prompt_info |= product
    if choice[1] == "q4_1_int8":  # AVX-512 or AMX tiles, the same bits: from how many rows AMX is faster, measured once
        amx_key = _key(backbone, config) + "|q4_1_int8 amx rows"
        amx = quantized.choose_amx_rows([p for layer in engine.layers for p in (layer.gate_up, layer.down)],
                                        _read_cache().get(amx_key))
        _remember(measured, amx_key, amx, "amx_rows")
        engine.amx_rows = amx["amx_rows"]
        prompt_info |= amx
    if choice[1] in QUANTIZED_KERNELS and config.prefill == "auto":
        # long prompts as a bfloat16 GEMM on AMX tiles, from the prompt length where measured faster
        prompt_key = _key(backbone, config) + f"|{choice[1]} prompt amx rows"
        module = attn_kernel.load()
        before = module.linear_q4_prompt_int8(engine.prompt_int8)  # AMX against the prompt product chosen above
        try:
            prompt_amx = quantized.choose_prompt_amx_rows(engine.layers[0].gate_up, engine.layers[0].down,
                                                          _read_cache().get(prompt_key))
        finally:
            module.linear_q4_prompt_int8(before)
        _remember(measured, prompt_key, prompt_amx, "prompt_amx_rows")
        engine.prompt_amx_rows = prompt_amx["prompt_amx_rows"]
        prompt_info |= prompt_amx
    if getattr(engine, "greedy_head", None) is not None:  # the greedy head's screen: AVX-512 or AMX tiles, the same bits
        head_key = _key(backbone, config) + "|head screen amx rows"
        head_amx = screened_head.choose_amx_rows(engine.greedy_head, _read_cache().get(head_key))
        if head_amx["head_amx_rows_source"] != "unavailable":
            _remember(measured, head_key, head_amx, "head_amx_rows")
            prompt_info |= head_amx
    info = {"engine": "fused", "dtype": str(choice[0]).removeprefix("torch."), "kernel": choice[1], "source": source,
            "step_ms": timings, **attention_info, "prefill": config.prefill, **prompt_info,
            "kv_dtype": str(engine.kv_dtype).removeprefix("torch."),
            "build_s": round(time.perf_counter() - start, 2)}
    if measured:
        others = meter.stop()
        info["calibration_others_share"] = None if others is None else round(others, 3)
        if busy(others):
            logger.warning("engine choice measured while other processes used %.0f%% of the CPUs: used for this run, "
                           "not cached (measured again next time)", 100 * others)
        else:
            _write_cache(measured)
    logger.info("engine: %s (%s)", engine.describe(), source)
    return engine, info


def _kv_dtype(config: EngineConfig, engine: FusedEngine) -> torch.dtype:
    """The KV cache's element type. ``auto``: bfloat16 for bfloat16 engines on the kernel attention
    where it computes on a bfloat16 cache natively (half the bytes a step reads, bfloat16 dot
    products: 1.05x a whole one-token step at 256 cached tokens, 1.2x at 1,024 and 1.25x at 1,536 on
    Zen 4; docs/ENGINE.md §4), else float32 (a float32 engine keeps float32's accuracy)."""
    if config.kv_dtype == "float32":
        return torch.float32
    if engine.attention != "kernel":
        if config.kv_dtype == "bfloat16":
            raise KangarooError("a bfloat16 KV cache is read by the decode-attention kernel, which is not in use: "
                                "use --attention kernel, or --kv-dtype auto")
        return torch.float32
    native = all(attn_kernel.bf16_cache_native(layer.attention.head_dim) for layer in engine.layers)
    if config.kv_dtype == "bfloat16" or (engine.weight_dtype == torch.bfloat16 and native):
        return torch.bfloat16
    return torch.float32


def _remember(measured: dict, key: str, info: dict, name: str) -> None:
    """Add a choice ``info[name]`` (with its timings ``info[name + "_us"]``) that was measured now to
    ``measured``, the records to cache."""
    if info[name + "_source"] == "measured":
        measured[key] = {name: info[name], f"{name}_us": info[f"{name}_us"], "machine": machine(),
                         "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


FINALISTS_WITHIN = 1.2  # candidates within this factor of the fastest step are timed again, in turn
FINAL_ROUNDS = 4


def _measure(backbone: Backbone, options: list[tuple[torch.dtype, str]], prepare):
    """Build and time every candidate (``prepare(engine)`` first gives it the attention it will run
    with); return ``(choice, its engine, {name: step ms})``.

    One pass of every candidate, then the finalists (within :data:`FINALISTS_WITHIN` of the fastest)
    again in alternating rounds, each scored by the median of its rounds: a 2-core machine's memory speed
    drifts within minutes, and two kernels measured minutes apart were ranked by the drift (on the
    Zen 4 machine, 2026-12-07, `q4_1_int8` won a single pass that `q4_1` wins interleaved, 4.4-4.8
    against 4.9-5.9 ms, with `ar` 15-20% faster on it in `kangaroo bench`)."""
    timings, engines = {}, {}
    for dtype, kernel in options:
        try:
            engine = FusedEngine(backbone, dtype, kernel)
        except (RuntimeError, NotImplementedError, ValueError) as exc:  # a kernel this build (or model) cannot run
            logger.info("skipping %s/%s: %s", dtype, kernel, str(exc).splitlines()[0])
            continue
        prepare(engine)
        name = f"{str(dtype).removeprefix('torch.')}/{kernel}"
        timings[name] = step_ms(engine)
        best = min(timings.values())
        engines[name] = ((dtype, kernel), engine)
        for other in [n for n, ms in timings.items() if ms > FINALISTS_WITHIN * best]:
            engines.pop(other, None)  # out of the running: free its weights now
    if not timings:
        raise KangarooError("no engine configuration could be built on this machine: use --engine eager")
    if len(engines) > 1:  # the first pass was minutes apart: only the alternating rounds decide
        rounds = {name: [] for name in engines}
        for _ in range(FINAL_ROUNDS):
            for name, (_, engine) in engines.items():
                rounds[name].append(step_ms(engine))
        timings.update({name: statistics.median(ms) for name, ms in rounds.items()})
    name = min(engines, key=timings.get)
    return engines[name][0], engines[name][1], {n: round(ms, 2) for n, ms in timings.items()}
