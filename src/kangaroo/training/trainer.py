"""The adapter training loop (Kangaroo paper, section 3.2), CPU or many GPUs through Accelerate.

For every batch of chat sequences (right-padded, so causal attention never sees the padding):

1. features, no grad: ``h_ℓ = layers[0:ℓ](embed(x))`` (the adapter's input) and the target's
   next-token distribution ``p = softmax(H(norm(layers[ℓ:L](h_ℓ))))`` at every trained position,
   kept as its top-k ``(ids, probs)`` so a batch never holds more than ``chunk x V`` floats;
2. draft: ``q = softmax(H(A(h_ℓ)))`` at the same positions, LM head frozen and shared;
3. loss: soft cross-entropy ``-Σ_v p̃(v) log q(v)`` (p̃ = top-k p renormalised), averaged over
   assistant tokens; AdamW, linear warm-up then cosine decay, gradient clipping.

Features are computed on the fly in the first epoch and, with ``feature_cache_gb > 0``, kept in RAM
for later epochs (a later epoch then costs only the adapter and the LM head). Top-k targets make the
cached and recomputed values identical, which keeps ``--resume`` exact.

Validation every ``val_every`` steps on held-out conversations: soft CE, top-1 agreement
``argmax q == argmax p`` and expected acceptance ``Σ_v min(p, q)`` (summed over the top-k of p, so a
lower bound). Metrics go to ``metrics.jsonl``; ``curves.png`` is drawn at the end.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

from ..adapter import Adapter, AdapterConfig, _atomic_write
from ..errors import KangarooError
from .config import TrainConfig
from .data import DataReport, Example, make_batches, read_conversations, split, tokenize_all

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------- schedule
def lr_lambda(cfg: TrainConfig, total_steps: int):
    """Linear warm-up to ``lr``, then cosine decay to ``lr * min_lr_ratio`` at ``total_steps``."""
    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        t = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))
    return f


# ---------------------------------------------------------------------- features and loss
def pad_batch(examples: list[Example], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad ids to ``[B, T]``; ``mask`` ``[B, T]`` marks trained positions."""
    T = max(len(e.ids) for e in examples)
    ids = torch.zeros(len(examples), T, dtype=torch.long)
    mask = torch.zeros(len(examples), T, dtype=torch.bool)
    for b, e in enumerate(examples):
        ids[b, : len(e.ids)] = torch.tensor(e.ids)
        mask[b, : len(e.ids)] = torch.tensor(e.loss_mask)
    return ids.to(device), mask.to(device)


@torch.no_grad()
def compute_features(bb, exit_layer: int, ids: torch.Tensor, mask: torch.Tensor, top_k: int, chunk: int, autocast):
    """Adapter inputs and top-k targets for one batch.

    Returns ``h`` ``[B, T, D]`` (exit-layer states), ``topk_ids`` ``[N, k]`` and ``topk_p`` ``[N, k]``
    (float32) for the ``N`` trained positions in ``mask`` (row-major order).
    """
    with autocast():
        h = bb.run_layers(0, exit_layer, bb.embed(ids), None, 0)
        h_last = bb.run_layers(exit_layer, bb.num_layers, h, None, 0)
        sel = h_last[mask]  # [N, D]
        ids_out, p_out = [], []
        for c in range(0, sel.shape[0], chunk):
            p = bb.logits(sel[c : c + chunk]).softmax(-1)  # [n, V] float32
            top = p.topk(top_k, dim=-1)
            ids_out.append(top.indices.int())
            p_out.append(top.values)
    h = h.to(bb.dtype)
    return h, torch.cat(ids_out), torch.cat(p_out)


def draft_loss(adapter, bb, h, mask, topk_ids, topk_p, chunk: int, autocast, backward: bool) -> dict:
    """Soft CE of the adapter's draft against top-k targets; backward through the adapter if asked.

    With draft logits ``z = W a`` (``[n, V]``, the shared LM head), ``log q = z - logsumexp(z)`` and
    renormalised targets ``p̃`` over the top-k ids, the loss is ``−Σ p̃ log q = lse(z) − Σ p̃ z`` and
    its gradient is ``∂/∂z = softmax(z) − p̃`` (scattered), so ``∂/∂a = (softmax(z) − p̃) W``. Both
    are computed here by hand, chunk by chunk: one ``[chunk, V]`` float buffer, no autograd graph
    over the vocabulary (measured on 2 CPU cores, bf16, 784 positions: 460 ms against 511 ms for
    autograd through ``log_softmax``; the two LM-head matmuls dominate either way). The adapter's
    own backward then runs once. Returns sums over positions: ``loss``, ``agree`` (top-1
    match), ``accept`` (Σ min(p, q) over the top-k), ``n``.
    """
    with autocast():
        a = adapter(h, bb, None, 0)[mask]  # [N, D]
    weight, bias = bb.lm_head.weight, getattr(bb.lm_head, "bias", None)  # [V, D], [V] or None
    N = a.shape[0]
    grad = torch.zeros(a.shape, dtype=torch.float32, device=a.device) if backward else None
    sums = {"loss": 0.0, "agree": 0.0, "accept": 0.0, "n": N}
    with torch.no_grad():
        for c in range(0, N, chunk):
            a_c = a[c : c + chunk].detach().to(weight.dtype)  # [n, D]
            z = F.linear(a_c, weight, bias).float()  # [n, V]
            lse = torch.logsumexp(z, dim=-1, keepdim=True)  # [n, 1]
            idx, p = topk_ids[c : c + chunk].long(), topk_p[c : c + chunk]  # [n, k]
            p_norm = p / p.sum(-1, keepdim=True)
            z_top = z.gather(-1, idx)  # [n, k]
            sums["loss"] += float((lse.squeeze(-1) - (p_norm * z_top).sum(-1)).sum())
            sums["agree"] += float((z.argmax(-1) == idx[:, 0]).sum())
            sums["accept"] += float(torch.minimum(p, (z_top - lse).exp()).sum())
            if backward:
                g = z.sub_(lse).exp_()  # softmax(z), in place  [n, V]
                g.scatter_add_(-1, idx, -p_norm)
                grad[c : c + chunk] = (g.to(weight.dtype) @ weight).float() / N
    if backward and N:
        a.backward(grad.to(a.dtype))
    return sums


# ---------------------------------------------------------------------- the run
class FeatureCache:
    """Per-example features kept in RAM across epochs, up to ``limit_bytes``."""

    def __init__(self, limit_bytes: float) -> None:
        self.limit, self.used, self.store = limit_bytes, 0, {}

    def get(self, key):
        return self.store.get(key)

    def put(self, key, h, ids, p) -> None:
        size = h.numel() * h.element_size() + ids.numel() * 4 + p.numel() * 4
        if self.used + size <= self.limit:
            self.store[key] = (h.clone(), ids.clone(), p.clone())
            self.used += size


def batch_features(bb, cfg, examples, keys, cache: FeatureCache, device, autocast):
    """Features for a batch: from the RAM cache when every example is there, else computed
    (and cached). Returns ``(h [B,T,D], mask [B,T], topk_ids [N,k], topk_p [N,k])``."""
    ids, mask = pad_batch(examples, device)
    hit = [cache.get(k) for k in keys]
    if all(x is not None for x in hit):
        h = torch.zeros(ids.shape[0], ids.shape[1], hit[0][0].shape[-1], dtype=hit[0][0].dtype, device=device)
        for b, (hb, _, _) in enumerate(hit):
            h[b, : hb.shape[0]] = hb
        return h, mask, torch.cat([x[1] for x in hit]), torch.cat([x[2] for x in hit])
    h, tid, tp = compute_features(bb, cfg.exit_layer, ids, mask, cfg.top_k, cfg.chunk, autocast)
    start = 0
    for b, (e, k) in enumerate(zip(examples, keys)):
        n = e.n_loss
        cache.put(k, h[b, : len(e.ids)], tid[start : start + n], tp[start : start + n])
        start += n
    return h, mask, tid, tp


def evaluate(adapter, bb, cfg, val, cache, device, autocast) -> dict:
    adapter.eval()
    tot = {"loss": 0.0, "agree": 0.0, "accept": 0.0, "n": 0}
    for batch in make_batches([len(e.ids) for e in val], cfg.batch_tokens, seed=0, epoch=0):
        exs = [val[i] for i in batch]
        h, mask, tid, tp = batch_features(bb, cfg, exs, [("val", i) for i in batch], cache, device, autocast)
        with torch.no_grad():
            s = draft_loss(adapter, bb, h, mask, tid, tp, cfg.chunk, autocast, backward=False)
        for k in tot:
            tot[k] += s[k]
    adapter.train()
    n = max(tot["n"], 1)
    return {"val_loss": tot["loss"] / n, "val_agreement": tot["agree"] / n, "val_accept": tot["accept"] / n, "val_tokens": tot["n"]}


def prepare_data(cfg: TrainConfig, model, bb, tokenizer, main_first) -> tuple[list[Example], list[Example], dict]:
    """Read, split (seeded), cut training to ``max_conversations``, optionally self-distill, tokenise."""
    report = DataReport()
    convs, report = read_conversations(cfg.data, report)
    # the validation set is drawn from all the data first, so that --max-conversations (which
    # cuts the training set, in a fixed shuffled order) never changes it
    train_c, val_c = split(convs, cfg.val_size, cfg.seed)
    if cfg.max_conversations:
        train_c = train_c[: cfg.max_conversations]
    info: dict = {"read": report.to_dict()}
    if cfg.self_distill:
        from ..api import _eos_ids
        from ..loading import cache_dir, model_identity
        from .distill import cache_file, self_distill

        folder = cfg.distill_cache or cache_dir() / "distill"
        path = cache_file(folder, model_identity(cfg.model), bb.fingerprint(), cfg.distill_max_new_tokens,
                          str(bb.dtype).removeprefix("torch."))
        with main_first():  # the main process generates; the others then find the cache filled
            kw = dict(max_new_tokens=cfg.distill_max_new_tokens, max_prompt_tokens=cfg.distill_max_prompt_tokens,
                      batch_size=cfg.distill_batch, eos_token_ids=_eos_ids(model, tokenizer), progress=cfg.progress)
            val_c, val_counts = self_distill(val_c, bb, tokenizer, path, **kw)
            train_c, train_counts = self_distill(train_c, bb, tokenizer, path, **kw)
        info["self_distill"] = {"cache": str(path), "train": train_counts, "val": val_counts,
                                "max_new_tokens": cfg.distill_max_new_tokens, "dtype": str(bb.dtype).removeprefix("torch.")}
    if cfg.distill_only:
        return [], [], info
    tok_report = DataReport()
    train = tokenize_all(tokenizer, train_c, cfg.seq_len, tok_report)
    val = tokenize_all(tokenizer, val_c, cfg.seq_len, tok_report) if val_c else []
    info["tokenise"] = {"skipped": dict(tok_report.skipped), "first_skipped_at": tok_report.examples}
    info["train_conversations"], info["val_conversations"] = len(train), len(val)
    info["train_tokens"] = sum(len(e.ids) for e in train)
    info["train_loss_tokens"] = sum(e.n_loss for e in train)
    info["val_loss_tokens"] = sum(e.n_loss for e in val)
    by_source: dict = {}
    for e in train:
        by_source[e.source] = by_source.get(e.source, 0) + 1
    info["train_by_source"] = by_source
    return train, val, info


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate()}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])


def _save_checkpoint(path: Path, adapter, optimizer, scheduler, state: dict) -> None:
    """Write a checkpoint folder atomically: fill ``.tmp-<name>``, then rename it into place."""
    tmp = path.parent / f".tmp-{path.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.save({"adapter": adapter.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "rng": _rng_state(), "state": state}, tmp / "checkpoint.pt")
    (tmp / "state.json").write_text(json.dumps(state, indent=2) + "\n")
    if path.exists():
        old = path.parent / f".old-{path.name}"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)


def _latest_checkpoint(ckpt_dir: Path) -> Path | None:
    steps = sorted(ckpt_dir.glob("step-*"), key=lambda p: int(p.name.split("-")[1])) if ckpt_dir.exists() else []
    return steps[-1] if steps else None


def train(cfg: TrainConfig) -> dict:
    """Run training; returns the final metrics. See the module docstring."""
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    from ..loading import load_model, model_identity
    from ..model import Backbone

    if cfg.precision not in ("fp32", "bf16"):
        raise KangarooError(f"--precision must be fp32 or bf16, got {cfg.precision}")
    if cfg.top_k < 1:
        raise KangarooError("--top-k must be >= 1")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out).expanduser()
    ckpt_dir = out / "checkpoints"
    latest = _latest_checkpoint(ckpt_dir)
    if latest is None and cfg.resume:
        logger.warning("--resume: no checkpoint in %s, starting fresh", ckpt_dir)
    if latest is not None and not cfg.resume and not cfg.distill_only:
        raise KangarooError(f"{out} already holds checkpoints: pass --resume to continue, or choose another --out")
    accelerator = Accelerator(cpu=not torch.cuda.is_available(),
                              mixed_precision="bf16" if cfg.precision == "bf16" else "no")
    device = accelerator.device
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if cfg.precision == "bf16" else _null
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)

    model_dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
    model, tokenizer = load_model(cfg.model, dtype=model_dtype, device=str(device))
    model.requires_grad_(False).eval()
    bb = Backbone(model)
    from ..adapter import check_exit_layer, check_kv_heads
    check_exit_layer(cfg.exit_layer, bb.num_layers)
    if cfg.kv_heads is not None:  # before any data preparation or self-distillation
        check_kv_heads(cfg.kv_heads, bb.config.num_attention_heads)

    t_data = time.perf_counter()
    train_set, val_set, data_info = prepare_data(cfg, model, bb, tokenizer, accelerator.main_process_first)
    data_info["prepare_s"] = round(time.perf_counter() - t_data, 1)
    if cfg.distill_only:
        logger.info("self-distillation cache ready: %s", data_info.get("self_distill"))
        return data_info
    lengths = [len(e.ids) for e in train_set]

    # adapter, optimiser, schedule
    if cfg.init == "warm":
        adapter = Adapter.from_backbone(bb, cfg.exit_layer, cfg.kv_heads)
    elif cfg.init == "random":
        adapter = Adapter.random(bb, cfg.exit_layer, seed=cfg.seed, kv_heads=cfg.kv_heads)
    else:
        raise KangarooError(f"--init must be warm or random, got {cfg.init}")
    adapter = adapter.float().to(device).train()
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    world, rank = accelerator.num_processes, accelerator.process_index
    per_epoch = [len(make_batches(lengths, cfg.batch_tokens, cfg.seed, e)) // world for e in range(cfg.epochs)]
    # --max-steps wins over --epochs: it stops early, or keeps cycling through further epochs
    total_steps = cfg.max_steps if cfg.max_steps is not None else sum(per_epoch)
    if total_steps <= 0 or not any(per_epoch[:1]) and cfg.max_steps is None:
        raise KangarooError("nothing to train: no full batch per process (more data, or a smaller --batch-tokens)")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_steps))
    adapter, optimizer, scheduler = accelerator.prepare(adapter, optimizer, scheduler)
    raw = accelerator.unwrap_model(adapter)

    state = {"step": 0, "epoch": 0, "batch": 0, "best_val_loss": None, "best_step": None, "tokens": 0, "train_s": 0.0}
    if latest is not None and cfg.resume:
        ck = torch.load(latest / "checkpoint.pt", map_location=device, weights_only=False)
        raw.load_state_dict(ck["adapter"])
        optimizer.load_state_dict(ck["optimizer"])
        scheduler.load_state_dict(ck["scheduler"])
        _set_rng_state(ck["rng"])
        state = ck["state"]
        logger.info("resumed from %s (step %d, epoch %d, batch %d)", latest, state["step"], state["epoch"], state["batch"])
    out.mkdir(parents=True, exist_ok=True)
    metrics_path = out / "metrics.jsonl"
    if accelerator.is_main_process:
        _truncate_metrics(metrics_path, state["step"])
        (out / "train_config.json").write_text(json.dumps({"config": asdict(cfg), "data": data_info}, indent=2, default=str) + "\n")

    cache = FeatureCache(cfg.feature_cache_gb * 2**30)
    log = _MetricsLog(metrics_path, accelerator.is_main_process)
    bar = tqdm(total=total_steps, initial=state["step"], desc=f"train ℓ={cfg.exit_layer}", dynamic_ncols=True,
               disable=not (cfg.progress and accelerator.is_main_process))
    last_val: dict = {}
    window = {"loss": 0.0, "agree": 0.0, "n": 0, "t": time.perf_counter()}
    t0 = time.perf_counter() - state["train_s"]

    def validate_and_save(final: bool = False) -> None:
        nonlocal last_val
        if val_set:
            last_val = evaluate(raw, bb, cfg, val_set, cache, device, autocast)
            log.write({"step": state["step"], "epoch": state["epoch"], **last_val})
            bar.set_postfix(loss=f"{window_loss():.3f}", val_agree=f"{last_val['val_agreement']:.3f}",
                            val_accept=f"{last_val['val_accept']:.3f}")
            better = state["best_val_loss"] is None or last_val["val_loss"] < state["best_val_loss"]
        else:
            better = True
        state["train_s"] = time.perf_counter() - t0
        if better:
            state["best_val_loss"], state["best_step"] = last_val.get("val_loss"), state["step"]
            state["best_metrics"] = dict(last_val)
        if accelerator.is_main_process:
            _save_checkpoint(ckpt_dir / f"step-{state['step']:06d}", raw, optimizer, scheduler, dict(state))
            if better:
                _save_checkpoint(out / "best", raw, optimizer, scheduler, dict(state))
            for old in sorted(ckpt_dir.glob("step-*"), key=lambda p: int(p.name.split("-")[1]))[: -cfg.keep]:
                shutil.rmtree(old, ignore_errors=True)

    def window_loss() -> float:
        return window["loss"] / max(window["n"], 1)

    done = state["step"] >= total_steps
    epoch = state["epoch"]
    while not done:
        batches = make_batches(lengths, cfg.batch_tokens, cfg.seed, epoch)
        batches = batches[rank::world][: len(batches) // world]
        for bi in range(state["batch"] if epoch == state["epoch"] else 0, len(batches)):
            exs = [train_set[i] for i in batches[bi]]
            h, mask, tid, tp = batch_features(bb, cfg, exs, batches[bi], cache, device, autocast)
            optimizer.zero_grad(set_to_none=True)
            s = draft_loss(adapter, bb, h, mask, tid, tp, cfg.chunk, autocast, backward=True)
            accelerator.clip_grad_norm_(adapter.parameters(), cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            state.update(step=state["step"] + 1, epoch=epoch, batch=bi + 1, tokens=state["tokens"] + int(mask.sum()))
            window["loss"] += s["loss"]
            window["agree"] += s["agree"]
            window["n"] += s["n"]
            bar.update(1)
            if state["step"] % cfg.log_every == 0:
                dt = time.perf_counter() - window["t"]
                log.write({"step": state["step"], "epoch": epoch, "loss": window_loss(),
                           "agreement": window["agree"] / max(window["n"], 1), "lr": scheduler.get_last_lr()[0],
                           "tokens_per_s": window["n"] / dt if dt > 0 else None, "elapsed_s": time.perf_counter() - t0})
                bar.set_postfix(loss=f"{window_loss():.3f}", val_agree=f"{last_val.get('val_agreement', float('nan')):.3f}")
                window.update(loss=0.0, agree=0.0, n=0, t=time.perf_counter())
            if state["step"] >= total_steps:
                done = True
            if done or state["step"] % cfg.save_every == 0 or state["step"] % cfg.val_every == 0:
                if done or state["step"] % cfg.val_every == 0:
                    validate_and_save()
                elif accelerator.is_main_process:
                    state["train_s"] = time.perf_counter() - t0
                    _save_checkpoint(ckpt_dir / f"step-{state['step']:06d}", raw, optimizer, scheduler, dict(state))
                    for old in sorted(ckpt_dir.glob("step-*"), key=lambda p: int(p.name.split("-")[1]))[: -cfg.keep]:
                        shutil.rmtree(old, ignore_errors=True)
            if done:
                break
        if not done:
            epoch += 1
            state.update(epoch=epoch, batch=0)
    bar.close()

    # final adapter: the best checkpoint by validation loss
    best = torch.load(out / "best" / "checkpoint.pt", map_location="cpu", weights_only=False)
    raw.load_state_dict(best["adapter"])
    final = dict(best["state"].get("best_metrics") or last_val)
    final.update(best_step=best["state"]["step"], steps=state["step"], train_tokens_seen=state["tokens"],
                 train_s=round(time.perf_counter() - t0, 1))
    if accelerator.is_main_process:
        config = AdapterConfig(
            base_model=model_identity(cfg.model), exit_layer=cfg.exit_layer, fingerprint=bb.fingerprint(),
            kv_heads=cfg.kv_heads,
            training={"config": asdict(cfg), "data": data_info, "final_metrics": final,
                      "adapter_parameters": raw.num_parameters(),
                      "model_parameters": sum(p.numel() for p in model.parameters())},
        )
        raw.float().save(out, config)
        plot_curves(metrics_path, out / "curves.png")
        logger.info("adapter saved to %s: %s", out, final)
    return final


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


class _MetricsLog:
    def __init__(self, path: Path, enabled: bool) -> None:
        self.path, self.enabled = path, enabled

    def write(self, row: dict) -> None:
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")


def _truncate_metrics(path: Path, step: int) -> None:
    """After a resume, drop log rows written after the checkpoint (they will be written again)."""
    if not path.exists():
        return
    rows = [line for line in path.read_text().split("\n") if line.strip()]
    keep = []
    for line in rows:
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (json.JSONDecodeError, KeyError):
            continue
    _atomic_write(path, lambda p: p.write_text("".join(k + "\n" for k in keep)))


def plot_curves(metrics_path: Path, png: Path) -> None:
    """Training loss and validation metrics against steps (skipped if matplotlib is missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib not installed: no %s", png)
        return
    rows = [json.loads(line) for line in metrics_path.read_text().split("\n") if line.strip()]
    tr = [r for r in rows if "loss" in r]
    va = [r for r in rows if "val_loss" in r]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot([r["step"] for r in tr], [r["loss"] for r in tr], label="train soft CE")
    ax1.plot([r["step"] for r in va], [r["val_loss"] for r in va], "o-", label="val soft CE")
    ax1.set_xlabel("step")
    ax1.legend()
    ax2.plot([r["step"] for r in va], [r["val_agreement"] for r in va], "o-", label="val top-1 agreement")
    ax2.plot([r["step"] for r in va], [r["val_accept"] for r in va], "s-", label="val Σ min(p, q)")
    ax2.plot([r["step"] for r in tr], [r["agreement"] for r in tr], alpha=0.4, label="train top-1 agreement")
    ax2.set_xlabel("step")
    ax2.set_ylim(0, 1)
    ax2.legend()
    fig.tight_layout()
    tmp = png.with_name(f".{png.name}.tmp.png")
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    os.replace(tmp, png)
