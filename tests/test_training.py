"""Adapter training: data readers and errors, one step lowers the loss, a trained adapter beats a
random one at decode time, and SIGKILL + --resume ends exactly where an uninterrupted run ends.

The model is a tiny random Llama with the tiny in-process chat tokenizer of conftest.py (no
download). Its deep layers are damped so that the target is learnable from layer 1 in a few dozen
steps.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from contextlib import nullcontext

import pytest
import torch

from conftest import tiny_tokenizer
from tiny import damp_deep_layers

from kangaroo.errors import KangarooError
from kangaroo.training.data import DataReport, make_batches, read_conversations, split, tokenize

WORDS = "the cat sat on a mat and then it ran to see what was there in the house of blue red green".split()
FAST = ["--threads", "1", "--no-progress", "--exit-layer", "1", "--batch-tokens", "512", "--seq-len", "96",
        "--val-size", "16", "--init", "random", "--lr", "1e-2", "--warmup-steps", "5"]


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tokenizer):
    """A 3-layer Llama (hidden 64) saved with the tiny in-process tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      initializer_range=0.25, tie_word_embeddings=True, attn_implementation="sdpa",
                      bos_token_id=1, eos_token_id=2, pad_token_id=2)
    model = LlamaForCausalLM(cfg).eval()
    damp_deep_layers(model, 1)  # deep layers barely change h_1: the target is learnable from ℓ = 1
    d = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d


def _chats(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        q = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 10)))
        a = " ".join(rng.choice(WORDS) for _ in range(rng.randint(10, 40)))
        out.append({"id": str(i), "source": "toy", "conversations": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
    return out


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    f = tmp_path_factory.mktemp("data") / "chats.jsonl"
    f.write_text("".join(json.dumps(c) + "\n" for c in _chats(200)))
    return f


def _encode(tokenizer, messages) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _train(argv: list[str]) -> int:
    from kangaroo.cli import main

    return main(["train", *argv])


# ---------------------------------------------------------------------- data
def test_formats_are_auto_detected(tmp_path):
    (tmp_path / "ours.jsonl").write_text(json.dumps(_chats(1)[0]) + "\n")
    (tmp_path / "sharegpt.json").write_text(json.dumps(
        [{"id": "x", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}]))
    (tmp_path / "alpaca.jsonl").write_text(json.dumps({"instruction": "Add", "input": "1+1", "output": "2"}) + "\n")
    convs, report = read_conversations([str(tmp_path)])
    assert report.kept == 3 and not report.skipped
    alpaca = next(c for c in convs if c.source == "alpaca")
    assert alpaca.messages == [{"role": "user", "content": "Add\n\n1+1"}, {"role": "assistant", "content": "2"}]
    sharegpt = next(c for c in convs if c.source == "sharegpt")
    assert [m["role"] for m in sharegpt.messages] == ["user", "assistant"]


def test_bad_lines_are_skipped_counted_and_located(tmp_path, caplog):
    good = json.dumps(_chats(1)[0])
    no_reply = json.dumps({"conversations": [{"role": "user", "content": "hello?"}]})
    empty_turn = json.dumps({"conversations": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}]})
    f = tmp_path / "mixed.jsonl"
    f.write_text("\n".join([good, "{not json", no_reply, "[1, 2]", empty_turn, good]) + "\n")
    convs, report = read_conversations([str(f)])
    assert len(convs) == 2
    assert report.skipped["no assistant turn"] == 1 and report.skipped["empty turn"] == 1
    assert sum(report.skipped.values()) == 4
    assert report.examples["no assistant turn"] == f"{f}:3"
    assert any(f"{f}:2" in r.getMessage() for r in caplog.records)  # the malformed line is named


def test_fatal_only_when_nothing_usable(tmp_path):
    with pytest.raises(KangarooError, match="data not found"):
        read_conversations([str(tmp_path / "missing.jsonl")])
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(KangarooError, match="no usable conversations"):
        read_conversations([str(tmp_path / "empty.jsonl")])
    (tmp_path / "bad.jsonl").write_text("{oops\n" + json.dumps({"conversations": [{"role": "user", "content": "q"}]}) + "\n")
    with pytest.raises(KangarooError, match=r"no usable conversations.*(malformed JSON|no assistant turn)"):
        read_conversations([str(tmp_path / "bad.jsonl")])


def test_spec_bench_is_refused(tmp_path):
    d = tmp_path / "spec_bench"
    d.mkdir()
    (d / "question.jsonl").write_text(json.dumps(_chats(1)[0]) + "\n")
    with pytest.raises(KangarooError, match="evaluation set"):
        read_conversations([str(d)])
    with pytest.raises(KangarooError, match="evaluation set"):
        read_conversations([str(d / "question.jsonl")])


def test_loss_only_on_assistant_tokens_and_seq_len(tokenizer):
    from kangaroo.training.data import Conversation

    conv = Conversation([{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "Hi there friend"},
                         {"role": "user", "content": "Again"}, {"role": "assistant", "content": "Hi"}], "t", "x:1")
    ex = tokenize(tokenizer, conv, 512)
    trained = [ex.ids[t + 1] for t, m in enumerate(ex.loss_mask) if m]  # the tokens the positions predict
    assert tokenizer.decode(trained) == "Hi there friend<|im_end|>Hi<|im_end|>"
    report = DataReport()
    prompt_len = len(_encode(tokenizer, conv.messages[:1]))
    assert tokenize(tokenizer, conv, prompt_len - 2, report) is None  # cut before any reply: skipped
    assert report.skipped["no assistant token within --seq-len"] == 1
    short = tokenize(tokenizer, conv, prompt_len + 3, report)
    assert len(short.ids) == prompt_len + 3 and report.skipped["truncated to --seq-len (kept)"] == 1


def test_split_and_batches_are_seeded():
    items = list(range(50))
    assert split(items, 5, seed=1) == split(items, 5, seed=1)
    train, val = split(items, 5, seed=1)
    assert sorted(train + val) == items and len(val) == 5
    lengths = [random.Random(i).randint(5, 90) for i in range(100)]
    b1, b2 = make_batches(lengths, 256, 0, 0), make_batches(lengths, 256, 0, 0)
    assert b1 == b2 and b1 != make_batches(lengths, 256, 0, 1)
    assert sorted(i for b in b1 for i in b) == list(range(100))
    assert all(max(lengths[i] for i in b) * len(b) <= 256 or len(b) == 1 for b in b1)


def test_cli_bad_data_is_one_line_exit_2(tmp_path, capsys, tiny_dir):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    assert _train(["--model", str(tiny_dir), "--data", str(tmp_path / "empty.jsonl"), "--out", str(tmp_path / "o"), *FAST]) == 2
    err = capsys.readouterr().err
    assert "no usable conversations" in err and "Traceback" not in err
    # an adapter layout that cannot exist is refused before any data work
    assert _train(["--model", str(tiny_dir), "--data", str(tmp_path / "empty.jsonl"), "--out", str(tmp_path / "o"),
                   "--kv-heads", "3", *FAST]) == 2
    err = capsys.readouterr().err
    assert "kv_heads must divide" in err and "Traceback" not in err
    assert _train(["--model", str(tiny_dir), "--data", str(tmp_path / "empty.jsonl"), "--out", str(tmp_path / "o"),
                   "--draft-vocab", "-1", *FAST]) == 2
    err = capsys.readouterr().err
    assert "--draft-vocab must be >= 0" in err and "Traceback" not in err


# ---------------------------------------------------------------------- optimisation
def test_one_step_lowers_the_loss(tiny_dir, data_file, tokenizer):
    from kangaroo.adapter import Adapter
    from kangaroo.loading import load_model
    from kangaroo.model import Backbone
    from kangaroo.training.data import tokenize_all
    from kangaroo.training.trainer import compute_features, draft_loss, pad_batch

    model, _ = load_model(str(tiny_dir))
    bb = Backbone(model.requires_grad_(False))
    convs, report = read_conversations([str(data_file)])
    examples = tokenize_all(tokenizer, convs[:8], 96, report)
    ids, mask = pad_batch(examples, "cpu")
    h, tid, tp = compute_features(bb, 1, ids, mask, top_k=32, chunk=256, autocast=nullcontext)
    adapter = Adapter.random(bb, 1, seed=0).train()
    opt = torch.optim.AdamW(adapter.parameters(), lr=1e-2)
    before = draft_loss(adapter, bb, h, mask, tid, tp, 256, nullcontext, backward=True)
    opt.step()
    with torch.no_grad():
        after = draft_loss(adapter, bb, h, mask, tid, tp, 256, nullcontext, backward=False)
    assert after["loss"] < before["loss"]
    # chunking the LM head changes nothing but memory
    with torch.no_grad():
        whole = draft_loss(adapter, bb, h, mask, tid, tp, 10_000, nullcontext, backward=False)
    assert whole["loss"] == pytest.approx(after["loss"], rel=1e-5)


def test_hand_written_gradient_equals_autograd(tiny_dir, data_file, tokenizer):
    """draft_loss's closed-form soft-CE gradient == autograd through log_softmax, chunked or not."""
    import torch.nn.functional as F

    from kangaroo.adapter import Adapter
    from kangaroo.loading import load_model
    from kangaroo.model import Backbone
    from kangaroo.training.data import tokenize_all
    from kangaroo.training.trainer import compute_features, draft_loss, pad_batch

    model, _ = load_model(str(tiny_dir))
    bb = Backbone(model.requires_grad_(False))
    convs, report = read_conversations([str(data_file)])
    ids, mask = pad_batch(tokenize_all(tokenizer, convs[:6], 96, report), "cpu")
    h, tid, tp = compute_features(bb, 1, ids, mask, top_k=8, chunk=256, autocast=nullcontext)
    adapter = Adapter.random(bb, 1, seed=3).train()

    a = adapter(h, bb, None, 0)[mask]
    logq = F.log_softmax(bb.lm_head(a).float(), dim=-1)
    p_norm = tp / tp.sum(-1, keepdim=True)
    ref_loss = -(p_norm * logq.gather(-1, tid.long())).sum()
    (ref_loss / a.shape[0]).backward()
    ref_grads = [p.grad.clone() for p in adapter.parameters()]
    for chunk in (7, 10_000):
        adapter.zero_grad()
        got = draft_loss(adapter, bb, h, mask, tid, tp, chunk, nullcontext, backward=True)
        assert got["loss"] == pytest.approx(ref_loss.item(), rel=1e-5)
        assert got["agree"] == float((logq.argmax(-1) == tid[:, 0]).sum())
        for ref, p in zip(ref_grads, adapter.parameters()):
            torch.testing.assert_close(p.grad, ref, rtol=1e-4, atol=1e-7)

    # --hard-weight w: the gradient of the target (1 - w) p̃ + w onehot(top-1); the reported loss stays the soft CE
    w = 0.5
    adapter.zero_grad()
    a = adapter(h, bb, None, 0)[mask]
    logq = F.log_softmax(bb.lm_head(a).float(), dim=-1)
    hard_ref = -((1 - w) * (p_norm * logq.gather(-1, tid.long())).sum() + w * logq.gather(-1, tid[:, :1].long()).sum())
    (hard_ref / a.shape[0]).backward()
    hard_grads = [p.grad.clone() for p in adapter.parameters()]
    assert not all(torch.allclose(a_, b_) for a_, b_ in zip(hard_grads, ref_grads))
    adapter.zero_grad()
    got = draft_loss(adapter, bb, h, mask, tid, tp, 7, nullcontext, backward=True, hard_weight=w)
    assert got["loss"] == pytest.approx(ref_loss.item(), rel=1e-5)
    for ref, p in zip(hard_grads, adapter.parameters()):
        torch.testing.assert_close(p.grad, ref, rtol=1e-4, atol=1e-7)


def test_trained_adapter_accepts_more_than_random(tiny_dir, data_file, tmp_path):
    from kangaroo.adapter import Adapter
    from kangaroo.config import KangarooConfig
    from kangaroo.decoding import KangarooDecoder
    from kangaroo.loading import load_model
    from kangaroo.model import Backbone

    out = tmp_path / "run"
    assert _train(["--model", str(tiny_dir), "--data", str(data_file), "--out", str(out), "--max-steps", "60",
                   "--val-every", "30", *FAST]) == 0
    model, tok = load_model(str(tiny_dir))
    bb = Backbone(model)
    trained, cfg = Adapter.load(out, bb, 1)
    assert cfg.training["final_metrics"]["val_agreement"] > 0.5
    assert trained.draft_vocab is None and cfg.draft_vocab is None  # 8,192 is over half this tiny vocabulary
    assert (out / "curves.png").is_file() and (out / "metrics.jsonl").is_file()
    config = KangarooConfig(exit_layer=1, max_steps=6, threshold=0.0)
    prompts = [_encode(tok, [{"role": "user", "content": " ".join(WORDS[i : i + 5])}]) for i in range(0, 15, 5)]

    def accepted(adapter) -> int:
        dec = KangarooDecoder(bb, adapter, config)
        return sum(dec.generate(torch.tensor([p]), 24).accepted for p in prompts)

    assert accepted(trained) > accepted(Adapter.random(bb, 1, seed=0)) + 10


def test_exported_adapter_gets_a_draft_vocabulary(tiny_dir, data_file, tmp_path):
    from collections import Counter

    from kangaroo.adapter import Adapter
    from kangaroo.loading import load_model
    from kangaroo.model import Backbone

    out = tmp_path / "run"
    assert _train(["--model", str(tiny_dir), "--data", str(data_file), "--out", str(out), "--max-steps", "4",
                   "--val-every", "4", "--draft-vocab", "32", *FAST]) == 0
    model, tok = load_model(str(tiny_dir))
    adapter, cfg = Adapter.load(out, Backbone(model), 1)
    vocab = adapter.draft_vocab.tolist()
    assert len(vocab) == cfg.draft_vocab["size"] == 32 and vocab == sorted(vocab)
    assert tok.eos_token_id in vocab and cfg.draft_vocab["source"] == "training targets"
    # the most frequent reply token of the data is in it
    replies = [json.loads(line)["conversations"][1]["content"] for line in data_file.read_text().splitlines()]
    counts = Counter(t for r in replies for t in tok(r, add_special_tokens=False).input_ids)
    assert counts.most_common(1)[0][0] in vocab and 0.5 < cfg.draft_vocab["token_coverage"] <= 1.0


def test_sigkill_then_resume_matches_uninterrupted(tiny_dir, data_file, tmp_path):
    args = ["--model", str(tiny_dir), "--data", str(data_file), "--max-steps", "40", "--val-every", "20",
            "--save-every", "5", *FAST]
    full = tmp_path / "full"
    assert _train([*args, "--out", str(full)]) == 0

    cut = tmp_path / "cut"
    cmd = [sys.executable, "-m", "kangaroo.cli", "train", *args, "--out", str(cut)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    def steps_saved():
        return [int(p.name.split("-")[1]) for p in (cut / "checkpoints").glob("step-*")]

    while not any(25 <= s < 40 for s in steps_saved()):  # past the first validation, before the end
        assert proc.poll() is None and time.time() < deadline, "training ended before it could be killed"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (cut / "adapter.safetensors").exists()
    assert _train([*args, "--out", str(cut), "--resume"]) == 0

    def final(d):
        return json.loads((d / "adapter_config.json").read_text())["training"]["final_metrics"]

    a, b = final(full), final(cut)
    for k in ("val_loss", "val_agreement", "val_accept", "steps", "best_step", "train_tokens_seen"):
        assert a[k] == pytest.approx(b[k], rel=1e-6), k
    from safetensors.torch import load_file

    wa, wb = load_file(str(full / "adapter.safetensors")), load_file(str(cut / "adapter.safetensors"))
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)
    rows = [json.loads(line) for line in (cut / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "val_loss" in r] == [20, 40]  # no duplicate rows after the resume


def test_self_distill_batches_equal_batch_one_greedy_and_are_cached(tiny_dir, tmp_path):
    from kangaroo.loading import load_model
    from kangaroo.model import Backbone
    from kangaroo.training.data import Conversation
    from kangaroo.training.distill import greedy_batch, load_cache, self_distill
    from tiny import hf_greedy

    model, tok = load_model(str(tiny_dir))
    prompts = [_encode(tok, [{"role": "user", "content": " ".join(WORDS[i : i + k])}]) for i, k in ((0, 3), (4, 9), (2, 5))]
    batched = greedy_batch(model, prompts, 12, {2}, pad_id=2)
    for p, (out, finished) in zip(prompts, batched):
        ref = hf_greedy(model, torch.tensor([p]), 12, eos_token_id=2)
        assert out == [t for t in ref if t != 2][: len(out)] and (finished or len(out) == 12)
    convs = [Conversation([{"role": "user", "content": w}, {"role": "assistant", "content": "x"}], "toy", f"f:{i}")
             for i, w in enumerate(["the cat", "a mat", "the cat"])]
    cache = tmp_path / "answers.jsonl"
    out, counts = self_distill(convs, Backbone(model), tok, cache, max_new_tokens=8, batch_size=2, eos_token_ids={2}, progress=False)
    assert len(load_cache(cache)) == 2  # the repeated prompt is generated once
    assert [c.messages[0]["content"] for c in out] == ["the cat", "a mat", "the cat"]
    again, _ = self_distill(convs, Backbone(model), tok, cache, max_new_tokens=8, generate=False, progress=False)
    assert [c.messages for c in again] == [c.messages for c in out]


def test_train_config_takes_every_option_by_field_name(monkeypatch, tmp_path):
    import kangaroo.training.trainer as trainer
    from kangaroo.cli import main
    from kangaroo.training.config import TrainConfig

    seen = {}
    monkeypatch.setattr(trainer, "train", lambda cfg: seen.setdefault("cfg", cfg) and {})
    argv = ["train", "--data", "a.jsonl", "b.jsonl", "--out", str(tmp_path), "--lr", "0.002", "--kv-heads", "4",
            "--distill-only", "--no-progress", "--feature-cache-gb", "1.5", "--threads", "2"]
    assert main(argv) == 0
    cfg = seen["cfg"]
    assert cfg.data == ["a.jsonl", "b.jsonl"] and cfg.out == str(tmp_path) and cfg.lr == 0.002 and cfg.kv_heads == 4
    assert cfg.self_distill and cfg.distill_only and not cfg.progress and cfg.feature_cache_gb == 1.5 and cfg.threads == 2
    d = TrainConfig()
    assert (cfg.model, cfg.exit_layer, cfg.betas, cfg.chunk, cfg.seq_len) == (d.model, d.exit_layer, d.betas, d.chunk, d.seq_len)


# ---------------------------------------------------------------------- task-diverse prompts
def _toy_train_dir(root):
    """The five files of ../shared/data/train, in miniature (prose long enough for passages)."""
    rng = random.Random(1)
    root.mkdir()

    def prose(n):
        return ". ".join(" ".join(rng.choice(WORDS) for _ in range(10)).capitalize() for _ in range(n)) + "."

    share = []
    for i in range(60):
        turns = []
        for _ in range(2):
            turns += [{"role": "user", "content": f"Question {i} about {rng.choice(WORDS)}?"},
                      {"role": "assistant", "content": prose(rng.randint(15, 40))}]
        share.append({"id": f"s{i}", "source": "sharegpt_v3", "conversations": turns})
    simple = lambda name, n: [{"id": f"{name}{i}", "source": name, "conversations": [  # noqa: E731
        {"role": "user", "content": f"{name} task {i}: {prose(1)}"}, {"role": "assistant", "content": prose(2)}]} for i in range(n)]
    files = {"sharegpt_v3.jsonl": share, "gsm8k_train.jsonl": simple("gsm8k", 20), "gpteacher_codegen.jsonl": simple("code", 20),
             "gpteacher_roleplay.jsonl": simple("roleplay", 10), "self_instruct_seed_tasks.jsonl": simple("seed", 10)}
    for name, records in files.items():
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in records))
    return root


def test_task_prompts_cover_every_kind_and_train_with_self_distillation(tiny_dir, tmp_path, capsys):
    """`python -m kangaroo.training.tasks` writes prompt-only records of every kind; they are
    refused without --self-distill, answered by the target with it (multi-turn prompts whole), and
    validation reports agreement per kind, also in the curves."""
    from kangaroo.training import tasks
    from kangaroo.training.data import read_conversations
    from kangaroo.training.distill import prompt_messages

    train_dir = _toy_train_dir(tmp_path / "train")
    out = tmp_path / "prompts"
    assert tasks.main(["--data", str(train_dir), "--out", str(out), "--per-kind", "6"]) == 0
    assert sorted(p.stem for p in out.glob("*.jsonl")) == sorted(tasks.KINDS)
    again = tmp_path / "again"
    assert tasks.main(["--data", str(train_dir), "--out", str(again), "--per-kind", "6"]) == 0
    assert all((out / f.name).read_text() == f.read_text() for f in again.glob("*.jsonl"))  # seeded
    convs, report = read_conversations([str(out)], prompts_ok=True)
    assert len(convs) == 6 * len(tasks.KINDS) and all(c.prompt_only for c in convs)
    multi = [c for c in convs if c.source == "task-multi_turn"]
    assert all(len(prompt_messages(c)) >= 3 and prompt_messages(c)[-1]["role"] == "user" for c in multi)
    with pytest.raises(KangarooError, match="prompt without a reply"):
        read_conversations([str(out)])
    assert tasks.main(["--data", str(tmp_path / "nowhere"), "--out", str(out)]) == 2
    assert "missing" in capsys.readouterr().err

    # passages need a longer --seq-len; a bigger held-out set holds every kind
    LONG = [{"96": "700", "512": "2048", "16": "40"}.get(a, a) for a in FAST]
    assert LONG[-6:-4] == ["--init", "random"]
    run = tmp_path / "run"
    assert _train(["--model", str(tiny_dir), "--data", str(out), "--out", str(run), "--max-steps", "3", "--val-every", "3",
                   "--self-distill", "--distill-cache", str(tmp_path / "answers"), "--distill-max-new-tokens", "8", "--distill-max-prompt-tokens", "1024",
                   *LONG]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    by_kind = [r for r in rows if "val_agreement_by_kind" in r][-1]["val_agreement_by_kind"]
    assert len(by_kind) == len(tasks.KINDS) and all(k.startswith("task-") and 0 <= v <= 1 for k, v in by_kind.items())
    assert (run / "curves.png").is_file()

    # continuing from that adapter: validated once before the first step
    more = tmp_path / "more"
    assert _train(["--model", str(tiny_dir), "--data", str(out), "--out", str(more), "--max-steps", "2", "--val-every", "2",
                   "--self-distill", "--distill-cache", str(tmp_path / "answers"), "--distill-max-new-tokens", "8", "--distill-max-prompt-tokens", "1024",
                   *LONG[:-6], "--init", str(run), *LONG[-4:]]) == 0
    first = json.loads((more / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 0 and first["initial"] and "val_agreement_by_kind" in first
    assert _train(["--model", str(tiny_dir), "--data", str(out), "--out", str(more), "--init", str(tmp_path / "nope")]) == 2


def test_fixed_validation_cached_answers_only_and_an_mlp_continuation(tiny_dir, tmp_path):
    """--val-data validates on its own files; --distill-cached-only trains on answered prompts and
    generates nothing (the rest are counted); --adapter-mlp on a continued adapter starts exactly
    where that adapter was (zero output projection) and is exported with its MLP."""
    from kangaroo.adapter import Adapter
    from kangaroo.loading import load_model
    from kangaroo.model import Backbone

    chats = _chats(60, seed=5)
    data, val, fresh = tmp_path / "data.jsonl", tmp_path / "val.jsonl", tmp_path / "fresh.jsonl"
    data.write_text("".join(json.dumps(c) + "\n" for c in chats[:50]))
    val.write_text("".join(json.dumps(c) + "\n" for c in chats[50:]))
    fresh.write_text("".join(json.dumps(c) + "\n" for c in _chats(4, seed=9)))
    answers = tmp_path / "answers"
    distill = ["--self-distill", "--distill-cache", str(answers), "--distill-max-new-tokens", "8"]
    base = tmp_path / "base"
    assert _train(["--model", str(tiny_dir), "--data", str(data), "--val-data", str(val), "--out", str(base),
                   "--max-steps", "4", "--val-every", "4", *distill, *FAST]) == 0
    info = json.loads((base / "train_config.json").read_text())["data"]
    assert info["val_conversations"] == 10 and info["train_conversations"] == 50  # nothing split off --data
    cache = next(answers.glob("*.jsonl"))
    lines = cache.read_text().count("\n")

    runs = {}
    for name, extra in (("same", []), ("mlp", ["--adapter-mlp", "24"])):
        runs[name] = tmp_path / name
        assert _train(["--model", str(tiny_dir), "--data", str(data), str(fresh), "--val-data", str(val), "--out", str(runs[name]),
                       "--max-steps", "2", "--val-every", "2", "--distill-cached-only", *distill, *FAST[:-6],
                       "--init", str(base), *FAST[-4:], *extra]) == 0
    assert cache.read_text().count("\n") == lines  # nothing generated
    info = json.loads((runs["mlp"] / "train_config.json").read_text())["data"]
    assert info["self_distill"]["train"]["no answer"] == 4 and info["train_conversations"] == 50
    first = [json.loads(f.read_text().splitlines()[0]) for f in (runs["same"] / "metrics.jsonl", runs["mlp"] / "metrics.jsonl")]
    assert first[0]["initial"] and first[0]["val_loss"] == pytest.approx(first[1]["val_loss"], rel=1e-6)
    model, _ = load_model(str(tiny_dir))
    adapter, config = Adapter.load(runs["mlp"], Backbone(model))
    assert config.mlp_hidden == 24 and adapter.mlp_hidden == 24 and float(adapter.down.weight.detach().abs().sum()) > 0
    # a wider --adapter-mlp widens a continued MLP (the new units silent at first); a narrower one is refused
    cont = ["--model", str(tiny_dir), "--data", str(data), "--val-data", str(val), "--max-steps", "1", "--val-every", "1",
            "--distill-cached-only", *distill, *FAST[:-6], "--init", str(runs["mlp"]), *FAST[-4:]]
    assert _train([*cont, "--out", str(tmp_path / "wide"), "--adapter-mlp", "40"]) == 0
    mlp_first = json.loads((runs["mlp"] / "metrics.jsonl").read_text().splitlines()[-1])
    wide_first = json.loads((tmp_path / "wide" / "metrics.jsonl").read_text().splitlines()[0])
    assert wide_first["initial"] and wide_first["val_loss"] == pytest.approx(mlp_first["val_loss"], rel=1e-5)
    assert Adapter.load(tmp_path / "wide", Backbone(model))[1].mlp_hidden == 40
    assert _train([*cont, "--out", str(tmp_path / "narrow"), "--adapter-mlp", "8"]) == 2
    assert _train(["--model", str(tiny_dir), "--data", str(data), "--out", str(tmp_path / "bad"), "--adapter-mlp", "-1"]) == 2
