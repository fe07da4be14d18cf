"""The user-facing object: a model, its tokenizer and an adapter, ready to generate.

>>> from kangaroo import KangarooModel
>>> km = KangarooModel.from_pretrained()               # embedded SmolLM2-135M-Instruct + shipped adapter
>>> out = km.generate("Write a haiku about kangaroos.", max_new_tokens=64)
>>> out.text, out.result.compression_rate
>>> for delta in km.stream("Tell me a joke."): print(delta, end="", flush=True)
>>> km.generate("Tell me a story.", temperature=0.8, top_p=0.95, seed=1).text  # lossless sampling
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Callable, Iterator

import torch

from .adapter import Adapter, AdapterConfig, check_exit_layer
from .calibration import build_engine
from .config import DEFAULT_MODEL, EngineConfig, KangarooConfig, SamplingConfig
from .decoding import AutoregressiveDecoder, GenerationResult, KangarooDecoder, Step, collect
from .errors import KangarooError
from .loading import load_model, model_identity
from .model import Backbone
from .streaming import TextDeltas, text_deltas

logger = logging.getLogger(__name__)

RANDOM_ADAPTER = "random"

#: ``streamer(text, step)``, called by :meth:`KangarooModel.generate` after every round with the text
#: the round's tokens complete (may be empty) and its :class:`Step`, then once at the end with the
#: held-back tail and ``None``. Returning True stops the generation after that round.
Streamer = Callable[[str, "Step | None"], "bool | None"]


def shipped_adapter(model_name: str) -> Path | None:
    """The adapter folder shipped inside the package for ``model_name``, if any."""
    root = resources.files("kangaroo") / "adapters" / model_name.lower()
    path = Path(str(root))
    return path if (path / "adapter_config.json").is_file() else None


@dataclass
class Output:
    """Generated text plus the ids and statistics behind it."""

    text: str
    prompt_token_ids: list[int]
    result: GenerationResult


class KangarooModel:
    """A target model with a Kangaroo adapter.

    Args:
        model: a HF causal LM of a supported architecture.
        tokenizer: its tokenizer (with chat template, if it is a chat model).
        adapter: the adapter; ``adapter_config`` describes it (None for a random one).
        config: ℓ, γ, η.
        model_name: display name recorded in outputs.
        engine_config: how the target's steps run (default: fused steps, dtype and kernel measured
            on this machine, see :mod:`kangaroo.calibration`).
        backbone: the model's :class:`~kangaroo.model.Backbone`, if already built.
    """

    def __init__(self, model, tokenizer, adapter: Adapter, config: KangarooConfig, model_name: str,
                 adapter_config: AdapterConfig | None = None, adapter_source: str = RANDOM_ADAPTER,
                 engine_config: EngineConfig | None = None, backbone: Backbone | None = None) -> None:
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.model_name = model_name
        self.backbone = backbone if backbone is not None else Backbone(model)  # HF's modules: the eager reference
        self.engine_config = engine_config or EngineConfig(device=str(self.backbone.device))
        self.engine, self.engine_info = build_engine(self.backbone, self.engine_config)
        self.adapter, self.adapter_config, self.adapter_source = adapter, adapter_config, adapter_source
        self.decoder = KangarooDecoder(self.engine, adapter, config)
        self.config_source = "given"  # or "default" / "tuned <date>" (from_pretrained)
        self.baseline = AutoregressiveDecoder(self.engine)
        self.eos_token_ids = _eos_ids(model, tokenizer)

    @property
    def adapter_is_random(self) -> bool:
        return self.adapter_source == RANDOM_ADAPTER

    @classmethod
    def from_pretrained(
        cls,
        model: str = DEFAULT_MODEL,
        adapter: str | None = None,
        exit_layer: int | None = None,
        max_steps: int | None = None,
        threshold: float | None = None,
        dtype: torch.dtype | str = EngineConfig.dtype,
        device: str = EngineConfig.device,
        seed: int = 0,
        verify_low_confidence: bool | None = None,
        engine: str = EngineConfig.engine,
        kernel: str = EngineConfig.kernel,
        attention: str = EngineConfig.attention,
        prefill: str = EngineConfig.prefill,
        kv_dtype: str = EngineConfig.kv_dtype,
        threads: int | None = EngineConfig.threads,
        lookup_tokens: int | None = None,
        lookup_ngram: int | None = None,
        tree_width: int | None = None,
        tree_threshold: float | None = None,
        lookup_branch: bool | None = None,
        tuned: bool = True,
    ) -> "KangarooModel":
        """Load a model and an adapter.

        Args:
            model: embedded name (default ``smollm2-135m-instruct``), local folder, ``.gguf`` file or hub id.
            adapter: adapter folder; None = the adapter shipped for ``model`` if any, else a seeded
                random adapter (logged as a warning); ``"random"`` = always the random adapter.
            exit_layer: ℓ; None = the adapter's own (2 for a random adapter).
            max_steps: γ. threshold: η. lookup_tokens / lookup_ngram: prompt-lookup drafts;
                tree_width / tree_threshold / lookup_branch: token trees (see
                :class:`~kangaroo.config.KangarooConfig`). Each left at None takes the value ``kangaroo
                tune`` chose for this machine, engine, model and adapter (when ``tuned`` and it ran),
                else the :class:`~kangaroo.config.KangarooConfig` default; :attr:`config_source` says which.
            verify_low_confidence: also verify the draft that fell below η (None: tuned, as above).
            dtype: weight dtype of the steps, ``"auto"`` (the fastest here, measured once and cached),
                ``torch.float32``/``bfloat16``/``float16`` or their names.
            engine: ``"fused"`` (lean steps), ``"eager"`` (HF's modules) or ``"auto"`` (fused).
            kernel: product kernel of the fused engine (``"stock"``, ``"packed"``, ``"dpbf16"``, ``"q4_1"``
                for a GGUF model with Q4_1 layers, or ``"auto"``: measured, see :mod:`kangaroo.calibration`).
            attention: the fused engine's attention for steps of up to 16 rows (``"kernel"``, ``"sdpa"``,
                ``"auto"``; see :mod:`kangaroo.attention`).
            prefill: how the fused engine computes prompts of more than 16 tokens: ``"auto"`` (int8
                products on ``q4_1`` and bfloat16 attention tiles on bfloat16 weights, where measured
                faster) or ``"exact"`` (the decoding steps' arithmetic); see docs/ENGINE.md §3.
            kv_dtype: the fused engine's KV cache on the kernel attention: ``"float32"``, ``"bfloat16"``
                or ``"auto"`` (bfloat16 for bfloat16 engines on AVX512-BF16 CPUs); docs/ENGINE.md §4.
            threads: torch CPU threads (None = torch's choice).
        """
        engine_config = EngineConfig(engine=engine, dtype=_dtype_name(dtype), kernel=kernel, attention=attention, prefill=prefill,
                                     kv_dtype=kv_dtype, device=device, threads=threads)
        engine_config.check_device()
        if threads is not None:
            torch.set_num_threads(threads)
        hf_model, tokenizer = load_model(model, dtype=_dtype(engine_config.model_dtype()), device=device)
        backbone = Backbone(hf_model)
        name = model_identity(model)
        source = adapter
        if adapter is None:
            shipped = shipped_adapter(name)
            source = str(shipped) if shipped is not None else RANDOM_ADAPTER
            if shipped is None:
                logger.warning("no trained adapter for %s: using a seeded random adapter (expect few accepted drafts)", name)
        if source == RANDOM_ADAPTER:
            ℓ = 2 if exit_layer is None else exit_layer
            check_exit_layer(ℓ, backbone.num_layers)
            module, adapter_config = Adapter.random(backbone, ℓ, seed=seed), None
        else:
            module, adapter_config = Adapter.load(source, backbone, exit_layer)
            ℓ = adapter_config.exit_layer
        given = {"max_steps": max_steps, "threshold": threshold, "lookup_tokens": lookup_tokens, "lookup_ngram": lookup_ngram,
                 "tree_width": tree_width, "tree_threshold": tree_threshold, "lookup_branch": lookup_branch,
                 "verify_low_confidence": verify_low_confidence}
        config = KangarooConfig(exit_layer=ℓ, **{k: v for k, v in given.items() if v is not None})
        km = cls(hf_model, tokenizer, module, config, name, adapter_config, source, engine_config, backbone)
        km.config_source = "given" if all(v is not None for v in given.values()) else "default"
        if tuned and km.config_source == "default":
            km.apply_tuned({k for k, v in given.items() if v is None})
        return km

    def apply_tuned(self, fields: set[str]) -> None:
        """Take ``fields`` from the setting ``kangaroo tune`` saved for this machine, engine, model
        and adapter, if there is one."""
        from dataclasses import replace

        from .tune import load_tuned

        record = load_tuned(self)
        if not record:
            return
        values = {k: v for k, v in record["config"].items() if k in fields}
        self.config = replace(self.config, **values)
        self.decoder = KangarooDecoder(self.engine, self.adapter, self.config)
        self.config_source = f"tuned {record['measured_at']}"

    def keep_prompts(self, slots: int) -> None:
        """Keep up to ``slots`` previous prompts in each decoder (1 by default): a prompt that begins
        with one of them prefills only the rest (:class:`~kangaroo.decoding.PromptCache`, exact). A
        server whose clients take turns wants one per conversation; each holds a KV cache as long as
        its conversation."""
        from .decoding import PromptCache

        for decoder in (self.decoder, self.baseline):
            decoder.kept = PromptCache(self.engine.num_layers, slots)

    # ------------------------------------------------------------------ prompts
    def encode(self, prompt: str | list[dict] | torch.Tensor | list[int], chat: bool | None = None) -> torch.Tensor:
        """Prompt -> ``[1, n]`` ids. Strings go through the chat template when ``chat`` (default:
        when the tokenizer has one); a list of ``{"role", "content"}`` messages always does."""
        if isinstance(prompt, torch.Tensor):
            ids = prompt.reshape(1, -1)
        elif isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            ids = torch.tensor([prompt], dtype=torch.long)
        else:
            messages = prompt if isinstance(prompt, list) else None
            bad = next((m for m in messages or [] if not (isinstance(m, dict) and {"role", "content"} <= m.keys())), None)
            if bad is not None:
                raise KangarooError(f"a prompt list holds token ids or chat messages ({{'role': ..., 'content': ...}}), not {bad!r:.60}")
            if messages is None and not str(prompt).strip():
                raise KangarooError("empty prompt: give some text")
            use_chat = messages is not None or (chat if chat is not None else self.has_chat_template)
            if use_chat:
                if not self.has_chat_template:
                    raise KangarooError(f"{self.model_name} has no chat template: use --no-chat")
                messages = messages or [{"role": "user", "content": prompt}]
                text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
                ids = self.tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
            else:
                ids = self.tokenizer(prompt, return_tensors="pt").input_ids
        if ids.numel() == 0:
            raise KangarooError("empty prompt: it encodes to no tokens")
        return ids.to(self.backbone.device)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    # ------------------------------------------------------------------ generation
    # Sampling: pass ``sampling=SamplingConfig(...)`` or the keywords ``temperature``, ``top_p``,
    # ``top_k``, ``seed`` (they override ``sampling``'s fields). Temperature 0 (the default) is greedy.
    def steps(self, prompt, max_new_tokens: int = 128, chat: bool | None = None, kangaroo: bool = True,
              sampling: SamplingConfig | None = None, **sampling_kw) -> Iterator[Step]:
        """Per-round :class:`Step` iterator (Kangaroo, or the autoregressive baseline)."""
        ids = self.encode(prompt, chat)
        decoder = self.decoder if kangaroo else self.baseline
        return decoder.stream(ids, max_new_tokens, self.eos_token_ids, sampling_config(sampling, **sampling_kw))

    def generate(self, prompt, max_new_tokens: int = 128, chat: bool | None = None, kangaroo: bool = True,
                 sampling: SamplingConfig | None = None, streamer: Streamer | None = None, **sampling_kw) -> Output:
        """Generate (greedy unless a temperature > 0 is given); ``kangaroo=False`` runs the plain
        autoregressive loop instead. Sampling with a ``seed`` is reproducible.

        Args:
            sampling: a :class:`SamplingConfig`; keywords ``temperature``, ``top_p``, ``top_k`` and
                ``seed`` override its fields.
            streamer: called with each round's text delta and :class:`Step` as the round is
                accepted, then with the tail and None (see :data:`Streamer`); returning True stops
                early, and the output then holds the rounds so far.
        """
        ids = self.encode(prompt, chat)
        steps = self.steps(ids, max_new_tokens, chat, kangaroo, sampling, **sampling_kw)
        if streamer is not None:
            steps = _streamed(steps, TextDeltas(self.tokenizer), streamer)
        result = collect(steps, ids.shape[1], self.backbone)
        return Output(self.decode(result.token_ids), ids[0].tolist(), result)

    def stream(self, prompt, max_new_tokens: int = 128, chat: bool | None = None,
               sampling: SamplingConfig | None = None, **sampling_kw) -> Iterator[str]:
        """Yield text deltas as each round's tokens are accepted (sampling as in :meth:`generate`)."""
        steps = self.steps(prompt, max_new_tokens, chat, sampling=sampling, **sampling_kw)
        yield from text_deltas(self.tokenizer, (step.tokens for step in steps))

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)


def _streamed(steps: Iterator[Step], deltas: TextDeltas, streamer: Streamer) -> Iterator[Step]:
    """Pass ``steps`` on, telling ``streamer`` each one's text; stop (closing ``steps``) when it says so."""
    with contextlib.closing(steps):
        for step in steps:
            yield step
            if streamer(deltas.push(step.tokens), step):
                return
    streamer(deltas.flush(), None)


def sampling_config(sampling: SamplingConfig | None = None, **overrides) -> SamplingConfig | None:
    """``sampling`` with the given fields (``temperature``, ``top_p``, ``top_k``, ``seed``) replaced.

    Raises:
        KangarooError: an unknown keyword or an out-of-range value.
    """
    fields = set(SamplingConfig.__dataclass_fields__)
    unknown = set(overrides) - fields
    if unknown:
        raise KangarooError(f"unknown sampling option(s) {', '.join(sorted(unknown))}: use {', '.join(sorted(fields))}")
    overrides = {k: v for k, v in overrides.items() if v is not None or k == "seed"}
    if not overrides:
        return sampling
    base = sampling.to_dict() if sampling is not None else {}
    return SamplingConfig(**{**base, **overrides})


def _eos_ids(model, tokenizer) -> set[int]:
    ids: set[int] = set()
    for value in (getattr(model.generation_config, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif value:
            ids.update(int(v) for v in value)
    return ids


def _dtype_name(dtype: torch.dtype | str) -> str:
    """A dtype or its name (``fp32``, ``bf16`` ... accepted) -> ``auto``/``float32``/``bfloat16``/``float16``."""
    if isinstance(dtype, str) and dtype == "auto":
        return dtype
    return str(_dtype(dtype)).removeprefix("torch.")


def _dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in names:
        raise KangarooError(f"unknown dtype '{dtype}': use one of {', '.join(names)}")
    return names[dtype]
