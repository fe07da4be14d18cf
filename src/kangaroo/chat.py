"""``kangaroo chat``: a conversation in the terminal, each answer streamed as Kangaroo accepts it.

Each turn sends the whole conversation through the chat template, as a chat client does, and the
decoder keeps the previous prompt (:class:`~kangaroo.decoding.PromptCache`): a turn prefills only
what follows it, the last answer and the new message, and answers exactly as a fresh start would.
Lines starting with ``/`` are commands: ``/reset`` starts over, ``/exit`` (or end of input) ends.
"""

from __future__ import annotations

import argparse
import sys

from .errors import KangarooError

COMMANDS = "/reset starts over, /exit or end of input ends"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .cli import add_model_arguments
    from .config import SamplingConfig

    add_model_arguments(p)
    d = SamplingConfig()
    p.add_argument("--system", default=None, help="a system message before the conversation")
    p.add_argument("--max-new-tokens", type=int, default=512, help="most new tokens per answer (default 512)")
    p.add_argument("--stats", action="store_true",
                   help="after each answer, one line on stderr: tokens, tokens per target forward, speed, prompt tokens reused")
    p.add_argument("--temperature", type=float, default=d.temperature, help=f"0 = greedy (default {d.temperature}); > 0 = lossless speculative sampling, seeded by --seed")
    p.add_argument("--top-p", type=float, default=d.top_p, help=f"nucleus sampling (default {d.top_p} = off)")
    p.add_argument("--top-k", type=int, default=d.top_k, help=f"sample among the k most likely tokens (default {d.top_k} = off)")


def run(args) -> int:
    """``kangaroo chat``: read messages line by line from stdin until ``/exit`` or end of input."""
    from .cli import load_from_args
    from .config import SamplingConfig

    if args.max_new_tokens <= 0:
        raise KangarooError(f"--max-new-tokens must be > 0, got {args.max_new_tokens}")
    sampling = SamplingConfig(args.temperature, args.top_p, args.top_k, args.seed)
    km = load_from_args(args)
    if not km.has_chat_template:
        raise KangarooError(f"{km.model_name} has no chat template: use kangaroo generate for plain text")
    start = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(start)
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"chat with {km.model_name} ({COMMANDS})", file=sys.stderr)

    def printed(text: str, step) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    while True:
        if interactive:
            sys.stderr.write("> ")
            sys.stderr.flush()
        line = sys.stdin.readline()
        if not line or line.strip() in ("/exit", "/quit"):
            return 0
        text = line.strip()
        if text == "/reset":
            messages = list(start)
            continue
        if not text:
            continue
        if text.startswith("/"):
            print(f"unknown command {text.split()[0]}: {COMMANDS}", file=sys.stderr)
            continue
        messages.append({"role": "user", "content": text})
        try:
            out = km.generate(messages, args.max_new_tokens, sampling=sampling, streamer=printed)
        except KangarooError as exc:  # e.g. the conversation outgrew the context: say so, keep chatting
            messages.pop()
            print(f"kangaroo: {exc} (/reset starts over)", file=sys.stderr)
            continue
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": out.text})
        if args.stats:
            r = out.result
            print(f"[kangaroo] {r.new_tokens} tokens in {r.rounds} target forwards ({r.compression_rate:.2f} each), "
                  f"{r.tokens_per_s:.1f} tok/s; prompt {r.prompt_tokens} tokens, {r.cached_tokens} kept from the turn before",
                  file=sys.stderr)
