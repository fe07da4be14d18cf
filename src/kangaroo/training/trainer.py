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

import contextlib
import json
import logging
import math
import random
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

from ..adapter import Adapter, AdapterConfig
from ..errors import KangarooError
from .config import TrainConfig
from .data import DataReport, Example, make_batches, read_conversations, split, tokenize_all
from .outputs import (
    MetricsLog,
    latest_checkpoint,
    plot_curves,
    prune_checkpoints,
    save_checkpoint,
    set_rng_state,
    truncate_metrics,
)

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


def draft_loss(adapter, bb, h, mask, topk_ids, topk_p, chunk: int, autocast, backward: bool,
               hard_weight: float = 0.0) -> dict:
    """Soft CE of the adapter's draft against top-k targets; backward through the adapter if asked.

    With draft logits ``z = W a`` (``[n, V]``, the shared LM head), ``log q = z - logsumexp(z)`` and
    renormalised targets ``p̃`` over the top-k ids, the loss is ``−Σ p̃ log q = lse(z) − Σ p̃ z`` and
    its gradient is ``∂/∂z = softmax(z) − p̃`` (scattered), so ``∂/∂a = (softmax(z) − p̃) W``. With
    ``hard_weight`` w > 0 the gradient is that of the target ``(1 − w) p̃ + w onehot(argmax p)``
    (the reported loss stays the soft CE, so runs compare). Both
    are computed here by hand, chunk by chunk: one ``[chunk, V]`` float buffer and no autograd graph
    over the vocabulary, so memory stays bounded by ``chunk`` (docs/TRAINING.md has the timing
    against autograd). The adapter's own backward then runs once. Returns sums over positions: ``loss``, ``agree`` (top-1
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
                target = p_norm
                if hard_weight:
                    target = p_norm * (1 - hard_weight)
                    target[:, 0] += hard_weight  # the top-k ids are sorted by p: column 0 is argmax p
                g = z.sub_(lse).exp_()  # softmax(z), in place  [n, V]
                g.scatter_add_(-1, idx, -target)
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
    """Validation metrics over all held-out positions, and top-1 agreement per task kind (the
    conversations' source) in ``val_agreement_by_kind``."""
    adapter.eval()
    tot = {"loss": 0.0, "agree": 0.0, "accept": 0.0, "n": 0}
    kinds: dict[str, list[int]] = {}
    for i, e in enumerate(val):
        kinds.setdefault(e.source, []).append(i)
    by_kind = {}
    for kind, members in sorted(kinds.items()):  # batches never mix kinds, so each is summed apart
        agree = n = 0
        for batch in make_batches([len(val[i].ids) for i in members], cfg.batch_tokens, seed=0, epoch=0):
            idx = [members[j] for j in batch]
            h, mask, tid, tp = batch_features(bb, cfg, [val[i] for i in idx], [("val", i) for i in idx], cache, device, autocast)
            with torch.no_grad():
                s = draft_loss(adapter, bb, h, mask, tid, tp, cfg.chunk, autocast, backward=False)
            for k in tot:
                tot[k] += s[k]
            agree, n = agree + s["agree"], n + s["n"]
        by_kind[kind] = round(agree / max(n, 1), 4)
    adapter.train()
    n = max(tot["n"], 1)
    return {"val_loss": tot["loss"] / n, "val_agreement": tot["agree"] / n, "val_accept": tot["accept"] / n,
            "val_tokens": tot["n"], "val_agreement_by_kind": by_kind}


def prepare_data(cfg: TrainConfig, model, bb, tokenizer, main_first) -> tuple[list[Example], list[Example], dict]:
    """Read, split (seeded), cut training to ``max_conversations``, optionally self-distill, tokenise."""
    report = DataReport()
    convs, report = read_conversations(cfg.data, report, prompts_ok=cfg.self_distill)
    if cfg.val_data:  # a fixed validation set; the training data is shuffled the same way as a split's
        val_c, report = read_conversations(cfg.val_data, report, prompts_ok=cfg.self_distill)
        train_c, _ = split(convs, 0, cfg.seed)
    else:
        # the validation set is drawn from all the data first, so that --max-conversations (which
        # cuts the training set, in a fixed shuffled order) never changes it
        train_c, val_c = split(convs, cfg.val_size, cfg.seed)
    if cfg.max_conversations:
        train_c = train_c[: cfg.max_conversations]
    info: dict = {"read": report.to_dict()}
    if cfg.self_distill:
        from ..api import _eos_ids
        from ..fetch import cache_dir
        from ..loading import model_identity
        from .distill import cache_file, self_distill

        folder = cfg.distill_cache or cache_dir() / "distill"
        path = cache_file(folder, model_identity(cfg.model), bb.fingerprint(), cfg.distill_max_new_tokens,
                          str(bb.dtype).removeprefix("torch."))
        with main_first():  # the main process generates; the others then find the cache filled
            kw = dict(max_new_tokens=cfg.distill_max_new_tokens, max_prompt_tokens=cfg.distill_max_prompt_tokens,
                      batch_size=cfg.distill_batch, eos_token_ids=_eos_ids(model, tokenizer), progress=cfg.progress,
                      generate=not cfg.distill_cached_only)
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


def train(cfg: TrainConfig) -> dict:
    """Run training; returns the final metrics. See the module docstring."""
    run = _Run(cfg)
    if cfg.distill_only:
        logger.info("self-distillation cache ready: %s", run.data_info.get("self_distill"))
        return run.data_info
    run.start()
    epoch, done = run.state["epoch"], run.state["step"] >= run.total_steps
    while not done:
        done = run.epoch(epoch)
        if not done:
            epoch += 1
            run.state.update(epoch=epoch, batch=0)
    run.bar.close()
    return run.export()


class _Run:
    """One training run: set up (model, data, adapter, optimiser, resume) in ``__init__`` and
    :meth:`start`, then :meth:`epoch` until the step budget is spent, then :meth:`export`."""

    def __init__(self, cfg: TrainConfig) -> None:
        from accelerate import Accelerator

        _check(cfg)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.cfg = cfg
        self.out = Path(cfg.out).expanduser()
        self.ckpt_dir = self.out / "checkpoints"
        self.latest = latest_checkpoint(self.ckpt_dir)
        if self.latest is None and cfg.resume:
            logger.warning("--resume: no checkpoint in %s, starting fresh", self.ckpt_dir)
        if self.latest is not None and not cfg.resume and not cfg.distill_only:
            raise KangarooError(f"{self.out} already holds checkpoints: pass --resume to continue, or choose another --out")
        self.accelerator = Accelerator(cpu=not torch.cuda.is_available(),
                                       mixed_precision="bf16" if cfg.precision == "bf16" else "no")
        self.device = self.accelerator.device
        bf16 = cfg.precision == "bf16"
        self.autocast = (lambda: torch.autocast(self.device.type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        self.model, self.bb = self._load_target()
        t_data = time.perf_counter()
        self.train_set, self.val_set, self.data_info = prepare_data(cfg, self.model, self.bb, self.tokenizer,
                                                                    self.accelerator.main_process_first)
        self.data_info["prepare_s"] = round(time.perf_counter() - t_data, 1)

    def _load_target(self):
        from ..adapter import check_exit_layer, check_kv_heads
        from ..loading import load_model
        from ..model import Backbone

        cfg = self.cfg
        model_dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
        model, self.tokenizer = load_model(cfg.model, dtype=model_dtype, device=str(self.device))
        model.requires_grad_(False).eval()
        bb = Backbone(model)
        check_exit_layer(cfg.exit_layer, bb.num_layers)
        if cfg.kv_heads is not None:  # before any data preparation or self-distillation
            check_kv_heads(cfg.kv_heads, bb.config.num_attention_heads)
        return model, bb

    def start(self) -> None:
        """Adapter, optimiser and schedule (restored from the latest checkpoint on --resume), logs."""
        from tqdm.auto import tqdm

        cfg, acc = self.cfg, self.accelerator
        self.lengths = [len(e.ids) for e in self.train_set]
        adapter = _new_adapter(cfg, self.bb).float().to(self.device).train()
        optimizer = torch.optim.AdamW(adapter.parameters(), lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
        self.world, self.rank = acc.num_processes, acc.process_index
        per_epoch = [len(make_batches(self.lengths, cfg.batch_tokens, cfg.seed, e)) // self.world for e in range(cfg.epochs)]
        # --max-steps wins over --epochs: it stops early, or keeps cycling through further epochs
        self.total_steps = cfg.max_steps if cfg.max_steps is not None else sum(per_epoch)
        if self.total_steps <= 0 or not any(per_epoch[:1]) and cfg.max_steps is None:
            raise KangarooError("nothing to train: no full batch per process (more data, or a smaller --batch-tokens)")
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, self.total_steps))
        self.adapter, self.optimizer, self.scheduler = acc.prepare(adapter, optimizer, scheduler)
        self.raw = acc.unwrap_model(self.adapter)
        self.state = {"step": 0, "epoch": 0, "batch": 0, "best_val_loss": None, "best_step": None, "tokens": 0, "train_s": 0.0}
        if self.latest is not None and cfg.resume:
            self._resume(self.latest)
        self.out.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.out / "metrics.jsonl"
        if acc.is_main_process:
            truncate_metrics(self.metrics_path, self.state["step"])
            (self.out / "train_config.json").write_text(
                json.dumps({"config": asdict(cfg), "data": self.data_info}, indent=2, default=str) + "\n")
        self.cache = FeatureCache(cfg.feature_cache_gb * 2**30)
        self.log = MetricsLog(self.metrics_path, acc.is_main_process)
        self.bar = tqdm(total=self.total_steps, initial=self.state["step"], desc=f"train ℓ={cfg.exit_layer}",
                        dynamic_ncols=True, disable=not (cfg.progress and acc.is_main_process))
        self.last_val: dict = {}
        if cfg.init not in ("warm", "random") and self.state["step"] == 0 and self.val_set:
            # continuing a trained adapter: its validation before any step is the baseline to beat
            v = evaluate(self.raw, self.bb, cfg, self.val_set, self.cache, self.device, self.autocast)
            self.log.write({"step": 0, "epoch": 0, "initial": True, **v})
            logger.info("validation of --init %s: agreement %.3f, by kind %s", cfg.init, v["val_agreement"], v["val_agreement_by_kind"])
        self.window = {"loss": 0.0, "agree": 0.0, "n": 0, "t": time.perf_counter()}
        self.t0 = time.perf_counter() - self.state["train_s"]

    def _resume(self, checkpoint: Path) -> None:
        ck = torch.load(checkpoint / "checkpoint.pt", map_location=self.device, weights_only=False)
        self.raw.load_state_dict(ck["adapter"])
        self.optimizer.load_state_dict(ck["optimizer"])
        self.scheduler.load_state_dict(ck["scheduler"])
        set_rng_state(ck["rng"])
        self.state = ck["state"]
        logger.info("resumed from %s (step %d, epoch %d, batch %d)", checkpoint, self.state["step"], self.state["epoch"],
                    self.state["batch"])

    def epoch(self, epoch: int) -> bool:
        """Train through ``epoch``'s batches (from the saved position on a resume); True once the
        step budget is spent."""
        cfg, state = self.cfg, self.state
        batches = make_batches(self.lengths, cfg.batch_tokens, cfg.seed, epoch)
        batches = batches[self.rank :: self.world][: len(batches) // self.world]
        for bi in range(state["batch"] if epoch == state["epoch"] else 0, len(batches)):
            exs = [self.train_set[i] for i in batches[bi]]
            h, mask, tid, tp = batch_features(self.bb, cfg, exs, batches[bi], self.cache, self.device, self.autocast)
            self.optimizer.zero_grad(set_to_none=True)
            s = draft_loss(self.adapter, self.bb, h, mask, tid, tp, cfg.chunk, self.autocast, backward=True,
                           hard_weight=cfg.hard_weight)
            self.accelerator.clip_grad_norm_(self.adapter.parameters(), cfg.grad_clip)
            self.optimizer.step()
            self.scheduler.step()
            state.update(step=state["step"] + 1, epoch=epoch, batch=bi + 1, tokens=state["tokens"] + int(mask.sum()))
            for k in ("loss", "agree", "n"):
                self.window[k] += s[k]
            self.bar.update(1)
            if state["step"] % cfg.log_every == 0:
                self._log_window(epoch)
            done = state["step"] >= self.total_steps
            validate = done or state["step"] % cfg.val_every == 0
            if validate or state["step"] % cfg.save_every == 0:
                self.save(validate)
            if done:
                return True
        return False

    def _window_loss(self) -> float:
        return self.window["loss"] / max(self.window["n"], 1)

    def _log_window(self, epoch: int) -> None:
        w, now = self.window, time.perf_counter()
        dt = now - w["t"]
        self.log.write({"step": self.state["step"], "epoch": epoch, "loss": self._window_loss(),
                        "agreement": w["agree"] / max(w["n"], 1), "lr": self.scheduler.get_last_lr()[0],
                        "tokens_per_s": w["n"] / dt if dt > 0 else None, "elapsed_s": now - self.t0})
        self.bar.set_postfix(loss=f"{self._window_loss():.3f}",
                             val_agree=f"{self.last_val.get('val_agreement', float('nan')):.3f}")
        w.update(loss=0.0, agree=0.0, n=0, t=time.perf_counter())

    def save(self, validate: bool) -> None:
        """Checkpoint this step (validating first if asked; a better validation loss also becomes
        ``best/``), then prune old checkpoints."""
        state, better = self.state, False
        if validate:
            better = self._validate()
        state["train_s"] = time.perf_counter() - self.t0
        if better:
            state["best_val_loss"], state["best_step"] = self.last_val.get("val_loss"), state["step"]
            state["best_metrics"] = dict(self.last_val)
        if self.accelerator.is_main_process:
            save_checkpoint(self.ckpt_dir / f"step-{state['step']:06d}", self.raw, self.optimizer, self.scheduler, dict(state))
            if better:
                save_checkpoint(self.out / "best", self.raw, self.optimizer, self.scheduler, dict(state))
            prune_checkpoints(self.ckpt_dir, self.cfg.keep)

    def _validate(self) -> bool:
        """Validate on the held-out set; whether it beat the best so far (always, with no held-out set)."""
        if not self.val_set:
            return True
        self.last_val = v = evaluate(self.raw, self.bb, self.cfg, self.val_set, self.cache, self.device, self.autocast)
        self.log.write({"step": self.state["step"], "epoch": self.state["epoch"], **v})
        self.bar.set_postfix(loss=f"{self._window_loss():.3f}", val_agree=f"{v['val_agreement']:.3f}",
                             val_accept=f"{v['val_accept']:.3f}")
        return self.state["best_val_loss"] is None or v["val_loss"] < self.state["best_val_loss"]

    def export(self) -> dict:
        """Save the best checkpoint's adapter (and the curves) in ``--out``; returns its metrics."""
        from ..loading import model_identity

        cfg, raw, state = self.cfg, self.raw, self.state
        best = torch.load(self.out / "best" / "checkpoint.pt", map_location="cpu", weights_only=False)
        raw.load_state_dict(best["adapter"])
        final = dict(best["state"].get("best_metrics") or self.last_val)
        final.update(best_step=best["state"]["step"], steps=state["step"], train_tokens_seen=state["tokens"],
                     train_s=round(time.perf_counter() - self.t0, 1))
        if self.accelerator.is_main_process:
            draft_vocab = self._draft_vocab()
            config = AdapterConfig(
                base_model=model_identity(cfg.model), exit_layer=cfg.exit_layer, fingerprint=self.bb.fingerprint(),
                kv_heads=cfg.kv_heads, mlp_hidden=raw.mlp_hidden, draft_vocab=draft_vocab,
                training={"config": asdict(cfg), "data": self.data_info, "final_metrics": final,
                          "adapter_parameters": raw.num_parameters(),
                          "model_parameters": sum(p.numel() for p in self.model.parameters())},
            )
            raw.float().save(self.out, config)
            plot_curves(self.metrics_path, self.out / "curves.png")
            logger.info("adapter saved to %s: %s", self.out, final)
        return final

    def _draft_vocab(self) -> dict | None:
        """Give the adapter its ``--draft-vocab`` (kangaroo.draft_vocab); returns what its config records."""
        from ..draft_vocab import from_examples

        special = list(getattr(self.tokenizer, "all_special_ids", []))
        special += [getattr(self.tokenizer, "eos_token_id", None), getattr(self.model.generation_config, "eos_token_id", None)]
        vocab, record = from_examples(self.train_set, self.cfg.draft_vocab, self.bb.config.vocab_size, special)
        self.raw.draft_vocab = None if vocab is None else vocab.to(self.raw.input_norm.weight.device)
        if record is not None:
            record["source"] = "training targets" + (" (self-distilled)" if self.cfg.self_distill else "")
        return record


def _check(cfg: TrainConfig) -> None:
    if cfg.precision not in ("fp32", "bf16"):
        raise KangarooError(f"--precision must be fp32 or bf16, got {cfg.precision}")
    if cfg.top_k < 1:
        raise KangarooError("--top-k must be >= 1")
    if cfg.init not in ("warm", "random") and not Path(cfg.init).expanduser().is_dir():
        raise KangarooError(f"--init must be warm, random or an adapter folder, got {cfg.init}")
    if cfg.draft_vocab < 0:
        raise KangarooError(f"--draft-vocab must be >= 0 (0 = the whole LM head), got {cfg.draft_vocab}")


def _new_adapter(cfg: TrainConfig, bb) -> Adapter:
    if cfg.init not in ("warm", "random"):  # continue from a trained adapter (its draft vocabulary is re-chosen at export)
        adapter, config = Adapter.load(cfg.init, bb, cfg.exit_layer)
        if (config.kv_heads or None) != (cfg.kv_heads or None):
            raise KangarooError(f"--init {cfg.init} has {config.kv_heads or 'the target'}'s kv heads, not --kv-heads {cfg.kv_heads}")
        if cfg.adapter_mlp and config.mlp_hidden > cfg.adapter_mlp:
            raise KangarooError(f"--init {cfg.init} has an MLP of {config.mlp_hidden} units, more than --adapter-mlp "
                                f"{cfg.adapter_mlp} (an MLP can be added or widened, not narrowed)")
        adapter.draft_vocab = None
    elif cfg.init == "warm":
        adapter = Adapter.from_backbone(bb, cfg.exit_layer, cfg.kv_heads)
    else:
        adapter = Adapter.random(bb, cfg.exit_layer, seed=cfg.seed, kv_heads=cfg.kv_heads)
    if cfg.adapter_mlp > adapter.mlp_hidden:  # starts as the adapter it extends (new units: zero output projection)
        adapter = adapter.add_mlp(bb, cfg.adapter_mlp, seed=cfg.seed)
    return adapter
