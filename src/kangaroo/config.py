"""Configuration dataclasses, with the paper's names and defaults in one commented block."""

from __future__ import annotations

from dataclasses import asdict, dataclass

DEFAULT_MODEL = "smollm2-135m-instruct"  # the embedded model (kangaroo.fetch) every command loads by default

#: most drafts one verification may carry: the step engine makes products and attention bit-exact
#: for up to 16 rows (kangaroo.kernels.MAX_ROWS), the last committed token included
MAX_DRAFT = 15


@dataclass(frozen=True)
class KangarooConfig:
    """How one Kangaroo decode runs (Liu et al. 2024, section 3).

    γ, η and the lookup settings default to what ``kangaroo tune`` chose for the shipped SmolLM2
    adapter on the fused engine with the q4_1 product (the GGUF file's own layers), drafting priced as rounds run it and the model calibrated by real decodes (AMD machine, 2026-11-27 20:05; docs/ENGINE.md §6); ``kangaroo tune``
    re-chooses them per machine and adapter. ``exit_layer`` is the adapter's own (its config overrides this one).
    """

    exit_layer: int = 2  # ℓ: layers run by the self-draft model before the adapter (first early exit)
    max_steps: int = 4  # γ: at most this many drafted tokens per round
    threshold: float = 0.3  # η: stop drafting once the draft's top-1 probability falls below this (second early exit)
    # also send the draft that fell below η for verification, as the authors' code does: every round
    # then verifies at least one draft. Off, since the shipped adapter is no faster with it
    # (measurements: docs/TRAINING.md).
    verify_low_confidence: bool = False
    # prompt lookup (greedy, and sampling with point-mass drafts): when the last n >= lookup_ngram committed tokens occurred earlier in
    # the prompt or the answer, the tokens that followed them are the round's draft (free: no layer
    # runs to make it), up to lookup_tokens of them; 0 = adapter drafts only
    lookup_tokens: int = 6
    lookup_ngram: int = 2
    # token trees (kangaroo.tree; the fused engine only): with a lookup proposal, the adapter still
    # drafts its chain as a second branch of the same tree instead of standing aside
    lookup_branch: bool = False
    # the adapter's candidates at the first draft position: the chain's token plus up to
    # tree_width - 1 siblings whose draft probability reaches tree_threshold (sampling: independent
    # draws); 1 = the paper's chain
    tree_width: int = 1
    tree_threshold: float = 0.1

    def __post_init__(self) -> None:
        from .errors import KangarooError

        if not 0 <= self.max_steps <= MAX_DRAFT:
            raise KangarooError(f"max_steps (γ) must be in 0..{MAX_DRAFT}, got {self.max_steps}")
        if not 0 <= self.lookup_tokens <= MAX_DRAFT:
            raise KangarooError(f"lookup_tokens must be in 0..{MAX_DRAFT}, got {self.lookup_tokens}")
        if not 1 <= self.lookup_ngram <= 3:
            raise KangarooError(f"lookup_ngram must be 1, 2 or 3, got {self.lookup_ngram}")
        if not 0.0 <= self.threshold <= 1.0:
            raise KangarooError(f"threshold (η) must be in [0, 1], got {self.threshold}")
        if not 1 <= self.tree_width <= 8:
            raise KangarooError(f"tree_width must be in 1..8, got {self.tree_width}")
        if not 0.0 <= self.tree_threshold <= 1.0:
            raise KangarooError(f"tree_threshold must be in [0, 1], got {self.tree_threshold}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class SamplingConfig:
    """How tokens are chosen: greedy (``temperature == 0``) or lossless speculative sampling.

    The target's and the draft's logits go through the same processing, in Hugging Face's order:
    temperature, then top-k, then top-p. Kangaroo sampling then draws exactly from the processed
    target distribution (Leviathan et al. 2023; Chen et al. 2023), whatever the adapter.
    """

    temperature: float = 0.0  # 0 = greedy: the existing lossless-greedy path, token-identical to argmax decoding
    top_p: float = 1.0  # nucleus: keep the smallest set of most likely tokens whose probability reaches top_p
    top_k: int = 0  # keep only the k most likely tokens (0 = all)
    seed: int | None = None  # seeds a fresh torch.Generator for every generation (None = a random seed)

    def __post_init__(self) -> None:
        from .errors import KangarooError

        if not self.temperature >= 0.0:  # also rejects NaN
            raise KangarooError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise KangarooError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise KangarooError(f"top_k must be >= 0 (0 = no top-k), got {self.top_k}")
        if self.seed is not None and not -(2**63) <= self.seed < 2**64:  # what torch.Generator accepts
            raise KangarooError(f"seed must fit in 64 bits, got {self.seed}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def to_dict(self) -> dict:
        return asdict(self)


ENGINES = ("auto", "fused", "eager")
DTYPES = ("auto", "float32", "bfloat16", "float16")
KERNEL_CHOICES = ("auto", "stock", "packed", "dpbf16", "q4_1", "q4_1_int8")
ATTENTIONS = ("auto", "kernel", "sdpa")
PREFILLS = ("auto", "exact")
KV_DTYPES = ("auto", "float32", "bfloat16")


@dataclass(frozen=True)
class EngineConfig:
    """How the target's steps run (``kangaroo.engine``); ``auto`` fields are measured on this machine
    and the choice is cached (``kangaroo.calibration``)."""

    engine: str = "auto"  # fused (lean steps, chosen kernels) where the architecture allows; eager = HF's modules
    dtype: str = "auto"  # weight dtype of the products; auto = the fastest plain decoding step here
    kernel: str = "auto"  # stock (F.linear), packed (oneDNN prepacked, CPU), dpbf16 (ours, AVX512-BF16 CPUs) q4_1 (a GGUF's own Q4_1 layers, AVX512-BF16 CPUs) or q4_1_int8 (the same on int8 activations, as llama.cpp computes them; AVX512-VNNI, AMX tiles where faster); auto = measured
    attention: str = "auto"  # steps of <= 16 rows: kernel (kangaroo.attention, CPU) or sdpa (per row); auto = measured
    # prompts (> 16 tokens, which no step re-computes): auto = int8-activation products (q4_1) and
    # bfloat16 attention tiles (bfloat16 weights) where measured faster; exact = the steps' own arithmetic
    prefill: str = "auto"
    # the KV cache's element type on the kernel attention: auto = bfloat16 for bfloat16 engines on
    # AVX512-BF16 CPUs (half the bytes per step; docs/ENGINE.md §4), else float32
    kv_dtype: str = "auto"
    device: str = "cpu"  # torch device
    threads: int | None = None  # torch CPU threads (None = torch's choice)

    def __post_init__(self) -> None:
        from .errors import KangarooError

        for name, value, allowed in (("engine", self.engine, ENGINES), ("dtype", self.dtype, DTYPES),
                                     ("kernel", self.kernel, KERNEL_CHOICES), ("attention", self.attention, ATTENTIONS),
                                     ("prefill", self.prefill, PREFILLS), ("kv_dtype", self.kv_dtype, KV_DTYPES)):
            if value not in allowed:
                raise KangarooError(f"unknown {name} {value!r}: use one of {', '.join(allowed)}")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise KangarooError(f"threads must be a positive integer, got {self.threads}")
        if not self.device.split(":")[0] in ("cpu", "cuda"):
            raise KangarooError(f"unsupported device {self.device!r}: use cpu or cuda")
        cuda = self.device.startswith("cuda")
        if not cuda and self.dtype == "float16":
            raise KangarooError("float16 runs on CUDA only: on cpu use float32, bfloat16 or auto")
        if cuda and self.kernel in ("packed", "dpbf16", "q4_1", "q4_1_int8"):
            raise KangarooError(f"the {self.kernel} kernel is CPU only: on cuda use --kernel stock or auto")
        if self.kernel in ("dpbf16", "q4_1", "q4_1_int8") and self.dtype not in ("auto", "bfloat16"):
            raise KangarooError(f"the {self.kernel} kernel computes with bfloat16 activations: use --dtype bfloat16 or auto, not {self.dtype}")
        if self.engine == "eager" and (self.kernel != "auto" or self.attention != "auto" or self.prefill != "auto"
                                       or self.kv_dtype != "auto"):
            raise KangarooError("--kernel, --attention, --prefill and --kv-dtype apply to the fused engine: drop them or use --engine fused")
        if cuda and self.attention == "kernel":
            raise KangarooError("the decode-attention kernel is CPU only: on cuda use --attention sdpa or auto")
        if self.kv_dtype == "bfloat16" and (cuda or self.attention == "sdpa"):
            raise KangarooError("a bfloat16 KV cache is read by the CPU decode-attention kernel: use --attention kernel or auto on cpu, or --kv-dtype auto")

    def check_device(self) -> None:
        """Raise unless the device exists in this torch build (called when a model is loaded)."""
        import torch

        from .errors import KangarooError

        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise KangarooError(f"device {self.device!r} is not available: this torch has no usable CUDA (use --device cpu)")

    def model_dtype(self) -> str:
        """The dtype to load the HF model in: float32 master weights on CPU (the fused engine makes
        its own product weights), else the asked dtype (bfloat16 for auto on CUDA)."""
        if self.engine == "eager" or self.device.startswith("cuda"):
            if self.dtype == "auto":
                return "bfloat16" if self.device.startswith("cuda") else "float32"
            return self.dtype
        return "float32"

    def to_dict(self) -> dict:
        return asdict(self)
