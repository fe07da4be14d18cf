"""``kangaroo`` command line: ``generate`` here; ``chat``, ``train``, ``bench``, ``serve``, ``tune`` from their modules.

Every user error is one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys

from .contention import busy
from .errors import KangarooError

logger = logging.getLogger("kangaroo")

# subcommand -> module exposing add_arguments(parser) and run(args) -> int
SUBCOMMANDS = {
    "generate": "kangaroo.cli",
    "chat": "kangaroo.chat",
    "train": "kangaroo.training.cli",
    "bench": "kangaroo.benchmark",
    "serve": "kangaroo.server",
    "tune": "kangaroo.tune",
}
HELP = {
    "generate": "generate text with Kangaroo decoding (streams to the terminal)",
    "chat": "a conversation in the terminal, answers streamed; each turn prefills only what is new",
    "train": "train an adapter for a model",
    "bench": "run Spec-Bench with Kangaroo and its peers",
    "serve": "OpenAI-compatible HTTP server",
    "tune": "choose γ, η and the lookup settings that are fastest on this machine (saved; used by default)",
}


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """Options shared by every subcommand that loads a model and an adapter; their defaults are
    :class:`~kangaroo.config.KangarooConfig`'s and :class:`~kangaroo.config.EngineConfig`'s."""
    from .config import DEFAULT_MODEL, EngineConfig, KangarooConfig

    k, e = KangarooConfig(), EngineConfig()
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"embedded name, local folder, .gguf file or hub id (default: {DEFAULT_MODEL})")
    p.add_argument("--adapter", default=None, help="adapter folder; default: the adapter shipped for the model, else a seeded random one; 'random' forces the random one")
    p.add_argument("--exit-layer", type=int, default=None, help="ℓ: decoder layers run before the adapter (default: the adapter's)")
    tuned = "default: what `kangaroo tune` chose on this machine, else"
    p.add_argument("--threshold", type=float, default=None, help=f"η: stop drafting when the draft's top-1 probability is below this ({tuned} {k.threshold})")
    p.add_argument("--max-steps", type=int, default=None, help=f"γ: most drafted tokens per round ({tuned} {k.max_steps})")
    p.add_argument("--lookup-tokens", type=int, default=None, help=f"prompt-lookup drafts: most tokens proposed from an earlier occurrence of the last n-gram, 0 = off ({tuned} {k.lookup_tokens})")
    p.add_argument("--lookup-ngram", type=int, default=None, help=f"prompt-lookup drafts: shortest n-gram matched, 1-3 ({tuned} {k.lookup_ngram})")
    p.add_argument("--tree-width", type=int, default=None, help=f"token trees: the adapter's candidates at the first draft position, 1 = a chain ({tuned} {k.tree_width})")
    p.add_argument("--tree-threshold", type=float, default=None, help=f"token trees: draft probability a sibling candidate needs ({tuned} {k.tree_threshold})")
    p.add_argument("--lookup-branch", action=argparse.BooleanOptionalAction, default=None,
                   help=f"token trees: the adapter still drafts beside a prompt-lookup proposal, as a second branch ({tuned} {'on' if k.lookup_branch else 'off'})")
    p.add_argument("--verify-low-confidence", action=argparse.BooleanOptionalAction, default=None,
                   help=f"also verify the drafted token that fell below η, as the authors' code does ({tuned} {'on' if k.verify_low_confidence else 'off'})")
    p.add_argument("--engine", default=e.engine, help=f"fused (lean steps on measured kernels), eager (HF's own modules, the reference) or auto (= fused) (default {e.engine})")
    p.add_argument("--dtype", default=e.dtype, help=f"weight dtype of the steps: float32, bfloat16, float16 (CUDA) or auto = the fastest plain decoding here, measured once and cached (default {e.dtype})")
    p.add_argument("--kernel", default=e.kernel, help=f"fused engine's product kernel: stock (F.linear), packed (oneDNN prepacked, CPU), dpbf16 (ours, CPUs with AVX512-BF16), q4_1 (the layers as a Q4_1 GGUF file stores them, e.g. the default model; CPUs with AVX512-BF16), q4_1_int8 (the same blocks on int8 activations, as llama.cpp computes them; CPUs with AVX512-VNNI, AMX tiles where faster) or auto = measured (default {e.kernel})")
    p.add_argument("--attention", default=e.attention, help=f"fused engine's attention for steps of up to 16 tokens: kernel (compiled here once, all rows in one call, same bits per row), sdpa (one call per row) or auto = measured (default {e.attention})")
    p.add_argument("--prefill", default=e.prefill, help=f"how the fused engine computes prompts (more than 16 tokens): auto = int8-activation products (q4_1 kernel, as llama.cpp computes them) and bfloat16 attention tiles (bfloat16 weights) where measured faster, or exact = the decoding steps' own arithmetic (default {e.prefill}); decoding and Kangaroo's output identity are the same either way")
    p.add_argument("--kv-dtype", default=e.kv_dtype, help=f"element type of the fused engine's KV cache on the kernel attention: float32, bfloat16 (half the bytes each step reads; queries and attention weights rounded to bfloat16) or auto = bfloat16 for bfloat16 engines on CPUs with AVX512-BF16, else float32 (default {e.kv_dtype}); Kangaroo's output equals plain decoding's either way")
    p.add_argument("--device", default=e.device, help=f"torch device: cpu or cuda[:N] (default {e.device})")
    p.add_argument("--threads", type=int, default=e.threads, help="torch CPU threads, >= 1 (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random adapter and of sampling (default 0)")


def load_from_args(args):
    """Build a :class:`~kangaroo.api.KangarooModel` from the shared options."""
    from .api import KangarooModel

    if not getattr(args, "verbose", False):  # keep stderr for our own messages
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    return KangarooModel.from_pretrained(
        args.model, adapter=args.adapter, exit_layer=args.exit_layer, max_steps=args.max_steps,
        threshold=args.threshold, dtype=args.dtype, device=args.device, seed=args.seed,
        verify_low_confidence=args.verify_low_confidence, engine=args.engine, kernel=args.kernel,
        attention=args.attention, prefill=args.prefill, kv_dtype=args.kv_dtype, threads=args.threads, lookup_tokens=args.lookup_tokens, lookup_ngram=args.lookup_ngram,
        tree_width=args.tree_width, tree_threshold=args.tree_threshold, lookup_branch=args.lookup_branch,
        tuned=not getattr(args, "no_tuned", False),
    )


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .config import SamplingConfig

    add_model_arguments(p)
    d = SamplingConfig()
    p.add_argument("--prompt", default=None, help="prompt text (default: read stdin)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="most new tokens (default 128)")
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None, help="apply the chat template (default: on when the model has one)")
    p.add_argument("--stats", action="store_true", help="print decoding statistics to stderr")
    p.add_argument("--compare", action="store_true", help="also run plain greedy decoding; report speeds and whether outputs are identical")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    p.add_argument("--temperature", type=float, default=d.temperature, help=f"0 = greedy (default {d.temperature}); > 0 = lossless speculative sampling, seeded by --seed")
    p.add_argument("--top-p", type=float, default=d.top_p, help=f"nucleus sampling: keep the most likely tokens up to this probability (default {d.top_p} = off)")
    p.add_argument("--top-k", type=int, default=d.top_k, help=f"sample among the k most likely tokens (default {d.top_k} = off)")


def run(args) -> int:
    """``kangaroo generate``."""
    from .config import SamplingConfig

    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    if not prompt.strip():
        raise KangarooError("empty prompt: pass --prompt TEXT or pipe text on stdin")
    if args.max_new_tokens <= 0:
        raise KangarooError(f"--max-new-tokens must be > 0, got {args.max_new_tokens}")
    sampling = SamplingConfig(args.temperature, args.top_p, args.top_k, args.seed)
    km = load_from_args(args)  # warns when it falls back to a random adapter
    ids = km.encode(prompt, args.chat)
    if args.compare:  # warm both loops up so that neither timing pays first-call costs
        km.generate(ids[:, -8:], 4)
        km.generate(ids[:, -8:], 4, kangaroo=False)

    def printed(text: str, step) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    out = km.generate(ids, args.max_new_tokens, sampling=sampling, streamer=None if args.json else printed)
    result = out.result
    if not args.json:
        sys.stdout.write("\n")
    record = {
        "text": out.text,
        "prompt_token_ids": out.prompt_token_ids,
        "token_ids": result.token_ids,
        **result.stats(),
        "model": km.model_name,
        "adapter": km.adapter_source,
        "exit_layer": km.config.exit_layer,
        "threshold": km.config.threshold,
        "max_steps": km.config.max_steps,
        "lookup_tokens": km.config.lookup_tokens,
        "lookup_ngram": km.config.lookup_ngram,
        "tree_width": km.config.tree_width,
        "tree_threshold": km.config.tree_threshold,
        "lookup_branch": km.config.lookup_branch,
        "verify_low_confidence": km.config.verify_low_confidence,
        "config_source": km.config_source,
        "lookup_accepted": sum(s.accepted for s in result.steps if s.source == "lookup"),
        "engine": km.engine_info,
        "sampling": sampling.to_dict(),
    }
    if args.compare:
        ar = km.generate(ids, args.max_new_tokens, kangaroo=False, sampling=sampling).result
        record.update(
            ar_token_ids=ar.token_ids,
            ar_tokens_per_s=ar.tokens_per_s,
            # sampled outputs agree in distribution, not token by token
            identical_to_greedy=ar.token_ids == result.token_ids if sampling.greedy else None,
            speedup=result.tokens_per_s / ar.tokens_per_s if ar.tokens_per_s else None,
        )
    if args.json:
        print(json.dumps(record, ensure_ascii=False))
    elif args.stats or args.compare:
        print(_stats_line(record), file=sys.stderr)
    return 0


def _stats_line(r: dict) -> str:
    e = r["engine"]
    how = {"measured": "measured now", "cache": "measured earlier, cached", "given": "as asked",
           "fallback": "the fused engine cannot run this model"}[e["source"]]
    share = e.get("calibration_others_share")
    if busy(share):  # see kangaroo.calibration: used, not cached
        how += f" while other processes used {100 * share:.0f}% of the CPUs, not cached"
    if e["kernel"] == "q4_1":  # the layers' weights are the file's own 4-bit blocks; activations bfloat16
        line = f"[engine]   {e['engine']}, the GGUF file's Q4_1 layers ({e['dtype']} activations), q4_1 kernel"
        if e.get("prompt_product") == "int8":  # prompts' products on int8 activations, as llama.cpp computes them
            line += " (prompts on int8 activations)"
    elif e["kernel"] == "q4_1_int8":  # the file's blocks on int8 activations, steps and prompts: llama.cpp's arithmetic
        line = f"[engine]   {e['engine']}, the GGUF file's Q4_1 layers (int8 activations), q4_1_int8 kernel"
        if e.get("amx_rows"):  # steps of several rows on AMX tiles (the same bits as AVX-512)
            line += f" (AMX tiles from {e['amx_rows']} rows)"
    else:
        line = f"[engine]   {e['engine']}, {e['dtype']} weights, {e['kernel']} kernel"
    if e.get("head_amx_rows"):  # the greedy head's int8 screen on AMX tiles for verifications (the same tokens)
        line += f" (head screen on AMX tiles from {e['head_amx_rows']} rows)"
    if e.get("prompt_amx_rows"):  # Q4_1 kernels' long prompts: de-quantised to bfloat16, on AMX tiles
        line += f" (prompts from {e['prompt_amx_rows']} tokens as a bfloat16 AMX GEMM)"
    if "attention" in e:
        line += f", {e['attention']} attention"
        if e.get("prompt_tiles") in ("bfloat16", "amx"):  # prompts' attention tiles computed in bfloat16
            line += " (prompt tiles in bfloat16" + (" on AMX)" if e["prompt_tiles"] == "amx" else ")")
        if e.get("attention_compile_s") is not None:  # the kernel is compiled once per machine, then loaded
            line += f" (kernel compiled {'now' if e.get('attention_compiled') else 'once'} in {e['attention_compile_s']:.0f} s)"
        if e.get("kv_dtype") == "bfloat16":  # half the bytes a step reads; bfloat16 dot products
            line += ", bfloat16 KV cache"
    line += f" ({how}"
    line += f"; built in {e['build_s']:.1f} s)\n" if "build_s" in e else ")\n"
    line += (
        f"[kangaroo] {r['new_tokens']} tokens in {r['target_forwards']} target forwards "
        f"(compression {r['compression_rate']:.2f}), accepted {r['accepted']}/{r['drafted']} drafts "
        f"({100 * r['acceptance_rate']:.0f}%; {r['lookup_accepted']} from prompt lookup), {r['tokens_per_s']:.1f} tok/s\n"
        f"[config]   ℓ={r['exit_layer']} γ={r['max_steps']} η={r['threshold']}"
        + (" (the draft below η verified too)" if r["verify_low_confidence"] else "")
        + f" lookup={r['lookup_tokens']} tokens "
        f"after {r['lookup_ngram']}-grams, "
        + ("chain" if r["tree_width"] == 1 else f"tree of {r['tree_width']} candidates at p >= {r['tree_threshold']}")
        + (", adapter beside lookup" if r["lookup_branch"] else "")
        + f" ({r['config_source']}); adapter={r['adapter']}"
    )
    if "ar_tokens_per_s" in r and r["identical_to_greedy"] is None:  # sampling: compare speeds only
        line += f"\n[sampling] autoregressive {r['ar_tokens_per_s']:.1f} tok/s; speed-up {r['speedup']:.2f}x"
    elif "ar_tokens_per_s" in r:
        line += (
            f"\n[greedy]   {r['ar_tokens_per_s']:.1f} tok/s; speed-up {r['speedup']:.2f}x; "
            f"outputs identical: {'yes' if r['identical_to_greedy'] else 'NO'}"
        )
    return line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kangaroo", description="Lossless self-speculative decoding (Kangaroo) for HF decoder LLMs")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress (INFO)")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, module_name in SUBCOMMANDS.items():
        try:
            module = sys.modules[__name__] if module_name == __name__ else importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.startswith("kangaroo"):
                continue  # subcommand not part of this build
            raise
        p = sub.add_parser(name, help=HELP[name], description=HELP[name])
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args._run(args)
    except KangarooError as exc:
        print(f"kangaroo: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kangaroo: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
