"""The Kangaroo adapter: the only trained part of the self-draft model.

``A(h) = RMSNorm_2(h + Attn(RMSNorm_1(h)))`` over exit-layer hidden states ``h`` (``[B, T, D]``),
followed by the target's own LM head. The attention is built from the target's own HF attention
class (same head layout, same RoPE), with its own KV cache; the norms from the target's RMSNorm
class. Nothing is copied from the target at run time: for SmolLM2-135M that is 885,888 parameters
(0.66% of the model). With ``mlp_hidden = I > 0`` a residual SiLU-gated MLP follows the attention,
``x = h + Attn(·)``, ``A(h) = RMSNorm_2(x + W_down(silu(W_g n) * W_u n))`` with ``n = RMSNorm_3(x)``
(``I = 2 D`` for SmolLM2-135M: 2,877,120 parameters, 2.1%; it agreed with the target more than
the paper's adapter, a second attention layer or a wider head layout at the same data and steps,
docs/TRAINING.md).

On disk an adapter is a folder with ``adapter.safetensors`` and ``adapter_config.json``; the
config records which model and exit layer it was made for, and loading checks both.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F

from .errors import KangarooError
from .model import Backbone

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "adapter.safetensors"
DRAFT_VOCAB_KEY = "draft_vocab"  # int64 token ids in adapter.safetensors, when the adapter has a draft vocabulary
CONFIG_NAME = "adapter_config.json"
FORMAT_VERSION = 1


@dataclass
class AdapterConfig:
    """Saved beside the weights; says what the adapter was made for."""

    base_model: str  # display name of the target (embedded name, hub id or path)
    exit_layer: int  # ℓ: the adapter reads hidden states after decoder layer ℓ (1-based count of layers run)
    fingerprint: dict  # Backbone.fingerprint() of the target
    dtype: str = "float32"  # dtype the weights were saved in
    format_version: int = FORMAT_VERSION
    training: dict = field(default_factory=dict)  # training config, data and final metrics (kangaroo train)
    kv_heads: int | None = None  # adapter attention's key/value heads (None = the target's own layout)
    mlp_hidden: int = 0  # inner size of the adapter's residual MLP after the attention (0 = none, the paper's adapter)
    draft_vocab: dict | None = None  # the draft head's token subset: {"size", "source"} (None = full LM head)


class Adapter(nn.Module):
    """RMSNorm -> self-attention (target's class, RoPE, own KV cache) -> residual -> RMSNorm.

    Args:
        backbone: the target, whose attention/norm classes and config the adapter reuses.
        exit_layer: ℓ, the number of target layers run before the adapter.
        kv_heads: key/value heads of the adapter's attention; None keeps the target's (grouped-query)
            layout, ``num_attention_heads`` gives full multi-head attention as in the paper's
            Vicuna adapter (for SmolLM2-135M: 1,328,256 parameters, 0.99% of the model).
        mlp_hidden: inner size of a residual SiLU-gated MLP after the attention (0 = none).
    """

    def __init__(self, backbone: Backbone, exit_layer: int, kv_heads: int | None = None, mlp_hidden: int = 0) -> None:
        super().__init__()
        check_exit_layer(exit_layer, backbone.num_layers)
        if kv_heads is not None:
            check_kv_heads(kv_heads, backbone.config.num_attention_heads)
        if not isinstance(mlp_hidden, int) or mlp_hidden < 0:
            raise KangarooError(f"adapter mlp_hidden must be an integer >= 0, got {mlp_hidden!r}")
        self.kv_heads = kv_heads
        self.exit_layer = exit_layer
        self.mlp_hidden = mlp_hidden
        self.input_norm = backbone.new_norm()
        self.self_attn = backbone.new_attention(kv_heads)
        self.post_norm = backbone.new_norm()
        if mlp_hidden:
            d = backbone.config.hidden_size
            self.mlp_norm = backbone.new_norm()
            self.gate_up = nn.Linear(d, 2 * mlp_hidden, bias=False)  # [gate; up] rows
            self.down = nn.Linear(mlp_hidden, d, bias=False)
        # token ids the draft head scores (sorted; None = the whole LM head): drafting over the most
        # frequent tokens only costs a fraction of the LM head, and verification keeps every token
        self.register_buffer("draft_vocab", None, persistent=False)

    def forward(self, hidden: torch.Tensor, backbone: Backbone, cache, pos: int) -> torch.Tensor:
        """Adapter over exit-layer states ``hidden`` ``[B, T, D]`` at positions ``pos..pos+T-1``.

        ``cache`` is a one-layer :class:`~kangaroo.kv_cache.KVCache` (or None for teacher-forced
        training over whole sequences). Returns normalised states ``[B, T, D]`` ready for the LM head.
        """
        rope = backbone.position_embeddings(hidden, pos)
        mask = backbone.attention_mask(hidden.shape[1], pos, None, hidden.dtype, hidden.device)
        attn_out = self.self_attn(
            hidden_states=self.input_norm(hidden),
            position_embeddings=rope,
            attention_mask=mask,
            **backbone.cache_kwargs(cache),
        )[0]
        x = hidden + attn_out
        if self.mlp_hidden:
            gate, up = self.gate_up(self.mlp_norm(x)).chunk(2, dim=-1)
            x = x + self.down(F.silu(gate) * up)
        return self.post_norm(x)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ------------------------------------------------------------------ construction
    @classmethod
    def random(cls, backbone: Backbone, exit_layer: int, seed: int = 0, kv_heads: int | None = None,
               mlp_hidden: int = 0) -> "Adapter":
        """A seeded, untrained adapter (demo and tests): small random attention (and MLP), unit norms."""
        gen = torch.Generator().manual_seed(seed)
        adapter = cls(backbone, exit_layer, kv_heads, mlp_hidden)
        std = getattr(backbone.config, "initializer_range", 0.02)
        with torch.no_grad():
            for name, p in adapter.named_parameters():
                if p.dim() == 2:
                    p.copy_(torch.randn(p.shape, generator=gen) * std)
                elif "norm" not in name:
                    p.zero_()
        return adapter.to(device=backbone.device, dtype=backbone.dtype).eval()

    @classmethod
    def from_backbone(cls, backbone: Backbone, exit_layer: int, kv_heads: int | None = None) -> "Adapter":
        """Warm start for training: attention and input norm copied from target layer ``exit_layer``,
        output norm from the target's final norm, so the adapter starts as a one-layer shortcut
        through the target rather than from noise. With more ``kv_heads`` than the target has, each
        key/value head is repeated for its query group (the same function as the grouped layout)."""
        adapter = cls(backbone, exit_layer, kv_heads)
        source = backbone.layers[min(exit_layer, backbone.num_layers - 1)]
        theirs = backbone.config.num_key_value_heads
        state = repeat_kv_heads(dict(source.self_attn.state_dict()), theirs, kv_heads or theirs)
        with torch.no_grad():
            adapter.self_attn.load_state_dict(state)
            adapter.input_norm.load_state_dict(source.input_layernorm.state_dict())
            adapter.post_norm.load_state_dict(backbone.norm.state_dict())
        return adapter.to(device=backbone.device, dtype=backbone.dtype)

    def add_mlp(self, backbone: Backbone, mlp_hidden: int, seed: int = 0) -> "Adapter":
        """The same adapter with a residual MLP of ``mlp_hidden`` inner units whose new units have a
        zero output projection, so it computes exactly what it did (training continues a trained
        adapter this way). Without an MLP, one is added; with a narrower one, it is widened: its
        units keep their weights and the new ones are appended. New gate/up rows start small and
        random (seeded)."""
        old = self.mlp_hidden
        if mlp_hidden <= old:
            raise ValueError(f"add_mlp widens: the adapter has {old} MLP units, asked for {mlp_hidden}")
        wider = type(self)(backbone, self.exit_layer, self.kv_heads, mlp_hidden)
        state = self.state_dict()
        gen = torch.Generator().manual_seed(seed)
        std = getattr(backbone.config, "initializer_range", 0.02)
        fresh = torch.randn(wider.gate_up.weight.shape, generator=gen) * std  # [2 I', D]: gate rows, then up rows
        down = torch.zeros(wider.down.weight.shape)  # [D, I']
        if old:  # the trained units stay where the SiLU gate pairs them: gate i with up i, down column i
            gate, up = state["gate_up.weight"].float().split(old)
            fresh[:old], fresh[mlp_hidden:mlp_hidden + old] = gate, up
            down[:, :old] = state["down.weight"].float()
        else:
            state["mlp_norm.weight"] = wider.mlp_norm.weight.detach().clone()
        state["gate_up.weight"], state["down.weight"] = fresh, down
        wider.load_state_dict(state)
        wider.draft_vocab = self.draft_vocab
        return wider.to(device=self.input_norm.weight.device, dtype=self.input_norm.weight.dtype)

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str | os.PathLike, config: AdapterConfig) -> Path:
        """Write ``adapter.safetensors`` + ``adapter_config.json`` atomically into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        if self.draft_vocab is not None:
            state[DRAFT_VOCAB_KEY] = self.draft_vocab.detach().long().cpu().contiguous()
        elif config.draft_vocab is not None:
            raise KangarooError("adapter config names a draft vocabulary but the adapter has none")
        config = AdapterConfig(**{**asdict(config), "dtype": str(next(self.parameters()).dtype).removeprefix("torch.")})
        _atomic_write(directory / WEIGHTS_NAME, lambda p: save_file(state, str(p), metadata={"format": "pt"}))
        _atomic_write(directory / CONFIG_NAME, lambda p: p.write_text(json.dumps(asdict(config), indent=2) + "\n"))
        return directory

    @classmethod
    def load(
        cls, path: str | os.PathLike, backbone: Backbone, exit_layer: int | None = None
    ) -> tuple["Adapter", AdapterConfig]:
        """Load an adapter folder and check it was made for ``backbone`` (and ``exit_layer`` if given).

        Raises:
            KangarooError: missing or corrupt files, or an adapter made for another model or exit layer.
        """
        path = Path(path).expanduser()
        if path.is_file():
            path = path.parent
        weights, cfg_file = path / WEIGHTS_NAME, path / CONFIG_NAME
        if not path.exists():
            raise KangarooError(f"adapter not found: {path}")
        if not weights.is_file() or not cfg_file.is_file():
            raise KangarooError(f"not an adapter folder: {path} (needs {WEIGHTS_NAME} and {CONFIG_NAME})")
        try:
            raw = json.loads(cfg_file.read_text())
            config = AdapterConfig(**raw)
        except (json.JSONDecodeError, TypeError, UnicodeDecodeError) as exc:
            raise KangarooError(f"corrupt adapter config {cfg_file}: {exc}") from None
        check_compatible(config, backbone, str(path))
        if exit_layer is not None and exit_layer != config.exit_layer:
            raise KangarooError(
                f"adapter {path} was trained for exit layer {config.exit_layer}, not {exit_layer}: "
                f"drop --exit-layer or pass --exit-layer {config.exit_layer}"
            )
        try:
            state = load_file(str(weights))
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise KangarooError(f"corrupt adapter weights {weights}: {str(exc).splitlines()[0]}") from None
        try:
            adapter = cls(backbone, config.exit_layer, config.kv_heads, config.mlp_hidden)
        except KangarooError as exc:
            raise KangarooError(f"corrupt adapter config {cfg_file}: {exc}") from None
        vocab = state.pop(DRAFT_VOCAB_KEY, None)
        if (vocab is None) != (config.draft_vocab is None):
            raise KangarooError(f"adapter {path}: the draft vocabulary in {CONFIG_NAME} and {WEIGHTS_NAME} disagree")
        expected = {k: v.shape for k, v in adapter.state_dict().items()}
        found = {k: v.shape for k, v in state.items()}
        if expected != found:
            raise KangarooError(f"adapter weights {weights} do not fit this model's layout (tensor names or shapes differ)")
        adapter.load_state_dict(state)
        if vocab is not None:
            adapter.draft_vocab = check_draft_vocab(vocab, backbone.config.vocab_size, str(weights))
        return adapter.to(device=backbone.device, dtype=backbone.dtype).eval(), config


class EarlyExitHead(nn.Module):
    """No adapter at all: draft with ``lm_head(final_norm(h_ℓ))`` (LayerSkip-style self-speculation).

    A baseline for benchmarks; it has no cache, so the drafter keeps no state for it.
    """

    stateless = True

    def __init__(self, exit_layer: int) -> None:
        super().__init__()
        self.exit_layer = exit_layer

    def forward(self, hidden: torch.Tensor, backbone: Backbone, cache=None, pos: int = 0) -> torch.Tensor:
        return backbone.final_norm(hidden)


def check_draft_vocab(vocab: torch.Tensor, vocab_size: int, where: str) -> torch.Tensor:
    """A draft vocabulary must be distinct sorted token ids of this model; returns it as int64."""
    vocab = vocab.long()
    if (vocab.dim() != 1 or vocab.numel() == 0 or int(vocab.min()) < 0 or int(vocab.max()) >= vocab_size
            or (vocab.numel() > 1 and not bool((vocab[1:] > vocab[:-1]).all()))):
        raise KangarooError(f"corrupt draft vocabulary in {where}: expected sorted distinct ids below {vocab_size}")
    return vocab


def repeat_kv_heads(state: dict, kv_heads: int, wanted: int) -> dict:
    """An attention state dict with ``kv_heads`` key/value heads widened to ``wanted``: each head is
    repeated for the query group it served, so the attention computes the same function. Keys
    ending in ``k_proj.*`` / ``v_proj.*`` are widened, the rest kept."""
    if wanted == kv_heads:
        return state
    if wanted % kv_heads:
        raise KangarooError(f"widening key/value heads needs a multiple of {kv_heads}, got {wanted}")
    out = dict(state)
    for name in [k for k in state if k.split(".")[-2] in ("k_proj", "v_proj")]:
        w = state[name]
        out[name] = w.reshape(kv_heads, -1, *w.shape[1:]).repeat_interleave(wanted // kv_heads, 0).flatten(0, 1)
    return out


def check_exit_layer(exit_layer: int, num_layers: int) -> None:
    """ℓ must leave at least one target layer for verification: ``1 <= ℓ < L``."""
    if not isinstance(exit_layer, int) or not 1 <= exit_layer < num_layers:
        raise KangarooError(f"exit layer {exit_layer} out of range: this model has {num_layers} layers, use 1..{num_layers - 1}")


def check_kv_heads(kv_heads: int, num_heads: int) -> None:
    """The adapter's key/value heads must divide its ``num_heads`` query heads."""
    if not isinstance(kv_heads, int) or kv_heads < 1 or num_heads % kv_heads:
        raise KangarooError(f"adapter kv_heads must divide the {num_heads} attention heads, got {kv_heads}")


def check_compatible(config: AdapterConfig, backbone: Backbone, where: str) -> None:
    """Raise unless ``config`` was made for ``backbone`` (same architecture numbers and embeddings)."""
    mine, theirs = backbone.fingerprint(), dict(config.fingerprint)
    probe_theirs = theirs.pop("embedding_probe", None)
    probe_mine = mine.pop("embedding_probe")
    diffs = [f"{k} {theirs.get(k)} != {v}" for k, v in mine.items() if theirs.get(k) != v]
    if diffs:
        raise KangarooError(f"adapter {where} was made for another model ({config.base_model}): {'; '.join(diffs)}")
    if probe_theirs is not None and not all(
        math.isclose(a, b, rel_tol=1e-2, abs_tol=1e-3) for a, b in zip(probe_theirs, probe_mine)
    ):
        raise KangarooError(
            f"adapter {where} was made for another model ({config.base_model}): same shape, different embedding weights"
        )


def _atomic_write(target: Path, write) -> None:
    """Write through a temporary file in the same folder, then rename over ``target``."""
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp makes 0600 files; others may need to read an adapter
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()
