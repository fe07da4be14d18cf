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

The protocol (request validation, stop strings, response shapes) is in
:mod:`kangaroo.server_protocol`; this module holds the worker, the app and the ``serve`` command.
FastAPI and uvicorn are optional dependencies (``pip install 'kangaroo-decoding[server]'``): they
are imported only when a server is built.
"""

# No ``from __future__ import annotations`` here: FastAPI reads the handlers' annotations at run time,
# and the handlers annotate with classes imported inside _add_routes (FastAPI is an optional extra).
import argparse
import asyncio
import hmac
import json
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from .errors import KangarooError
from .server_protocol import (
    DEFAULT_MAX_TOKENS,
    APIError,
    EventStream,
    Request,
    StopStrings,
    completion,
    parse_request,
    response_id,
)

logger = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
DEFAULT_PROMPT_SLOTS = 4  # conversations whose last prompt is kept (the default model: ~23 KB a token each)


def _require_server_deps() -> None:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise KangarooError(
            "the server needs FastAPI and uvicorn: pip install 'kangaroo-decoding[server]' (or pip install fastapi uvicorn)"
        ) from None


# ---------------------------------------------------------------------------------------------- worker

@dataclass
class Job:
    """One request on its way through the worker; events go back to the request's event loop:
    ``("start", prompt_tokens)``, then ``("delta", text)``s, then ``("done", {...})`` or ``("error", APIError)``."""

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
        r = job.request
        ids = self._encode(r)
        max_tokens = self._budget(ids, r)
        job.emit("start", ids.shape[1])
        stops, eos, finish = StopStrings(r.stop), self.km.eos_token_ids, ["length"]

        def streamer(text: str, step) -> bool:
            if step is not None and job.cancelled.is_set():
                return True  # the client left: stop at this round
            text, hit = stops.feed(text)
            if step is None and not hit:  # the end: nothing can complete a held-back stop string now
                text += stops.flush()
            if text:
                job.emit("delta", text)
            if hit or (step is not None and step.tokens and step.tokens[-1] in eos):
                finish[0] = "stop"
            return hit

        out = self.km.generate(ids, max_tokens, streamer=streamer, temperature=r.temperature, top_p=r.top_p,
                               top_k=r.top_k, seed=r.seed)
        if job.cancelled.is_set():
            self.abandoned += 1
            return
        self.served += 1
        job.emit("done", {"finish_reason": finish[0], "result": out.result})

    def _encode(self, r: Request):
        """The request's prompt as ids ``[1, n]``; a prompt the model cannot take is a 400 on its parameter."""
        param = "messages" if r.kind == "chat" else "prompt"
        try:
            return self.km.encode(r.prompt, chat=r.kind == "chat")
        except KangarooError as exc:
            raise APIError(400, str(exc), param) from None
        except Exception as exc:  # e.g. a chat template that rejects these roles or this order
            raise APIError(400, f"Could not build the prompt: {type(exc).__name__}: {exc}", param) from None

    def _budget(self, ids, r: Request) -> int:
        """New tokens for this request: its max_tokens, which must fit the context, or the default
        cut to the context left (the context check is the decoder's own)."""
        from .decoding import check_request

        asked = r.max_tokens or self.default_max_tokens
        try:
            budget = check_request(self.km.engine, ids, asked)
        except KangarooError as exc:
            raise APIError(400, f"{exc}.", "messages" if r.kind == "chat" else "prompt", "context_length_exceeded") from None
        if r.max_tokens is not None and budget < r.max_tokens:
            n = ids.shape[1]
            raise APIError(400, f"This model's context is {n + budget} tokens: {n} in the prompt + max_tokens {r.max_tokens} "
                                f"is too many. Lower max_tokens to at most {budget}.", "max_tokens", "context_length_exceeded")
        return budget


# ---------------------------------------------------------------------------------------------- app

class Service:
    """What the app's routes do, around one :class:`Worker`."""

    def __init__(self, kangaroo_model, model_name: str, default_max_tokens: int) -> None:
        self.model_name = model_name
        self.worker = Worker(kangaroo_model, default_max_tokens)
        self.created = int(time.time())

    def health(self) -> dict:
        w = self.worker
        return {"status": "ok", "model": self.model_name, "queued": w.jobs.qsize(), "served": w.served,
                "abandoned": w.abandoned}

    def model_card(self, name: str | None = None) -> dict:
        if name is not None and name != self.model_name:
            raise APIError(404, f"The model '{name}' does not exist.", "model", "model_not_found")
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "kangaroo"}

    async def complete(self, raw: bytes, kind: str):
        """A completion request: queued on the worker, answered whole or as server-sent events."""
        from fastapi.responses import StreamingResponse

        r = parse_request(_json_body(raw), kind, self.model_name)
        job = Job(r, asyncio.get_running_loop())
        self.worker.submit(job)
        prompt_tokens = await _next_event(job)  # "start", once the prompt is checked
        rid = response_id(kind)
        if r.stream:
            events = EventStream(kind, rid, self.model_name, r.include_usage)
            return StreamingResponse(self._sse(job, events, prompt_tokens), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        parts = []
        while isinstance(payload := await _next_event(job), str):  # deltas, then the "done" dict
            parts.append(payload)
        return completion(kind, rid, self.model_name, "".join(parts), payload["finish_reason"], prompt_tokens,
                          payload["result"])

    async def _sse(self, job: Job, events: EventStream, prompt_tokens: int):
        try:
            for event in events.start():
                yield event
            while True:
                kind, payload = await job.events.get()
                if kind == "delta":
                    yield events.delta(payload)
                    continue
                if kind == "error":  # the headers are out: in-band
                    yield events.error(payload)
                else:
                    for event in events.end(payload["finish_reason"], prompt_tokens, payload["result"]):
                        yield event
                break
            yield EventStream.DONE
        finally:
            job.cancelled.set()  # a client that went away stops its generation at the next round


async def _next_event(job: Job):
    """The payload of the job's next event; an error event is raised. A request cancelled while
    waiting cancels its job."""
    try:
        kind, payload = await job.events.get()
    except asyncio.CancelledError:
        job.cancelled.set()
        raise
    if kind == "error":
        raise payload
    return payload


def _json_body(raw: bytes):
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise APIError(400, "We could not parse the JSON body of your request.", None, "invalid_json") from None


def create_app(kangaroo_model, model_name: str | None = None, api_key: str | None = None,
               default_max_tokens: int = DEFAULT_MAX_TOKENS, prompt_slots: int = DEFAULT_PROMPT_SLOTS):
    """The FastAPI app serving ``kangaroo_model`` under ``model_name`` (default: the model's name).

    Args:
        kangaroo_model: a :class:`~kangaroo.api.KangarooModel`; only the app's worker thread uses it.
        api_key: when set, every ``/v1`` request needs ``Authorization: Bearer <api_key>``.
        default_max_tokens: new-token limit for requests that give no ``max_tokens``.
        prompt_slots: previous prompts kept (:meth:`~kangaroo.api.KangarooModel.keep_prompts`), so
            that clients taking turns each find their conversation's.
    """
    _require_server_deps()
    kangaroo_model.keep_prompts(prompt_slots)
    from contextlib import asynccontextmanager

    from fastapi import FastAPI

    service = Service(kangaroo_model, model_name or kangaroo_model.model_name, default_max_tokens)

    @asynccontextmanager
    async def lifespan(app):
        yield
        service.worker.close()

    app = FastAPI(title="kangaroo", description="OpenAI-compatible server for Kangaroo self-speculative decoding",
                  lifespan=lifespan)
    app.state.worker = service.worker
    _add_error_handlers(app)
    if api_key:
        _add_auth(app, api_key)
    _add_routes(app, service)
    return app


def _error_response(exc: APIError):
    from fastapi.responses import JSONResponse

    return JSONResponse(exc.body(), status_code=exc.status)


def _add_error_handlers(app) -> None:
    """Every error leaves in OpenAI's shape."""
    from starlette.exceptions import HTTPException as StarletteHTTPException

    async def api_error(request, exc: APIError):
        return _error_response(exc)

    async def http_error(request, exc):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return _error_response(APIError(exc.status_code, str(exc.detail), None, code))

    async def unexpected(request, exc):
        logger.exception("unhandled error")
        return _error_response(APIError(500, f"internal error: {type(exc).__name__}", type="server_error"))

    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, unexpected)


def _add_auth(app, api_key: str) -> None:
    """``/v1`` requests need ``Authorization: Bearer <api_key>`` (compared in constant time)."""

    async def auth(request, call_next):
        if request.url.path.startswith("/v1"):
            header = request.headers.get("authorization", "")
            given = header[7:] if header.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(given.encode(), api_key.encode()):
                return _error_response(APIError(401, "Incorrect API key provided.", None, "invalid_api_key"))
        return await call_next(request)

    app.middleware("http")(auth)


def _add_routes(app, service: Service) -> None:
    from fastapi import Request as HTTPRequest

    @app.get("/health")
    async def health():
        return service.health()

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [service.model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        return service.model_card(name)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HTTPRequest):
        return await service.complete(await request.body(), "chat")

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest):
        return await service.complete(await request.body(), "completion")


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
    p.add_argument("--prompt-slots", type=int, default=DEFAULT_PROMPT_SLOTS,
                   help=f"previous prompts kept, so that a conversation's next request prefills only what is new; each holds a KV cache as long as its conversation (default {DEFAULT_PROMPT_SLOTS})")


def run(args) -> int:
    """``kangaroo serve``."""
    _require_server_deps()
    import uvicorn

    from .cli import load_from_args

    if args.default_max_tokens <= 0:
        raise KangarooError(f"--default-max-tokens must be > 0, got {args.default_max_tokens}")
    if args.prompt_slots <= 0:
        raise KangarooError(f"--prompt-slots must be > 0, got {args.prompt_slots}")
    km = load_from_args(args)
    app = create_app(km, args.served_model_name, args.api_key, args.default_max_tokens, args.prompt_slots)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        logger.warning("serving on %s without --api-key: anyone who can reach this port can use the model", args.host)
    name = args.served_model_name or km.model_name
    print(f"kangaroo: serving {name} (adapter: {km.adapter_source}) on http://{args.host}:{args.port}/v1", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info" if args.verbose else "warning")
    return 0
