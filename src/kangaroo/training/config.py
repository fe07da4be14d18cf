"""Training configuration: every default in one commented block (torch-free, so the CLI stays light)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config import DEFAULT_MODEL


@dataclass
class TrainConfig:
    """Everything a run depends on; saved in every checkpoint and in the adapter config."""

    model: str = DEFAULT_MODEL
    data: list[str] = field(default_factory=list)  # files or folders (jsonl/json), or hf:<dataset>
    out: str = "runs/adapter"
    exit_layer: int = 2  # ℓ
    # optimisation (the authors: AdamW β=(0.9, 0.95), clip 0.5; lr is higher here: a tiny adapter, few steps)
    epochs: int = 1
    max_steps: int | None = None  # stop after this many optimiser steps (overrides epochs' end)
    lr: float = 1e-3
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1  # cosine decay ends at lr * min_lr_ratio
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 0.5
    batch_tokens: int = 4096  # padded tokens per batch (per process)
    seq_len: int = 512  # longer conversations are cut
    precision: str = "fp32"  # fp32 | bf16 (bf16: model weights in bf16, adapter fp32 under autocast)
    top_k: int = 32  # target probabilities kept per position
    # the training target is (1 - w) * p̃ + w * onehot(argmax p): 0 = the paper's soft cross-entropy;
    # w > 0 pulls the draft's top-1 towards the target's, which is what greedy acceptance needs
    hard_weight: float = 0.0
    init: str = "warm"  # warm: from target layer ℓ's attention; random
    kv_heads: int | None = None  # adapter key/value heads (None = the target's layout; = heads: full MHA)
    adapter_mlp: int = 0  # inner size of a residual MLP after the adapter's attention (0 = the paper's adapter)
    # the exported adapter drafts over the N tokens most frequent in the training targets (the model's
    # own answers with --self-distill); 0, or N at least half the vocabulary, = the whole LM head
    draft_vocab: int = 8192
    # data
    max_conversations: int | None = None  # training conversations, taken in a fixed seeded order
    val_size: int = 64  # held-out conversations
    # a fixed validation set read from these files/folders instead of split off --data (val_size
    # is then ignored): the same held-out prompts for runs on different training data
    val_data: list[str] = field(default_factory=list)
    self_distill: bool = False
    distill_cache: str | None = None  # answer cache folder (None = $KANGAROO_CACHE/distill, else ~/.cache/kangaroo/distill)
    distill_max_new_tokens: int = 192
    distill_max_prompt_tokens: int = 256
    distill_batch: int = 64
    distill_only: bool = False  # generate the self-distillation cache, then stop
    distill_cached_only: bool = False  # train on the conversations already answered in the cache, generate none
    # bookkeeping
    val_every: int = 100
    save_every: int = 100
    keep: int = 2  # last checkpoints kept (plus the best)
    log_every: int = 10
    feature_cache_gb: float = 4.0  # RAM for features reused by later epochs (0 = recompute every epoch)
    seed: int = 0
    threads: int | None = None
    resume: bool = False
    progress: bool = True
    chunk: int = 1024  # positions per LM-head chunk (bounds memory at chunk x vocab floats)
