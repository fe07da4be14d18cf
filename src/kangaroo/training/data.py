"""Chat data for adapter training: read, validate, tokenise with the chat template, split, batch.

Three on-disk formats are recognised per record, so one folder may mix them:

* ours (``shared/data/train/*.jsonl``): ``{"id", "source", "conversations": [{"role", "content"}, ...]}``
  (``"messages"`` is accepted as a synonym of ``"conversations"``);
* ShareGPT: ``{"conversations": [{"from": "human"|"gpt", "value": ...}, ...]}``;
* Alpaca: ``{"instruction", "input", "output"}``.

Files are ``.jsonl`` (one record a line) or ``.json`` (a list of records). A record that cannot be
used is skipped and counted by reason, with the first few ``file:line`` places logged; reading fails
only when nothing usable remains. Hugging Face dataset names (``hf:org/name``) are an optional path
when a network and the ``datasets`` package exist.
"""

from __future__ import annotations

import json
import logging
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import KangarooError

logger = logging.getLogger(__name__)

#: folders never to train on: the evaluation set (shared/data/README.md)
FORBIDDEN_DIRS = ("spec_bench",)
DATA_SUFFIXES = (".jsonl", ".json")
_ROLES = {
    "user": "user", "human": "user",
    "assistant": "assistant", "gpt": "assistant", "chatgpt": "assistant", "bing": "assistant",
    "bard": "assistant", "model": "assistant",
    "system": "system",
}


@dataclass
class Conversation:
    """One chat: ``messages`` = ``[{"role": "system"|"user"|"assistant", "content": str}, ...]``."""

    messages: list[dict]
    source: str  # the record's "source" field, else the file's stem
    where: str  # "file:line" (or "file:#index" inside a JSON list), for messages
    # a prompt with no reply yet (ends with a user turn): only self-distillation can use it, and it
    # answers the whole conversation, not just the first turn (kangaroo.training.tasks writes these)
    prompt_only: bool = False


@dataclass
class DataReport:
    """What reading (and tokenising) kept and skipped, saved into the adapter config."""

    files: list[str] = field(default_factory=list)
    read: int = 0  # records seen
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> count
    examples: dict = field(default_factory=dict)  # reason -> first "file:line"
    by_source: Counter = field(default_factory=Counter)

    def skip(self, reason: str, where: str) -> None:
        self.skipped[reason] += 1
        if self.skipped[reason] <= 3:
            logger.warning("skipping %s: %s", where, reason)
        self.examples.setdefault(reason, where)

    def to_dict(self) -> dict:
        return {"files": self.files, "records": self.read, "kept": self.kept,
                "skipped": dict(self.skipped), "first_skipped_at": self.examples, "by_source": dict(self.by_source)}


# ---------------------------------------------------------------------- reading
def check_not_eval_set(path: Path) -> None:
    """Refuse the Spec-Bench evaluation data (any path with a ``spec_bench`` component)."""
    parts = {p.lower() for p in path.resolve().parts}
    if any(name in parts for name in FORBIDDEN_DIRS):
        raise KangarooError(f"{path} is the Spec-Bench evaluation set: never train on it (use shared/data/train)")


def data_files(spec: str) -> list[Path]:
    """Expand one ``--data`` argument (file or folder) into data files, sorted for determinism."""
    path = Path(spec).expanduser()
    check_not_eval_set(path)
    if not path.exists():
        raise KangarooError(f"data not found: {path}")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in DATA_SUFFIXES)
        if not files:
            raise KangarooError(f"no .jsonl or .json files in {path}")
        for f in files:
            check_not_eval_set(f)
        return files
    return [path]


def read_conversations(specs: list[str], report: DataReport | None = None,
                       prompts_ok: bool = False) -> tuple[list[Conversation], DataReport]:
    """Read every file or folder in ``specs`` (``hf:name`` = a Hugging Face dataset).
    ``prompts_ok``: keep prompt-only records (ending with a user turn), for self-distillation.

    Raises:
        KangarooError: missing path, the evaluation set, or no usable conversation at all.
    """
    report = report or DataReport()
    out: list[Conversation] = []
    for spec in specs:
        if spec.startswith("hf:"):
            out.extend(_read_hf(spec[3:], report))
            continue
        for file in data_files(spec):
            report.files.append(str(file))
            out.extend(_read_file(file, report, prompts_ok))
    if not out:
        reasons = ", ".join(f"{n} {r}" for r, n in report.skipped.most_common()) or "no records"
        raise KangarooError(f"no usable conversations in {', '.join(specs)} ({reasons})")
    return out, report


def _read_file(file: Path, report: DataReport, prompts_ok: bool = False) -> list[Conversation]:
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise KangarooError(f"{file}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise KangarooError(f"cannot read {file}: {exc.strerror}") from None
    if not text.strip():
        logger.warning("%s is empty", file)
        report.skip("empty file", str(file))
        return []
    records: list[tuple[str, object]] = []
    stripped = text.lstrip()
    if file.suffix == ".json" and stripped[:1] in "[{":
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            data = None  # maybe JSON lines after all; fall through
        if isinstance(data, dict):
            data = data.get("data", [data])
        if isinstance(data, list):
            records = [(f"{file}:#{i}", r) for i, r in enumerate(data)]
    if not records:
        for n, line in enumerate(text.split("\n"), 1):  # not splitlines(): U+2028 may sit inside a JSON string
            if not line.strip():
                continue
            where = f"{file}:{n}"
            try:
                records.append((where, json.loads(line)))
            except json.JSONDecodeError as exc:
                report.read += 1
                report.skip(f"malformed JSON ({exc.msg})", where)
    out = []
    for where, record in records:
        report.read += 1
        conv = parse_record(record, where, file.stem, report, prompts_ok)
        if conv is not None:
            out.append(conv)
            report.kept += 1
            report.by_source[conv.source] += 1
    return out


def parse_record(record, where: str, default_source: str, report: DataReport, prompts_ok: bool = False) -> Conversation | None:
    """One record in any supported format -> a validated :class:`Conversation`, or None (counted)."""
    if not isinstance(record, dict):
        report.skip("record is not a JSON object", where)
        return None
    source = str(record.get("source") or default_source)
    turns = record.get("conversations", record.get("messages"))
    if turns is None and "instruction" in record and "output" in record:  # Alpaca
        user = str(record.get("instruction") or "")
        if record.get("input"):
            user = f"{user}\n\n{record['input']}"
        turns = [{"role": "user", "content": user}, {"role": "assistant", "content": record.get("output")}]
    if not isinstance(turns, list):
        report.skip("no 'conversations', 'messages' or 'instruction'/'output' fields", where)
        return None
    messages = []
    for t in turns:
        if not isinstance(t, dict):
            report.skip("a turn is not an object", where)
            return None
        role = t.get("role", t.get("from"))
        content = t.get("content", t.get("value"))
        role = _ROLES.get(str(role).lower()) if role is not None else None
        if role is None:
            report.skip(f"unknown role {t.get('role', t.get('from'))!r}", where)
            return None
        if not isinstance(content, str) or not content.strip():
            report.skip("empty turn", where)
            return None
        messages.append({"role": role, "content": content})
    if messages and messages[0]["role"] == "system":
        body = messages[1:]
    else:
        body = messages
    if any(m["role"] == "system" for m in body):
        report.skip("system turn after the start", where)
        return None
    if not body or body[0]["role"] != "user":
        report.skip("does not start with a user turn", where)
        return None
    if any(a["role"] == b["role"] for a, b in zip(body, body[1:])):
        report.skip("roles do not alternate", where)
        return None
    if record.get("prompt_only") is True and body[-1]["role"] == "user":
        if not prompts_ok:
            report.skip("prompt without a reply (needs --self-distill)", where)
            return None
        return Conversation(messages, source, where, prompt_only=True)
    if not any(m["role"] == "assistant" for m in body):
        report.skip("no assistant turn", where)
        return None
    if body[-1]["role"] == "user":  # a trailing question with no reply teaches nothing
        messages = messages[:-1]
    return Conversation(messages, source, where)


def _read_hf(name: str, report: DataReport) -> list[Conversation]:
    """Optional: a Hugging Face dataset (needs the ``datasets`` package and a network)."""
    try:
        import datasets
    except ImportError:
        raise KangarooError(f"hf:{name} needs the 'datasets' package (pip install datasets)") from None
    try:
        ds = datasets.load_dataset(name, split="train")
    except Exception as exc:  # network errors, unknown names: one line for the user
        raise KangarooError(f"cannot load Hugging Face dataset {name}: {str(exc).splitlines()[0]}") from None
    report.files.append(f"hf:{name}")
    out = []
    for i, record in enumerate(ds):
        report.read += 1
        conv = parse_record(dict(record), f"hf:{name}#{i}", name.split("/")[-1], report)
        if conv is not None:
            out.append(conv)
            report.kept += 1
            report.by_source[conv.source] += 1
    return out


# ---------------------------------------------------------------------- tokenising
@dataclass
class Example:
    """A tokenised conversation. ``loss_mask[t]`` is True when token ``t+1`` is an assistant token,
    i.e. the position's next-token prediction is trained (``len(loss_mask) == len(ids)``)."""

    ids: list[int]
    loss_mask: list[bool]
    source: str

    @property
    def n_loss(self) -> int:
        return sum(self.loss_mask)


def _assistant_char_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """Render ``messages`` with the chat template; return the text and the character spans of the
    assistant replies (content + end-of-turn marker, trailing whitespace excluded)."""
    def render(msgs, gen):
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

    full = render(messages, False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before, through = render(messages[:i], True), render(messages[: i + 1], False)
        if not (through.startswith(before) and full.startswith(through)):
            raise ValueError("chat template is not prefix-stable")
        end = len(through.rstrip())
        spans.append((len(before), end))
    return full, spans


def tokenize(tokenizer, conv: Conversation, seq_len: int, report: DataReport | None = None) -> Example | None:
    """Chat-template a conversation; train only on assistant tokens; cut at ``seq_len`` tokens.

    Models without a chat template use a plain ``User: ... / Assistant: ...`` layout.
    Returns None (counted in ``report``) when no assistant token is left within ``seq_len``.
    """
    if getattr(tokenizer, "chat_template", None):
        try:
            text, spans = _assistant_char_spans(tokenizer, conv.messages)
        except Exception as exc:  # template errors are data errors for this record
            if report:
                report.skip(f"chat template failed ({type(exc).__name__})", conv.where)
            return None
    else:
        text, spans = "", []
        for m in conv.messages:
            head = f"{m['role'].capitalize()}: "
            text += head
            if m["role"] == "assistant":
                spans.append((len(text), len(text) + len(m["content"])))
            text += m["content"] + "\n"
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    is_assistant = [any(a <= s < b for a, b in spans) for s, _ in offsets]
    truncated = len(ids) > seq_len
    ids, is_assistant = ids[:seq_len], is_assistant[:seq_len]
    loss_mask = is_assistant[1:] + [False]
    if not any(loss_mask):
        if report:
            report.skip("no assistant token within --seq-len", conv.where)
        return None
    if truncated and report:
        report.skipped["truncated to --seq-len (kept)"] += 1
    return Example(ids, loss_mask, conv.source)


def tokenize_all(tokenizer, convs: list[Conversation], seq_len: int, report: DataReport) -> list[Example]:
    out = [e for c in convs if (e := tokenize(tokenizer, c, seq_len, report)) is not None]
    if not out:
        raise KangarooError(f"no usable conversations left after tokenising ({dict(report.skipped)})")
    return out


def split(items: list, val_size: int, seed: int) -> tuple[list, list]:
    """Seeded shuffle, then the first ``val_size`` items are held out for validation."""
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    val_size = min(val_size, max(len(items) - 1, 0))
    return [items[i] for i in order[val_size:]], [items[i] for i in order[:val_size]]


def make_batches(lengths: list[int], batch_tokens: int, seed: int, epoch: int) -> list[list[int]]:
    """Group example indices into batches of at most ``batch_tokens`` padded tokens.

    Examples are shuffled (seed, epoch), sorted by length inside windows of 64 batches' worth so
    that padding stays small, packed greedily, and the batch order shuffled again. Deterministic in
    (lengths, batch_tokens, seed, epoch): that is what makes ``--resume`` exact.
    """
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = max(64 * batch_tokens // max(1, max(lengths)), 64)
    batches: list[list[int]] = []
    for w in range(0, len(order), window):
        chunk = sorted(order[w : w + window], key=lambda i: lengths[i])
        cur: list[int] = []
        for i in chunk:
            longest = max([lengths[j] for j in cur] + [lengths[i]])
            if cur and longest * (len(cur) + 1) > batch_tokens:
                batches.append(cur)
                cur = []
            cur.append(i)
        if cur:
            batches.append(cur)
    rng.shuffle(batches)
    return batches
