"""``kangaroo train``: train a Kangaroo adapter for a model.

Examples::

    kangaroo train --data ../shared/data/train --exit-layer 2 --out runs/l2
    kangaroo train --data chats.jsonl --self-distill --precision bf16 --max-steps 2000 --out runs/sd
    kangaroo train --data chats.jsonl --out runs/sd --resume          # continue after a crash
    accelerate launch -m kangaroo.cli train --data ... --out ...     # many GPUs, unchanged

Module-level imports stay light: ``kangaroo --help`` imports this module.
"""

from __future__ import annotations

import argparse

from ..errors import KangarooError


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..config import DEFAULT_MODEL
    from .config import TrainConfig

    d = TrainConfig()
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default=DEFAULT_MODEL, help=f"embedded name, local folder, .gguf file or hub id (default: {DEFAULT_MODEL})")
    g.add_argument("--data", nargs="+", required=True, metavar="FILE_OR_DIR",
                   help="chat data: our JSONL, ShareGPT JSON or Alpaca rows (auto-detected); folders are searched for .jsonl/.json; hf:NAME = a Hugging Face dataset")
    g.add_argument("--exit-layer", type=int, default=d.exit_layer, help=f"ℓ: target layers before the adapter (default {d.exit_layer})")
    g.add_argument("--out", required=True, help="output folder: adapter, checkpoints, metrics.jsonl, curves.png")
    g.add_argument("--seq-len", type=int, default=d.seq_len, help=f"cut conversations to this many tokens (default {d.seq_len})")
    g.add_argument("--max-conversations", type=int, default=None, help="use at most this many training conversations (a fixed seeded order; validation is drawn first)")
    g.add_argument("--val-size", type=int, default=d.val_size, help=f"held-out conversations for validation (default {d.val_size})")
    g.add_argument("--val-data", nargs="+", default=[], metavar="FILE_OR_DIR",
                   help="validate on these files instead of holding out --val-size conversations of --data (a fixed set across runs)")
    g = p.add_argument_group("self-distillation")
    g.add_argument("--self-distill", action="store_true", help="replace replies by the target's own greedy answers to the first user turn (cached on disk)")
    g.add_argument("--distill-cache", default=d.distill_cache, help="folder of the answer cache (default: distill/ in $KANGAROO_CACHE, else ~/.cache/kangaroo/distill)")
    g.add_argument("--distill-max-new-tokens", type=int, default=d.distill_max_new_tokens, help=f"answer length cap (default {d.distill_max_new_tokens})")
    g.add_argument("--distill-max-prompt-tokens", type=int, default=d.distill_max_prompt_tokens, help=f"skip longer prompts (default {d.distill_max_prompt_tokens})")
    g.add_argument("--distill-batch", type=int, default=d.distill_batch, help=f"generation batch size (default {d.distill_batch})")
    g.add_argument("--distill-only", action="store_true", help="fill the answer cache, then stop")
    g.add_argument("--distill-cached-only", action="store_true",
                   help="generate nothing: train on the conversations the answer cache already holds (the rest are counted as 'no answer')")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=d.epochs, help=f"passes over the data (default {d.epochs})")
    g.add_argument("--max-steps", type=int, default=None, help="optimiser steps; overrides --epochs")
    g.add_argument("--lr", type=float, default=d.lr, help=f"peak learning rate (default {d.lr})")
    g.add_argument("--warmup-steps", type=int, default=d.warmup_steps, help=f"linear warm-up steps, then cosine decay (default {d.warmup_steps})")
    g.add_argument("--min-lr-ratio", type=float, default=d.min_lr_ratio, help=f"final lr / peak lr (default {d.min_lr_ratio})")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay, help=f"AdamW weight decay (default {d.weight_decay})")
    g.add_argument("--grad-clip", type=float, default=d.grad_clip, help=f"gradient norm clip (default {d.grad_clip})")
    g.add_argument("--batch-tokens", type=int, default=d.batch_tokens, help=f"padded tokens per batch and process (default {d.batch_tokens})")
    g.add_argument("--precision", choices=["fp32", "bf16"], default=d.precision, help="fp32, or bf16 (model weights bf16, adapter fp32 under autocast; fast on AMX CPUs and GPUs)")
    g.add_argument("--top-k", type=int, default=d.top_k, help=f"target probabilities kept per position (default {d.top_k})")
    g.add_argument("--hard-weight", type=float, default=d.hard_weight,
                   help="train against (1-w)·top-k target + w·one-hot on its top-1 (0 = soft cross-entropy, the paper's; default 0)")
    g.add_argument("--init", default=d.init, help="warm: copy target layer ℓ's attention (default); random; or an adapter folder to continue from")
    g.add_argument("--kv-heads", type=int, default=d.kv_heads,
                   help="key/value heads of the adapter's attention (default: the target's; its query-head count = full multi-head)")
    g.add_argument("--adapter-mlp", type=int, default=d.adapter_mlp, metavar="I",
                   help="add a residual SiLU-gated MLP of I inner units after the adapter's attention (0 = the paper's adapter, the default; "
                        "2 x hidden size agreed best, docs/TRAINING.md); with --init DIR of an adapter without one (or with a narrower one), the new units start at zero")
    g.add_argument("--draft-vocab", type=int, default=d.draft_vocab, help=f"the adapter drafts over this many of the most frequent target tokens of the training data; 0 = the whole LM head (default {d.draft_vocab})")
    g.add_argument("--seed", type=int, default=d.seed, help="data order, split and init seed (default 0)")
    g = p.add_argument_group("bookkeeping")
    g.add_argument("--val-every", type=int, default=d.val_every, help=f"validate (and checkpoint) every N steps (default {d.val_every})")
    g.add_argument("--save-every", type=int, default=d.save_every, help=f"checkpoint every N steps (default {d.save_every})")
    g.add_argument("--keep", type=int, default=d.keep, help=f"checkpoints kept besides the best (default {d.keep})")
    g.add_argument("--log-every", type=int, default=d.log_every, help=f"training metrics every N steps (default {d.log_every})")
    g.add_argument("--feature-cache-gb", type=float, default=d.feature_cache_gb, help=f"RAM for features reused by later epochs (default {d.feature_cache_gb})")
    g.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> int:
    import dataclasses
    import json
    import sys

    from .config import TrainConfig
    from .trainer import train

    for name in ("epochs", "batch_tokens", "seq_len", "val_every", "save_every", "log_every", "keep"):
        if getattr(args, name) < 1:
            raise KangarooError(f"--{name.replace('_', '-')} must be >= 1")
    if args.max_steps is not None and args.max_steps < 1:
        raise KangarooError("--max-steps must be >= 1")
    if args.lr <= 0:
        raise KangarooError("--lr must be > 0")
    if args.adapter_mlp < 0:
        raise KangarooError(f"--adapter-mlp must be >= 0 (0 = no MLP), got {args.adapter_mlp}")
    if not 0 <= args.hard_weight <= 1:
        raise KangarooError(f"--hard-weight must be in [0, 1], got {args.hard_weight}")
    # every TrainConfig field named like an option comes from it; the rest keep their defaults
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}
    cfg = TrainConfig(**{**given, "data": list(args.data), "val_data": list(args.val_data),
                         "self_distill": args.self_distill or args.distill_only or args.distill_cached_only,
                         "progress": not args.no_progress})
    final = train(cfg)
    print(json.dumps(final, default=str), file=sys.stderr)
    return 0
