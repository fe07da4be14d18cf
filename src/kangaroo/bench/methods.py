"""The decoding methods ``kangaroo bench`` compares, one small plug-in each.

A method turns prompt ids into new token ids plus per-round statistics. All methods share one
loaded model (so one dtype, one device, one thread setting) and answer the same prompts with the
same ``max_new_tokens`` and EOS ids; the runner times each call. To add a method, subclass
:class:`Method` and decorate it with :func:`register`.

Round statistics follow Spec-Bench's ``accept_lengths``: one entry per target forward, the number
of tokens it committed (accepted drafts + the target's own "bonus" token; the prefill commits 1).
``draft_lengths`` (our addition) holds the drafts sent for verification in the same round (0 for
the prefill), or is None for methods that draft nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import MAX_DRAFT

from ..errors import KangarooError


@dataclass
class Run:
    """One answer turn: new token ids and round statistics."""

    token_ids: list[int]
    accept_lengths: list[int]  # tokens committed per target forward (prefill first)
    draft_lengths: list[int] | None = None  # drafts verified per target forward (0 for the prefill)
    draft_sources: list[str] | None = None  # where each round's drafts came from ("adapter", "lookup"; "" = none)
    cached_tokens: int = 0  # prompt tokens kept from the previous turn, not prefilled again
    first_token_s: float | None = None  # from the call to the first new token: the prefill (our decoders)


@dataclass
class Options:
    """What a method may be built with, beyond the loaded model (CLI options)."""

    pld_tokens: int = 10  # prompt lookup: tokens proposed per lookup (transformers' num_output_tokens)
    pld_ngram: int = 2  # prompt lookup: longest n-gram matched (transformers' default max_matching_ngram_size)


class Method:
    """A named decoding method over a :class:`~kangaroo.api.KangarooModel`."""

    name: str = ""
    description: str = ""
    reports_drafts: bool = False  # fills Run.draft_lengths (acceptance rate, CTAR, draft length)

    def __init__(self, km, options: Options) -> None:
        self.km, self.options = km, options

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int) -> Run:
        raise NotImplementedError

    def new_conversation(self) -> None:
        """Forget any prompt kept from earlier calls (a question's turns may reuse each other's)."""

    def settings(self) -> dict:
        """What this method ran with (written to summary.json)."""
        return {}

    @property
    def max_draft(self) -> int:
        """Most drafts one round can verify (the CTAR curve's last w); 0 for autoregressive methods."""
        config = getattr(self, "config", None)
        if config is None or not self.reports_drafts:
            return 0
        lookup = getattr(config, "lookup_tokens", 0)
        adapter_rows = config.max_steps + getattr(config, "tree_width", 1) - 1  # a tree's siblings are rows too
        if getattr(config, "lookup_branch", False) and config.max_steps:
            return min(MAX_DRAFT, lookup + adapter_rows)
        return min(MAX_DRAFT, max(adapter_rows, lookup))


METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    METHODS[cls.name] = cls
    return cls


def build(names: list[str], km, options: Options) -> list[Method]:
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise KangarooError(f"unknown method(s) {', '.join(unknown)}: choose from {', '.join(METHODS)}")
    if len(set(names)) != len(names):
        raise KangarooError(f"a method is listed twice in {','.join(names)}")
    return [METHODS[n](km, options) for n in names]


# ---------------------------------------------------------------------------- our decoding loops
class _OurDecoder(Method):
    """A :class:`~kangaroo.decoding.KangarooDecoder` or :class:`~kangaroo.decoding.AutoregressiveDecoder`."""

    def _decoder(self):
        raise NotImplementedError

    def __init__(self, km, options: Options) -> None:
        super().__init__(km, options)
        self.decoder = self._decoder()

    def new_conversation(self) -> None:
        self.decoder.kept.clear()

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int) -> Run:
        result = self.decoder.generate(input_ids, max_new_tokens, self.km.eos_token_ids)
        return Run(
            token_ids=result.token_ids,
            accept_lengths=[len(s.tokens) for s in result.steps],
            draft_lengths=[s.drafted for s in result.steps] if self.reports_drafts else None,
            draft_sources=[s.source if s.drafted else "" for s in result.steps] if self.reports_drafts else None,
            cached_tokens=result.cached_tokens,
            first_token_s=result.prefill_s,
        )


@register
class Autoregressive(_OurDecoder):
    name = "ar"
    description = "our autoregressive greedy loop on the step engine Kangaroo runs on (its fastest configuration here)"

    def _decoder(self):
        return self.km.baseline

    def settings(self) -> dict:
        return {"engine": self.km.engine_info, "cache": "kangaroo.kv_cache.KVCache (preallocated, grown by doubling)"}


@register
class AutoregressiveEager(_OurDecoder):
    name = "ar-eager"
    description = "our autoregressive greedy loop over HF's own decoder-layer modules (the eager engine), model dtype"

    def _decoder(self):
        from ..decoding import AutoregressiveDecoder

        return AutoregressiveDecoder(self.km.backbone)

    def settings(self) -> dict:
        return {"engine": self.km.backbone.describe(), "cache": "kangaroo.kv_cache.KVCache"}


@register
class Kangaroo(_OurDecoder):
    name = "kangaroo"
    description = "Kangaroo as shipped and tuned: prompt-lookup drafts where the text repeats, else the adapter's drafts (double early exit; chain or tree as `kangaroo tune` chose)"
    reports_drafts = True

    def _decoder(self):
        self.config = self.km.config
        return self.km.decoder

    def settings(self) -> dict:
        return {**self.km.config.to_dict(), "adapter": self.km.adapter_source}


class _KangarooWith(_OurDecoder):
    """Kangaroo with some of the default config's fields replaced (:attr:`overrides`)."""

    reports_drafts = True
    overrides: dict = {}

    def _decoder(self):
        from dataclasses import replace

        from ..decoding import KangarooDecoder

        self.config = replace(self.km.config, **self.overrides)
        return KangarooDecoder(self.km.engine, self.km.adapter, self.config)

    def settings(self) -> dict:
        return {**self.config.to_dict(), "adapter": self.km.adapter_source}


@register
class KangarooChain(_KangarooWith):
    name = "kangaroo-chain"
    description = "the paper's Kangaroo: the adapter's chain only (no lookup drafts, no tree)"
    overrides = {"lookup_tokens": 0, "tree_width": 1}


@register
class KangarooTree(_KangarooWith):
    name = "kangaroo-tree"
    description = "the adapter's token tree: its chain plus up to 2 siblings at the first draft position (no lookup drafts)"
    overrides = {"lookup_tokens": 0, "tree_width": 3}


@register
class KangarooPlusLookup(_KangarooWith):
    name = "kangaroo+pld"
    description = "prompt lookup and the adapter's chain as two branches of one token tree, every round"
    overrides = {"lookup_branch": True}


@register
class KangarooFullVocab(_KangarooWith):
    name = "kangaroo-full-vocab"
    description = "Kangaroo as shipped, but the adapter drafts over the whole vocabulary (no reduced draft head)"

    def _decoder(self):
        import copy

        from ..decoding import KangarooDecoder

        self.config = self.km.config
        full = copy.deepcopy(self.km.adapter)  # the same weights (and layout), without the draft vocabulary
        full.draft_vocab = None
        return KangarooDecoder(self.km.engine, full, self.config)


@register
class KangarooFixed(_KangarooWith):
    name = "kangaroo-fixed"
    description = "the adapter's chain without the second early exit (η = 0): always γ drafts"
    overrides = {"threshold": 0.0, "lookup_tokens": 0}


@register
class Lookup(_KangarooWith):
    name = "lookup"
    description = "prompt-lookup drafts alone on our engine (no adapter drafts: γ = 0)"
    overrides = {"max_steps": 0}

    @property
    def max_draft(self) -> int:
        return self.config.lookup_tokens


@register
class EarlyExit(_OurDecoder):
    name = "early-exit"
    description = "self-speculation with no adapter: LM head on the exit layer's state (LayerSkip-style)"
    reports_drafts = True

    def _decoder(self):
        from dataclasses import replace

        from ..adapter import EarlyExitHead
        from ..decoding import KangarooDecoder

        self.config = replace(self.km.config, lookup_tokens=0)
        return KangarooDecoder(self.km.engine, EarlyExitHead(self.config.exit_layer), self.config)

    def settings(self) -> dict:
        return self.config.to_dict()


# ---------------------------------------------------------------------------- transformers generate
class _HFGenerate(Method):
    """``model.generate`` (greedy) with extra keyword arguments."""

    def _kwargs(self) -> dict:
        return {}

    def _generate(self, input_ids: torch.Tensor, max_new_tokens: int, **extra) -> list[int]:
        eos = sorted(self.km.eos_token_ids)
        gen = self.km.model.generation_config
        pad = gen.pad_token_id if gen.pad_token_id is not None else (eos[0] if eos else 0)
        with torch.no_grad():
            out = self.km.model.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=eos or None,
                pad_token_id=pad,
                **self._kwargs(),
                **extra,
            )
        return out[0, input_ids.shape[1] :].tolist()


@register
class HFGreedy(_HFGenerate):
    name = "ar-hf"
    description = "transformers model.generate(do_sample=False): the reference autoregressive baseline"

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int) -> Run:
        ids = self._generate(input_ids, max_new_tokens)
        return Run(ids, [1] * len(ids))  # one target forward per token (no streamer: nothing slows it)

    def settings(self) -> dict:
        return {"cache": "transformers DynamicCache (generate's default)"}


@register
class HFGreedyStatic(HFGreedy):
    name = "ar-hf-static"
    description = "transformers model.generate(do_sample=False, cache_implementation='static'): preallocated cache, like ours"

    def _kwargs(self) -> dict:
        return {"cache_implementation": "static"}

    def settings(self) -> dict:
        return {"cache": "transformers StaticCache (cache_implementation='static'), eager (no torch.compile)"}


class _RoundLengths:
    """A transformers streamer that records how many tokens each ``put`` delivers.

    ``generate`` first puts the prompt, then, in assisted decoding, the tokens of each round.
    """

    def __init__(self) -> None:
        self.lengths: list[int] = []
        self.prompt_seen = False

    def put(self, value) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.lengths.append(int(value.numel()))

    def end(self) -> None:
        pass


@register
class PromptLookup(_HFGenerate):
    name = "pld"
    description = "prompt lookup decoding through transformers (prompt_lookup_num_tokens)"
    reports_drafts = True

    def _kwargs(self) -> dict:
        return {"prompt_lookup_num_tokens": self.options.pld_tokens, "max_matching_ngram_size": self.options.pld_ngram}

    @property
    def max_draft(self) -> int:
        return self.options.pld_tokens

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int) -> Run:
        rounds = _RoundLengths()
        from ..model import record_candidates

        with record_candidates(self.km.model) as drafted:
            ids = self._generate(input_ids, max_new_tokens, streamer=rounds)
        if sum(rounds.lengths) != len(ids) or len(drafted) != len(rounds.lengths):
            raise KangarooError("pld: could not follow transformers' assisted-generation rounds (this transformers "
                                "version calls the streamer or the candidate generator differently)")
        # assisted generation has no separate prefill: its first forward (prompt + candidates) is round 1
        return Run(ids, rounds.lengths, drafted)

    def settings(self) -> dict:
        return {"prompt_lookup_num_tokens": self.options.pld_tokens, "max_matching_ngram_size": self.options.pld_ngram,
                "cache": "transformers DynamicCache (generate's default)"}


class KangarooVariant(_OurDecoder):
    """Kangaroo with an explicit adapter and config (``--sweep`` grid points); not in the registry."""

    reports_drafts = True

    def __init__(self, km, options: Options, adapter, config, name: str, adapter_label: str) -> None:
        self.adapter, self.config, self.name, self.adapter_label = adapter, config, name, adapter_label
        self.description = f"Kangaroo with {adapter_label}, ℓ={config.exit_layer} γ={config.max_steps} η={config.threshold}"
        super().__init__(km, options)

    def _decoder(self):
        from ..decoding import KangarooDecoder

        return KangarooDecoder(self.km.engine, self.adapter, self.config)

    def settings(self) -> dict:
        return {**self.config.to_dict(), "adapter": self.adapter_label}
