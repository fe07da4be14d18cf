"""Task-diverse self-distillation prompts, built from the training data's own text.

The shipped adapter learned from chat, maths and code answers; its drafts are weakest on the kinds of
work that chat data rarely shows: summarising a given passage, translating, answering from supplied
passages. Self-distillation needs only prompts (the target writes the answers), so this module turns
the training files' text into prompts of every kind users ask for, with no evaluation data:

* ``summarize``: a long passage (an answer from ShareGPT, 120-700 words) after an instruction
  ("Summarize: ...", and other phrasings);
* ``translate``: one to three English sentences to translate into German, French or Spanish;
* ``passage_qa``: passages (a long answer, sometimes with a second, unrelated one) followed by the
  question that answer was written for;
* ``rewrite``: rewriting and extraction instructions over a paragraph (simplify, make formal,
  list the key facts, extract names and numbers, turn into a table, fix the grammar);
* ``multi_turn``: a ShareGPT conversation cut before one of its later user turns, whole;
* ``math`` (GSM8K train questions), ``code`` (GPTeacher code instructions), ``chat`` (first
  ShareGPT turns, GPTeacher role play, self-instruct seeds).

Every record is ``{"id", "source": "task-<kind>", "prompt_only": true, "conversations": [...]}``
ending with a user turn (a prompt, answered by the target at self-distillation; :mod:`kangaroo.training.data` accepts
such records only with ``--self-distill``). The choice is seeded, so the same files give the same
prompts. Spec-Bench's questions and their source datasets' test splits are never read: the
inputs are ``../shared/data/train`` (its README gives provenance and licences).

    python -m kangaroo.training.tasks --data ../shared/data/train --out runs/task-prompts --per-kind 200
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from collections import Counter
from pathlib import Path

from ..errors import KangarooError

KINDS = ("summarize", "translate", "passage_qa", "rewrite", "multi_turn", "math", "code", "chat")

SUMMARIZE = ("Summarize: {p}", "Summarize the following text in a few sentences.\n\n{p}",
             "{p}\n\nSummarize the text above.", "Write a short summary of this article:\n\n{p}",
             "TL;DR:\n{p}", "Give a one-paragraph summary of the following.\n\n{p}")
LANGUAGES = ("German", "French", "Spanish")
TRANSLATE = ("Translate English to {lang}: {s}", "Translate the following text into {lang}.\n\n{s}",
             "How do you say this in {lang}? \"{s}\"", "Translate to {lang}: {s}")
REWRITE = ("Rewrite the following paragraph in simpler words.\n\n{p}",
           "Rewrite this text in a formal tone:\n\n{p}",
           "List the key facts in the text below as bullet points.\n\n{p}",
           "Extract every name, number and date mentioned in this text.\n\n{p}",
           "Fix any grammar or spelling mistakes in the following text and return the corrected text.\n\n{p}",
           "Turn the following text into a table with the most important items and their descriptions.\n\n{p}",
           "Write three questions that the following text answers.\n\n{p}",
           "{p}\n\nWhat is the main point of the text above? Answer in one sentence.")


def _records(path: Path):
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def _words(text: str) -> int:
    return len(text.split())


def _clean(text: str) -> str:
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def _sentences(text: str) -> list[str]:
    """Plain English prose sentences (no code, lists or markup) of 6-40 words."""
    out = []
    for para in text.split("\n"):
        if not para or para.lstrip()[:1] in "-*#|`>0123456789" or "```" in para:
            continue
        for s in re.split(r"(?<=[.!?])\s+", para.strip()):
            if 6 <= _words(s) <= 40 and s[:1].isupper() and s[-1:] in ".!?" and not re.search(r"[{}<>\[\]=_`]", s):
                out.append(s)
    return out


def build(train_dir: Path, per_kind: int, seed: int = 0) -> dict[str, list[dict]]:
    """``per_kind`` prompt records for every kind in :data:`KINDS`, from the files in ``train_dir``."""
    def need(name: str) -> Path:
        path = train_dir / name
        if not path.exists():
            raise KangarooError(f"{path} is missing (expected the training files of ../shared/data/train)")
        return path

    rng = random.Random(seed)
    share = list(_records(need("sharegpt_v3.jsonl")))
    rng.shuffle(share)
    gsm = list(_records(need("gsm8k_train.jsonl")))
    code = list(_records(need("gpteacher_codegen.jsonl")))
    chat = list(_records(need("gpteacher_roleplay.jsonl"))) + list(_records(need("self_instruct_seed_tasks.jsonl")))

    # passages: long prose answers; (question, answer) pairs for passage QA
    passages, qa_pairs, sentences, convs = [], [], [], []
    for r in share:
        turns = r["conversations"]
        for u, a in zip(turns[::2], turns[1::2]):
            text = _clean(a["content"])
            if 120 <= _words(text) <= 700 and text.count("```") == 0:
                passages.append(text)
                if 4 <= _words(u["content"]) <= 60:
                    qa_pairs.append((text, u["content"].strip()))
            sentences.extend(_sentences(a["content"]))
        if len(turns) >= 4 and sum(_words(t["content"]) for t in turns[:3]) <= 600:
            convs.append(turns)
    rng.shuffle(sentences)
    out: dict[str, list[dict]] = {}

    def emit(kind: str, items: list[list[dict]]) -> None:
        out[kind] = [{"id": f"task-{kind}-{i}", "source": f"task-{kind}", "prompt_only": True, "conversations": msgs}
                     for i, msgs in enumerate(items[:per_kind])]

    def user(text: str) -> list[dict]:
        return [{"role": "user", "content": text}]

    pool = passages[:]
    emit("summarize", [user(rng.choice(SUMMARIZE).format(p=p)) for p in pool[:per_kind]])
    pool = pool[per_kind:]
    emit("rewrite", [user(rng.choice(REWRITE).format(p=p if _words(p) <= 300 else p[: p.rfind(" ", 0, 1800)]))
                     for p in pool[:per_kind]])
    items, used = [], set(pool[:per_kind])
    for text, question in qa_pairs:
        if text in used:
            continue
        context = text
        if rng.random() < 0.5:  # a distractor passage first, as retrieval returns
            other = rng.choice(passages)
            if other != text and _words(other) + _words(text) <= 750:
                context = f"{other}\n\n{text}"
        items.append(user(f"{context}\n{question}"))
        used.add(text)
        if len(items) == per_kind:
            break
    emit("passage_qa", items)
    items = []
    for i in range(per_kind):
        n = rng.choice((1, 1, 2, 3))
        s = " ".join(sentences[3 * i: 3 * i + n])
        items.append(user(rng.choice(TRANSLATE).format(lang=rng.choice(LANGUAGES), s=s)))
    emit("translate", items)
    items = []
    for turns in convs:
        cut = rng.randrange(3, len(turns) + 1, 2)  # end at a user turn after at least one reply
        items.append([dict(role=t["role"], content=t["content"]) for t in turns[:cut]])
    emit("multi_turn", items)
    rng.shuffle(gsm)
    emit("math", [user(r["conversations"][0]["content"]) for r in gsm])
    rng.shuffle(code)
    emit("code", [user(r["conversations"][0]["content"]) for r in code])
    firsts = [r["conversations"][0]["content"] for r in share[len(share) // 2:] if _words(r["conversations"][0]["content"]) <= 200]
    firsts += [r["conversations"][0]["content"] for r in chat]
    rng.shuffle(firsts)
    emit("chat", [user(t) for t in firsts])
    short = [k for k in KINDS if len(out.get(k, [])) < per_kind]
    if short:
        raise KangarooError(f"not enough source text for {per_kind} prompts of kind(s) {', '.join(short)}")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kangaroo.training.tasks", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="the training folder (../shared/data/train)")
    p.add_argument("--out", required=True, help="folder to write one JSONL file per kind into")
    p.add_argument("--per-kind", type=int, default=200, help="prompts per kind (default 200)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        if args.per_kind <= 0:
            raise KangarooError(f"--per-kind must be > 0, got {args.per_kind}")
        if "spec_bench" in Path(args.data).resolve().parts:
            raise KangarooError(f"{args.data} is the evaluation set: never build training prompts from it")
        kinds = build(Path(args.data), args.per_kind, args.seed)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        for kind, records in kinds.items():
            (out / f"{kind}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    except KangarooError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    counts = Counter({k: len(v) for k, v in kinds.items()})
    print(f"wrote {sum(counts.values())} prompts to {out}: " + ", ".join(f"{k} {n}" for k, n in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
