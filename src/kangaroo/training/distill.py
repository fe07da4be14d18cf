"""Self-distillation: replace each conversation's reply by the target's own greedy answer.

The adapter should imitate what the target actually says at decode time, not what ChatGPT said
(Medusa-2 and EAGLE recommend the same). For each conversation we keep the first user turn (and a
leading system turn, if any) and let the target answer it greedily; later turns are dropped, since
regenerating them would condition on answers the target never gave.

Generation is batched through the HF model's own forward (left padding, attention mask, position
ids, ``DynamicCache``); rows that hit EOS leave the batch as they finish. Batched answers equal
batch-1 greedy answers up to floating-point noise. Answers are
appended to a JSONL cache file as each batch ends, keyed by the prompt and the generation
settings, so an interrupted run loses at most one batch and a later run (another ℓ, another
learning rate) reuses them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import defaultdict
from pathlib import Path

from .data import Conversation

logger = logging.getLogger(__name__)


def prompt_messages(conv: Conversation) -> list[dict]:
    """System turn (if any) + first user turn: what the target is asked to answer (a prompt-only
    record: the whole conversation, which ends with the user turn to answer)."""
    msgs = conv.messages
    if conv.prompt_only:
        return list(msgs)
    head = [msgs[0]] if msgs[0]["role"] == "system" else []
    first_user = next(m for m in msgs if m["role"] == "user")
    return head + [first_user]


def answer_key(messages: list[dict]) -> str:
    """The answer cache's key of a prompt (its messages, as :func:`prompt_messages` gives them)."""
    return hashlib.sha256(json.dumps(messages, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:24]


def cache_file(cache_dir: str | os.PathLike, model_name: str, fingerprint: dict, max_new_tokens: int, dtype: str) -> Path:
    """One JSONL file per (model, generation settings)."""
    ident = json.dumps([model_name, fingerprint.get("embedding_probe"), max_new_tokens, dtype])
    tag = hashlib.sha256(ident.encode()).hexdigest()[:12]
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in model_name)[-60:]
    return Path(cache_dir).expanduser() / f"{safe}-greedy{max_new_tokens}-{dtype}-{tag}.jsonl"


def load_cache(path: Path) -> dict[str, dict]:
    """key -> {"response", "finished"}; a torn last line (killed mid-write) is ignored."""
    out: dict[str, dict] = {}
    if path.exists():
        for line in path.read_text(encoding="utf-8").split("\n"):
            try:
                row = json.loads(line)
                out[row["key"]] = row
            except (json.JSONDecodeError, KeyError):
                continue
    return out


def self_distill(
    convs: list[Conversation],
    backbone,
    tokenizer,
    cache_path: Path,
    max_new_tokens: int = 256,
    max_prompt_tokens: int = 256,
    batch_size: int = 64,
    eos_token_ids: set[int] = frozenset(),
    generate: bool = True,
    progress: bool = True,
) -> tuple[list[Conversation], dict]:
    """Return conversations whose reply is the target's greedy answer, generating missing ones.

    Args:
        convs: conversations (only their system + first user turn are used).
        backbone: :class:`~kangaroo.model.Backbone` of the target, in the dtype to generate with.
        cache_path: JSONL cache (see :func:`cache_file`).
        max_new_tokens: answer length cap; answers cut there are kept (flagged ``finished: false``).
        max_prompt_tokens: longer prompts are skipped (counted).
        generate: False = only use what the cache holds (skip the rest).

    Returns:
        ``(conversations, counts)``; conversations keep their source and origin.
    """
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    cached = load_cache(cache_path)
    counts = defaultdict(int)
    todo: list[tuple[str, list[int]]] = []  # (key, prompt ids), in the given (shuffled) order
    keyed, queued = [], set()
    for conv in convs:
        msgs = prompt_messages(conv)
        key = answer_key(msgs)
        keyed.append((conv, msgs, key))
        if key in cached or key in queued:
            continue
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) > max_prompt_tokens:
            counts["prompt longer than max_prompt_tokens"] += 1
            continue
        queued.add(key)
        todo.append((key, ids))
    if todo and generate:
        logger.info("self-distillation: generating %d answers (%d cached) into %s", len(todo), len(cached), cache_path)
        _answer(todo, backbone.model, tokenizer, cache_path, cached, max_new_tokens, batch_size, eos_token_ids, progress)
    out = []
    for conv, msgs, key in keyed:
        row = cached.get(key)
        if row is None:  # prompt too long, or generate=False
            counts["no answer"] += 1
            continue
        if not row["response"]:
            counts["empty answer"] += 1
            continue
        counts["answers"] += 1
        counts["answer tokens"] += row.get("tokens", 0)
        counts["cut at max_new_tokens"] += 0 if row.get("finished", True) else 1
        out.append(Conversation(msgs + [{"role": "assistant", "content": row["response"]}], conv.source, conv.where))
    return out, dict(counts)


def _answer(todo: list[tuple[str, list[int]]], model, tokenizer, cache_path: Path, cached: dict, max_new_tokens: int,
            batch_size: int, eos_token_ids: set[int], progress: bool) -> None:
    """Generate the answers to ``todo``'s prompts in batches, appending each batch to the cache file
    (and to ``cached``) as it ends."""
    from tqdm.auto import tqdm

    bar = tqdm(total=len(todo), desc="self-distill", unit="answer", disable=not progress, dynamic_ncols=True)
    tokens = 0
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    # windows of 8 batches in the given order (an interrupted run has answered a prefix), sorted
    # by length inside a window so that left padding stays short
    window = 8 * batch_size
    with open(cache_path, "a", encoding="utf-8") as f:
        for w in range(0, len(todo), window):
            rows = sorted(todo[w : w + window], key=lambda r: len(r[1]))
            for b in range(0, len(rows), batch_size):
                chunk = rows[b : b + batch_size]
                outs = greedy_batch(model, [ids for _, ids in chunk], max_new_tokens, eos_token_ids, pad)
                for (key, _), (out, finished) in zip(chunk, outs):
                    row = {"key": key, "response": tokenizer.decode(out, skip_special_tokens=True).strip(),
                           "tokens": len(out), "finished": finished}
                    cached[key] = row
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
                    tokens += len(out)
                f.flush()
                bar.update(len(chunk))
                bar.set_postfix(tokens=tokens)
    bar.close()


def greedy_batch(model, prompts: list[list[int]], max_new_tokens: int, eos_token_ids: set[int], pad_id: int = 0
                 ) -> list[tuple[list[int], bool]]:
    """Greedy answers for a batch of prompts (left-padded), through the HF model's own forward
    with an attention mask and a ``DynamicCache``; rows leave the batch (and the cache) at EOS.

    Returns ``[(new token ids without EOS, finished)]`` in the order of ``prompts``.
    """
    import torch

    from ..model import keep_cache_rows, new_forward_cache

    device = model.device
    n = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), n), pad_id, dtype=torch.long)
    attn = torch.zeros(len(prompts), n, dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, n - len(p):] = torch.tensor(p)
        attn[r, n - len(p):] = 1
    ids, attn = ids.to(device), attn.to(device)
    eos = torch.tensor(sorted(eos_token_ids) or [-1], device=device)
    live = list(range(len(prompts)))  # original row of each batch row
    outs: list[list[int]] = [[] for _ in prompts]
    finished = [False] * len(prompts)
    kw, cache = new_forward_cache(model)
    position = (attn.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        # logits_to_keep as an index tensor, not 1: HF then gathers a contiguous [B, 1, D] last state.
        # With 1 it slices a strided view, and CPU torch runs the LM head on that view as a batched
        # matmul that copies the [V, D] weight once per row (docs/TRAINING.md).
        last = torch.tensor([n - 1], device=device)
        logits = model(input_ids=ids, attention_mask=attn, position_ids=position, **{kw: cache},
                       use_cache=True, logits_to_keep=last).logits
        next_pos = position[:, -1:] + 1
        for step in range(max_new_tokens):
            y = logits[:, -1].float().argmax(-1)  # [B]
            done = torch.isin(y, eos)
            for r, tok, d in zip(live, y.tolist(), done.tolist()):
                if d:
                    finished[r] = True
                else:
                    outs[r].append(tok)
            if done.all() or step == max_new_tokens - 1:
                break
            if done.any():  # drop finished rows from the batch and the cache
                keep = (~done).nonzero()[:, 0]
                live = [live[i] for i in keep.tolist()]
                y, attn, next_pos = y[keep], attn[keep], next_pos[keep]
                keep_cache_rows(cache, keep)
            attn = torch.cat([attn, attn.new_ones(attn.shape[0], 1)], dim=1)
            logits = model(input_ids=y[:, None], attention_mask=attn, position_ids=next_pos, **{kw: cache},
                           use_cache=True).logits
            next_pos = next_pos + 1
    return list(zip(outs, finished))
