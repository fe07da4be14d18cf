"""A reduced vocabulary for the draft head (FR-Spec, Zhao et al. 2025; EAGLE-3's draft vocabulary).

A drafted token passes through the LM head, which for a small model is a large share of the draft
step (SmolLM2-135M: 49,152 x 576, as many weights as 6 decoder layers). Text uses few of those tokens
often, so the draft head scores only the most frequent ones: a draft the subset cannot express is
rejected by verification (which keeps the full vocabulary), so the output does not change; only the
acceptance can drop, by the share of the target's tokens outside the subset.

    python -m kangaroo.draft_vocab --adapter src/kangaroo/adapters/smollm2-135m-instruct --size 8192 \\
        --data ../shared/data/train/*.jsonl

counts tokens in the assistant turns of the given training conversations (our JSONL format), keeps
the ``size`` most frequent plus the tokenizer's special tokens, and stores them with the adapter.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections import Counter
from pathlib import Path

import torch

from .errors import KangarooError

logger = logging.getLogger(__name__)


def count_tokens(tokenizer, files: list[str], max_conversations: int | None = None) -> tuple[Counter, int]:
    """Token counts over the assistant turns of JSONL conversations; returns ``(counts, turns)``."""
    from tqdm import tqdm

    counts: Counter = Counter()
    texts = []
    for name in files:
        with open(name, encoding="utf-8") as f:
            for line in f:
                row = json.loads(line)
                texts += [t["content"] for t in row.get("conversations", []) if t.get("role") == "assistant"]
                if max_conversations and len(texts) >= max_conversations:
                    break
    for start in tqdm(range(0, len(texts), 256), desc="counting tokens", unit="batch"):
        for ids in tokenizer(texts[start:start + 256], add_special_tokens=False).input_ids:
            counts.update(ids)
    return counts, len(texts)


def choose(counts: Counter, size: int, vocab_size: int, always: list[int]) -> torch.Tensor:
    """The ``size`` most frequent ids plus ``always`` (special tokens), sorted, as int64."""
    keep = set(i for i in always if 0 <= i < vocab_size)
    for token, _ in counts.most_common():
        if len(keep) >= size:
            break
        if 0 <= token < vocab_size:
            keep.add(token)
    return torch.tensor(sorted(keep), dtype=torch.long)


def from_examples(examples, size: int, vocab_size: int, special: list) -> tuple[torch.Tensor | None, dict | None]:
    """The ``size`` most frequent trained targets of tokenised training examples (``ids`` and
    ``loss_mask``, as in ``kangaroo.training.data.Example``) plus ``special`` ids (ints or lists of
    them; None ignored); ``(None, None)`` when ``size`` is 0 or at least half the vocabulary."""
    if not size or size * 2 > vocab_size:
        return None, None
    counts = Counter(e.ids[t + 1] for e in examples for t, trained in enumerate(e.loss_mask) if trained)
    always = []
    for s in special:
        always += [] if s is None else ([int(s)] if isinstance(s, int) else [int(x) for x in s])
    vocab = choose(counts, size, vocab_size, always)
    total = sum(counts.values())
    covered = sum(counts[int(t)] for t in vocab) / total if total else 0.0
    return vocab, {"size": int(vocab.numel()), "token_coverage": round(covered, 4)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kangaroo.draft_vocab", description=__doc__.split("\n\n")[0])
    p.add_argument("--adapter", required=True, help="adapter folder to add the draft vocabulary to (rewritten in place)")
    p.add_argument("--model", default=None, help="the adapter's model (default: the default model)")
    p.add_argument("--size", type=int, default=8192, help="tokens in the draft vocabulary (default 8192)")
    p.add_argument("--data", nargs="+", required=True, help="training conversations (JSONL) to count tokens in")
    p.add_argument("--max-conversations", type=int, default=None)
    args = p.parse_args(argv)
    try:
        return _run(args)
    except (KangarooError, OSError, ValueError) as exc:  # bad adapter, missing or malformed data file
        print(f"kangaroo.draft_vocab: error: {exc}", file=sys.stderr)
        return 2


def _run(args) -> int:
    from .adapter import Adapter, AdapterConfig
    from .api import KangarooModel

    if args.size < 1:
        raise KangarooError(f"--size must be >= 1, got {args.size}")
    if not Path(args.adapter).is_dir():  # checked before the model is loaded
        raise KangarooError(f"adapter not found: {args.adapter}")
    missing = [f for f in args.data if not Path(f).is_file()]
    if missing:
        raise KangarooError(f"data file not found: {missing[0]}")
    kwargs = {"model": args.model} if args.model else {}
    km = KangarooModel.from_pretrained(adapter=args.adapter, engine="eager", dtype="float32", **kwargs)
    vocab_size = km.backbone.config.vocab_size
    counts, turns = count_tokens(km.tokenizer, args.data, args.max_conversations)
    vocab = choose(counts, args.size, vocab_size, list(km.tokenizer.all_special_ids) + sorted(km.eos_token_ids))
    covered = sum(counts[int(t)] for t in vocab) / max(sum(counts.values()), 1)
    adapter: Adapter = km.adapter
    adapter.draft_vocab = vocab
    config = AdapterConfig(**{**km.adapter_config.__dict__, "draft_vocab": {
        "size": int(vocab.numel()), "source": [Path(f).name for f in args.data], "assistant_turns": turns,
        "token_coverage": round(covered, 4)}})
    adapter.save(args.adapter, config)
    print(f"draft vocabulary: {vocab.numel()} tokens covering {covered:.1%} of {sum(counts.values())} tokens "
          f"in {turns} assistant turns; written to {args.adapter}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
