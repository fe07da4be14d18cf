"""The OpenAI protocol of ``kangaroo serve``: request validation, stop strings and response shapes.

Nothing here touches the model, torch or FastAPI: a request body goes in through
:func:`parse_request` (a :class:`Request`, or an :class:`APIError` naming the offending parameter),
and the worker's results come out as OpenAI's JSON bodies (:func:`completion`) or server-sent
events (:class:`EventStream`). The app and its worker are in :mod:`kangaroo.server`.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

DEFAULT_MAX_TOKENS = 512  # when a request gives no max_tokens (capped by the context left)
MAX_STOP_SEQUENCES = 4  # as OpenAI


# ---------------------------------------------------------------------------------------------- errors

class APIError(Exception):
    """An error returned to the client in OpenAI's shape."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ---------------------------------------------------------------------------------------------- requests

@dataclass
class Request:
    """A validated completion request."""

    kind: str  # "chat" or "completion"
    prompt: Any  # chat messages (list of dicts), text, or token ids
    max_tokens: int | None
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    stop: list[str]
    stream: bool
    include_usage: bool


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)) and value == value  # not NaN


def _get(body: dict, name: str, check, expected: str, default=None):
    value = body.get(name)
    if value is None:
        return default
    if not check(value):
        raise APIError(400, f"Invalid value for '{name}': expected {expected}, got {json.dumps(value)[:80]}", name, "invalid_type")
    return value


def parse_request(body: Any, kind: str, model_name: str) -> Request:
    """Validate an OpenAI request body; raise :class:`APIError` (4xx) with the offending parameter."""
    if not isinstance(body, dict):
        raise APIError(400, "The request body must be a JSON object.", None, "invalid_body")
    model = body.get("model")
    if model is None:
        raise APIError(400, "Missing required parameter: 'model'.", "model", "missing_required_parameter")
    if not isinstance(model, str):
        raise APIError(400, "Invalid value for 'model': expected a string.", "model", "invalid_type")
    if model != model_name:
        raise APIError(404, f"The model '{model}' does not exist; this server serves '{model_name}'.", "model", "model_not_found")
    if kind == "chat":
        prompt = _messages(body)
        max_tokens = _get(body, "max_completion_tokens", _is_int, "an integer")
        max_tokens = _get(body, "max_tokens", _is_int, "an integer", max_tokens)
    else:
        prompt = _prompt(body)
        max_tokens = _get(body, "max_tokens", _is_int, "an integer")
    if max_tokens is not None and max_tokens <= 0:
        raise APIError(400, f"Invalid 'max_tokens': {max_tokens}; it must be at least 1.", "max_tokens", "invalid_value")
    temperature = _get(body, "temperature", _is_number, "a number", 1.0)
    if not 0 <= temperature <= 2:
        raise APIError(400, f"Invalid 'temperature': {temperature}; it must be between 0 and 2.", "temperature", "invalid_value")
    top_p = _get(body, "top_p", _is_number, "a number", 1.0)
    if not 0 < top_p <= 1:
        raise APIError(400, f"Invalid 'top_p': {top_p}; it must be in (0, 1].", "top_p", "invalid_value")
    top_k = _get(body, "top_k", _is_int, "an integer", 0)
    if top_k < 0:
        raise APIError(400, f"Invalid 'top_k': {top_k}; it must be >= 0 (0 = off).", "top_k", "invalid_value")
    seed = _get(body, "seed", _is_int, "an integer")
    if seed is not None and not -(2**63) <= seed < 2**64:
        raise APIError(400, "Invalid 'seed': it must fit in 64 bits.", "seed", "invalid_value")
    stop = _get(body, "stop", lambda v: isinstance(v, str) or (isinstance(v, list) and all(isinstance(s, str) for s in v)),
                "a string or a list of strings", [])
    stop = [stop] if isinstance(stop, str) else stop
    if len(stop) > MAX_STOP_SEQUENCES:
        raise APIError(400, f"Invalid 'stop': at most {MAX_STOP_SEQUENCES} sequences.", "stop", "invalid_value")
    stream = _get(body, "stream", lambda v: isinstance(v, bool), "a boolean", False)
    options = _get(body, "stream_options", lambda v: isinstance(v, dict), "an object", {})
    include_usage = options.get("include_usage", False) is True
    n = _get(body, "n", _is_int, "an integer", 1)
    if n != 1:
        raise APIError(400, "Only n=1 is supported.", "n", "unsupported_value")
    if body.get("logprobs") not in (None, False, 0):
        raise APIError(400, "logprobs are not supported by this server.", "logprobs", "unsupported_parameter")
    return Request(kind, prompt, max_tokens, float(temperature), float(top_p), top_k, seed,
                   [s for s in stop if s], stream, include_usage)


ROLES = {"system", "developer", "user", "assistant", "tool"}


def _messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if messages is None:
        raise APIError(400, "Missing required parameter: 'messages'.", "messages", "missing_required_parameter")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "Invalid 'messages': expected a non-empty array of messages.", "messages", "invalid_type")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise APIError(400, f"Invalid '{where}': expected an object.", where, "invalid_type")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise APIError(400, f"Invalid '{where}.role': expected one of {', '.join(sorted(ROLES))}.", f"{where}.role", "invalid_value")
        if isinstance(content, list):  # content parts: only text
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
                raise APIError(400, f"Invalid '{where}.content': only text parts are supported.", f"{where}.content", "invalid_type")
            content = "".join(p["text"] for p in content)
        elif content is None and role == "assistant":
            content = ""
        elif not isinstance(content, str):
            raise APIError(400, f"Invalid '{where}.content': expected a string.", f"{where}.content", "invalid_type")
        out.append({"role": "system" if role == "developer" else role, "content": content})
    return out


def _prompt(body: dict):
    prompt = body.get("prompt")
    if prompt is None:
        raise APIError(400, "Missing required parameter: 'prompt'.", "prompt", "missing_required_parameter")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        if not prompt:
            raise APIError(400, "Invalid 'prompt': it is empty.", "prompt", "invalid_value")
        return prompt
    if isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        return [int(t) for t in prompt]
    raise APIError(400, "Invalid 'prompt': expected a string, or a list of token ids (batches of several prompts are not supported).",
                   "prompt", "invalid_type")


# ---------------------------------------------------------------------------------------------- stop strings

class StopStrings:
    """Cut streamed text at the first stop string, holding back any tail that may start one."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Add text; return (text safe to emit, whether a stop string was reached)."""
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[: min(hits)], ""
            return out, True
        hold = max((k for s in self.stops for k in range(1, len(s)) if self.pending.endswith(s[:k])), default=0)
        cut = len(self.pending) - hold
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


# ---------------------------------------------------------------------------------------------- responses

def response_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]


def usage(prompt_tokens: int, result) -> dict:
    """OpenAI's ``usage`` of a :class:`~kangaroo.decoding.GenerationResult`, with OpenAI's count of
    the prompt tokens not computed again (kept from the previous request: :class:`~kangaroo.decoding.PromptCache`)."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": result.new_tokens,
            "total_tokens": prompt_tokens + result.new_tokens,
            "prompt_tokens_details": {"cached_tokens": result.cached_tokens}}


def kangaroo_stats(result) -> dict:
    """The ``kangaroo`` object every response carries: the decoding statistics."""
    s = result.stats()
    keys = ("compression_rate", "acceptance_rate", "drafted", "accepted", "target_forwards", "tokens_per_s", "total_s")
    return {k: s[k] for k in keys}


def completion(kind: str, rid: str, model_name: str, text: str, finish_reason: str, prompt_tokens: int, result) -> dict:
    """The body of a non-streamed chat completion or text completion."""
    choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
               "finish_reason": finish_reason} if kind == "chat" else
              {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason})
    return {"id": rid, "object": "chat.completion" if kind == "chat" else "text_completion", "created": int(time.time()),
            "model": model_name, "choices": [choice], "usage": usage(prompt_tokens, result),
            "kangaroo": kangaroo_stats(result)}


class EventStream:
    """The server-sent events of one streamed completion, as OpenAI sends them."""

    DONE = "data: [DONE]\n\n"

    def __init__(self, kind: str, rid: str, model_name: str, include_usage: bool) -> None:
        self.chat, self.include_usage = kind == "chat", include_usage
        self.base = {"id": rid, "object": "chat.completion.chunk" if self.chat else "text_completion",
                     "created": int(time.time()), "model": model_name}

    def start(self) -> list[str]:
        """Chat streams open with the assistant's role and empty content."""
        return [self._chunk(None, first=True)] if self.chat else []

    def delta(self, text: str) -> str:
        return self._chunk(text)

    def error(self, exc: APIError) -> str:
        """An error after the headers went out: reported in-band, as OpenAI does."""
        return _event(exc.body())

    def end(self, finish_reason: str, prompt_tokens: int, result) -> list[str]:
        stats = kangaroo_stats(result)
        events = [self._chunk(None, finish_reason, kangaroo=stats)]
        if self.include_usage:
            events.append(_event({**self.base, "choices": [], "usage": usage(prompt_tokens, result), "kangaroo": stats}))
        return events

    def _chunk(self, text: str | None, finish: str | None = None, first: bool = False, **extra) -> str:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if first else ({} if text is None else {"content": text})
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        return _event({**self.base, "choices": [choice], **extra})


def _event(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"
