"""OpenAI-compatible HTTP server: ``kangaroo serve``.

    kangaroo serve --model smollm2-135m-instruct [--adapter DIR] [--host 127.0.0.1] [--port 8000] [--api-key KEY]

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="KEY")
    client.chat.completions.create(model="smollm2-135m-instruct", messages=[{"role": "user", "content": "Hi"}])

Endpoints: ``POST /v1/chat/completions`` and ``POST /v1/completions`` (streamed as server-sent
events or not; ``max_tokens``, ``temperature``, ``top_p``, ``seed``, ``stop``, plus ``top_k`` as an
extension), ``GET /v1/models``, ``GET /health``. Responses carry OpenAI's ``usage`` and a
``kangaroo`` object with the decoding statistics (compression rate, acceptance rate, drafts).

One model serves every client: a single worker thread owns it and runs the requests one at a time in
arrival order, so concurrent clients queue instead of racing on the model's caches. The tokenizer is
used on that thread only too. Errors use OpenAI's shape, ``{"error": {"message", "type", "param",
"code"}}``, with a 4xx status for anything the client can fix; the server keeps serving.

FastAPI and uvicorn are optional dependencies (``pip install 'kangaroo-decoding[server]'``): they
are imported only when a server is built.
"""

# No ``from __future__ import annotations`` here: FastAPI reads the handlers' annotations at run time,
# and the handlers annotate with classes imported inside create_app (FastAPI is an optional extra).
import argparse
import asyncio
import contextlib
import hmac
import json
import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from .errors import KangarooError

logger = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
DEFAULT_MAX_TOKENS = 512  # when a request gives no max_tokens (capped by the context left)
MAX_STOP_SEQUENCES = 4  # as OpenAI


def _require_server_deps() -> None:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise KangarooError(
            "the server needs FastAPI and uvicorn: pip install 'kangaroo-decoding[server]' (or pip install fastapi uvicorn)"
        ) from None


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


# ---------------------------------------------------------------------------------------------- worker

@dataclass
class Job:
    """One request on its way through the worker; events go back to the request's event loop."""

    request: Request
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def emit(self, kind: str, payload: Any = None) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))
        except RuntimeError:  # the request's loop is gone (server shutting down)
            self.cancelled.set()


class Worker:
    """The one thread that touches the model and its tokenizer; runs jobs one at a time, in order."""

    def __init__(self, kangaroo_model, default_max_tokens: int = DEFAULT_MAX_TOKENS, max_queue: int = 256) -> None:
        self.km, self.default_max_tokens = kangaroo_model, default_max_tokens
        self.jobs: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self.served = 0  # requests that ran to the end
        self.abandoned = 0  # requests whose client left before the end (generation stopped early)
        self.thread = threading.Thread(target=self._loop, name="kangaroo-worker", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> None:
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise APIError(429, "The server is busy: too many queued requests. Retry later.", None, "queue_full",
                           type="rate_limit_error") from None

    def close(self) -> None:
        self.jobs.put(None)
        self.thread.join(timeout=10)

    def _loop(self) -> None:
        while (job := self.jobs.get()) is not None:
            if job.cancelled.is_set():
                continue
            try:
                self._run(job)
            except APIError as exc:
                job.emit("error", exc)
            except KangarooError as exc:
                job.emit("error", APIError(400, str(exc)))
            except Exception as exc:  # never let one request kill the worker
                logger.exception("request failed")
                job.emit("error", APIError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error"))

    def _run(self, job: Job) -> None:
        from .api import sampling_config
        from .decoding import collect
        from .streaming import TextDeltas

        km, r = self.km, job.request
        param = "messages" if r.kind == "chat" else "prompt"
        try:
            ids = km.encode(r.prompt, chat=r.kind == "chat")
        except KangarooError as exc:
            raise APIError(400, str(exc), param) from None
        except Exception as exc:  # e.g. a chat template that rejects these roles or this order
            raise APIError(400, f"Could not build the prompt: {type(exc).__name__}: {exc}", param) from None
        n, limit = ids.shape[1], km.backbone.max_positions
        if limit is not None and n >= limit:
            raise APIError(400, f"The prompt has {n} tokens; this model's context is {limit} tokens.", param, "context_length_exceeded")
        if r.max_tokens is not None and limit is not None and n + r.max_tokens > limit:
            raise APIError(400, f"This model's context is {limit} tokens: {n} in the prompt + max_tokens {r.max_tokens} "
                                f"is too many. Lower max_tokens to at most {limit - n}.", "max_tokens", "context_length_exceeded")
        max_tokens = r.max_tokens or min(self.default_max_tokens, limit - n if limit else self.default_max_tokens)
        sampling = sampling_config(temperature=r.temperature, top_p=r.top_p, top_k=r.top_k, seed=r.seed)
        job.emit("start", n)
        deltas, stops = TextDeltas(km.tokenizer), StopStrings(r.stop)
        state = {"finish": "length"}

        def emitted(steps):
            with contextlib.closing(steps):
                for step in steps:
                    yield step
                    if job.cancelled.is_set():
                        return
                    text, hit = stops.feed(deltas.push(step.tokens))
                    if text:
                        job.emit("delta", text)
                    if hit:
                        state["finish"] = "stop"
                        return
                    if step.tokens and step.tokens[-1] in km.eos_token_ids:
                        state["finish"] = "stop"
            text, hit = stops.feed(deltas.flush())
            text += "" if hit else stops.flush()
            if text:
                job.emit("delta", text)

        result = collect(emitted(km.decoder.stream(ids, max_tokens, km.eos_token_ids, sampling)), n, km.backbone)
        if job.cancelled.is_set():
            self.abandoned += 1
            return
        self.served += 1
        job.emit("done", {"finish_reason": state["finish"], "result": result})


# ---------------------------------------------------------------------------------------------- responses

def _usage(prompt_tokens: int, result) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": result.new_tokens,
            "total_tokens": prompt_tokens + result.new_tokens}


def _kangaroo_stats(result) -> dict:
    s = result.stats()
    keys = ("compression_rate", "acceptance_rate", "drafted", "accepted", "target_forwards", "tokens_per_s", "total_s")
    return {k: s[k] for k in keys}


def create_app(kangaroo_model, model_name: str | None = None, api_key: str | None = None,
               default_max_tokens: int = DEFAULT_MAX_TOKENS):
    """The FastAPI app serving ``kangaroo_model`` under ``model_name`` (default: the model's name).

    Args:
        kangaroo_model: a :class:`~kangaroo.api.KangarooModel`; only the app's worker thread uses it.
        api_key: when set, every ``/v1`` request needs ``Authorization: Bearer <api_key>``.
        default_max_tokens: new-token limit for requests that give no ``max_tokens``.
    """
    _require_server_deps()
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request as HTTPRequest
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    model_name = model_name or kangaroo_model.model_name
    worker = Worker(kangaroo_model, default_max_tokens)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app):
        yield
        worker.close()

    app = FastAPI(title="kangaroo", description="OpenAI-compatible server for Kangaroo self-speculative decoding",
                  lifespan=lifespan)
    app.state.worker = worker

    def error(exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return error(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return error(APIError(exc.status_code, str(exc.detail), None, code))

    @app.exception_handler(Exception)
    async def _unexpected(request, exc):
        logger.exception("unhandled error")
        return error(APIError(500, f"internal error: {type(exc).__name__}", type="server_error"))

    @app.middleware("http")
    async def _auth(request, call_next):
        if api_key and request.url.path.startswith("/v1"):
            header = request.headers.get("authorization", "")
            given = header[7:] if header.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(given.encode(), api_key.encode()):
                return error(APIError(401, "Incorrect API key provided.", None, "invalid_api_key"))
        return await call_next(request)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "queued": worker.jobs.qsize(), "served": worker.served,
                "abandoned": worker.abandoned}

    def model_card() -> dict:
        return {"id": model_name, "object": "model", "created": created, "owned_by": "kangaroo"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        if name != model_name:
            raise APIError(404, f"The model '{name}' does not exist.", "model", "model_not_found")
        return model_card()

    async def body_of(request: HTTPRequest):
        raw = await request.body()
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise APIError(400, "We could not parse the JSON body of your request.", None, "invalid_json") from None

    async def complete(request: HTTPRequest, kind: str):
        r = parse_request(await body_of(request), kind, model_name)
        job = Job(r, asyncio.get_running_loop())
        worker.submit(job)
        try:
            event, payload = await job.events.get()  # "start" once the prompt is checked, or "error"
        except asyncio.CancelledError:
            job.cancelled.set()
            raise
        if event == "error":
            raise payload
        prompt_tokens = payload
        rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        if r.stream:
            return StreamingResponse(_sse(job, r, rid, prompt_tokens), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        parts = []
        try:
            while True:
                event, payload = await job.events.get()
                if event == "delta":
                    parts.append(payload)
                elif event == "error":
                    raise payload
                else:
                    break
        except asyncio.CancelledError:
            job.cancelled.set()
            raise
        text, result = "".join(parts), payload["result"]
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                   "finish_reason": payload["finish_reason"]} if kind == "chat" else
                  {"index": 0, "text": text, "logprobs": None, "finish_reason": payload["finish_reason"]})
        return {"id": rid, "object": "chat.completion" if kind == "chat" else "text_completion", "created": int(time.time()),
                "model": model_name, "choices": [choice], "usage": _usage(prompt_tokens, result),
                "kangaroo": _kangaroo_stats(result)}

    async def _sse(job: Job, r: Request, rid: str, prompt_tokens: int):
        chat = r.kind == "chat"
        base = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": int(time.time()),
                "model": model_name}

        def chunk(text: str | None, finish: str | None = None, first: bool = False, **extra) -> str:
            if chat:
                delta = {"role": "assistant", "content": ""} if first else ({} if text is None else {"content": text})
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            return f"data: {json.dumps({**base, 'choices': [choice], **extra}, ensure_ascii=False)}\n\n"

        try:
            if chat:
                yield chunk(None, first=True)
            while True:
                event, payload = await job.events.get()
                if event == "delta":
                    yield chunk(payload)
                elif event == "error":  # headers are sent: report in-band, as OpenAI does
                    yield f"data: {json.dumps(payload.body())}\n\n"
                    break
                else:
                    result = payload["result"]
                    yield chunk(None, payload["finish_reason"], kangaroo=_kangaroo_stats(result))
                    if r.include_usage:
                        yield f"data: {json.dumps({**base, 'choices': [], 'usage': _usage(prompt_tokens, result), 'kangaroo': _kangaroo_stats(result)})}\n\n"
                    break
            yield "data: [DONE]\n\n"
        finally:
            job.cancelled.set()  # a client that went away stops its generation at the next round

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HTTPRequest):
        return await complete(request, "chat")

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest):
        return await complete(request, "completion")

    return app


# ---------------------------------------------------------------------------------------------- running

class ServerThread:
    """Serve an app with uvicorn in a background thread (tests, notebooks); port 0 = a free port.

    >>> with ServerThread(create_app(km)) as server:
    ...     OpenAI(base_url=server.url + "/v1", api_key="x")
    """

    def __init__(self, app, host: str = DEFAULT_HOST, port: int = 0) -> None:
        import uvicorn

        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, name="kangaroo-uvicorn", daemon=True)
        self.host = host

    def __enter__(self) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise KangarooError("the server did not start")
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://{self.host}:{self.port}"
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .cli import add_model_arguments

    add_model_arguments(p)
    p.add_argument("--host", default=DEFAULT_HOST, help=f"address to bind (default {DEFAULT_HOST}: this machine only)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 requests")
    p.add_argument("--served-model-name", default=None, help="model name clients ask for (default: the model's name)")
    p.add_argument("--default-max-tokens", type=int, default=DEFAULT_MAX_TOKENS,
                   help=f"new-token limit for requests without max_tokens (default {DEFAULT_MAX_TOKENS})")


def run(args) -> int:
    """``kangaroo serve``."""
    _require_server_deps()
    import uvicorn

    from .cli import load_from_args

    if args.default_max_tokens <= 0:
        raise KangarooError(f"--default-max-tokens must be > 0, got {args.default_max_tokens}")
    km = load_from_args(args)
    app = create_app(km, args.served_model_name, args.api_key, args.default_max_tokens)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        logger.warning("serving on %s without --api-key: anyone who can reach this port can use the model", args.host)
    name = args.served_model_name or km.model_name
    print(f"kangaroo: serving {name} (adapter: {km.adapter_source}) on http://{args.host}:{args.port}/v1", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info" if args.verbose else "warning")
    return 0
