"""Kangaroo as a ``transformers`` decoding method: ``model.generate(..., custom_generate=kangaroo_generate)``.

>>> from kangaroo.hf_generate import kangaroo_generate
>>> out = model.generate(ids, max_new_tokens=64, custom_generate=kangaroo_generate,
...                      kangaroo_adapter="path/to/adapter")          # or an Adapter object
>>> # out: [1, n + new] ids, identical to greedy decoding on the same engine

Greedy, batch size 1. Decoding runs on the step engine (``kangaroo_engine``, an
:class:`~kangaroo.config.EngineConfig`; default: fused steps in the model's own dtype, kernel
measured), so its output is identical to plain greedy decoding on that engine; with
``EngineConfig(engine="eager")`` it runs HF's own modules and equals ``model.generate(do_sample=False)``. transformers hands the callable the prepared ``generation_config`` (so
``max_new_tokens``/``max_length`` and ``eos_token_id`` are honoured) and any keyword that its own
``_sample`` does not take: here ``kangaroo_adapter``, ``kangaroo_config``, ``kangaroo_engine`` and ``streamer``.
"""

from __future__ import annotations

import weakref

import torch

from .adapter import Adapter
from .calibration import build_engine
from .config import EngineConfig, KangarooConfig
from .decoding import KangarooDecoder
from .errors import KangarooError
from .model import Backbone

_ENGINES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> {engine config: (backbone, engine)}


def kangaroo_generate(
    model,
    input_ids: torch.LongTensor,
    logits_processor=None,
    stopping_criteria=None,
    generation_config=None,
    kangaroo_adapter: Adapter | str | None = None,
    kangaroo_config: KangarooConfig | None = None,
    kangaroo_engine: EngineConfig | None = None,
    streamer=None,
    **model_kwargs,
) -> torch.LongTensor:
    """Greedy Kangaroo decoding inside ``model.generate``; returns ``[1, n + new]`` ids.

    Args:
        kangaroo_adapter: an :class:`~kangaroo.adapter.Adapter` or an adapter folder (required).
        kangaroo_config: γ and η (ℓ is taken from the adapter); default ``KangarooConfig()`` values.
        kangaroo_engine: how the target's steps run (default: fused, in the model's dtype).
        streamer: a transformers streamer (``put``/``end``), fed each round's accepted tokens.
    """
    if getattr(generation_config, "do_sample", False):
        raise KangarooError("kangaroo_generate is greedy: call generate with do_sample=False")
    if input_ids.shape[0] != 1:
        raise KangarooError("kangaroo_generate supports batch size 1")
    mask = model_kwargs.get("attention_mask")
    if mask is not None and not bool(mask.all()):
        raise KangarooError("kangaroo_generate does not support padded inputs")
    if kangaroo_adapter is None:
        raise KangarooError("pass kangaroo_adapter= (an Adapter or an adapter folder) to generate")
    device = str(input_ids.device)
    engine_config = kangaroo_engine or EngineConfig(dtype=str(model.dtype).removeprefix("torch."), device=device)
    built = _ENGINES.setdefault(model, {})
    if engine_config not in built:
        backbone = Backbone(model)
        built[engine_config] = (backbone, build_engine(backbone, engine_config)[0])
    backbone, engine = built[engine_config]
    adapter = kangaroo_adapter
    if not isinstance(adapter, Adapter):
        adapter, _ = Adapter.load(adapter, backbone)
    base = kangaroo_config or KangarooConfig(exit_layer=adapter.exit_layer)
    config = KangarooConfig(exit_layer=adapter.exit_layer, max_steps=base.max_steps, threshold=base.threshold,
                            verify_low_confidence=base.verify_low_confidence)
    n = input_ids.shape[1]
    max_new = generation_config.max_new_tokens
    if max_new is None:
        max_new = generation_config.max_length - n
    eos = generation_config.eos_token_id
    eos_ids = set() if eos is None else {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])}
    new: list[int] = []
    if streamer is not None:
        streamer.put(input_ids.cpu())
    for step in KangarooDecoder(engine, adapter, config).stream(input_ids, max_new, eos_ids):
        new.extend(step.tokens)
        if streamer is not None:
            streamer.put(torch.tensor(step.tokens))
    if streamer is not None:
        streamer.end()
    return torch.cat([input_ids, torch.tensor([new], dtype=input_ids.dtype, device=input_ids.device)], dim=1)
