"""The OpenAI-compatible HTTP app: ``create_app(engine, default_policy)``.

Endpoints:

* ``POST /v1/chat/completions``: ChatCapEval over the engine (streaming over SSE, ``usage``,
  the ``capeval`` extension with the samples, stop reason and decision trace);
* ``POST /v1/completions``: plain sampling, one row per request, with top-k ``logprobs``:
  what the client engine (:mod:`langchain_capeval.engines.openai_client`) needs;
* ``GET /v1/models``, ``GET /v1/models/{model}``: the served model (with ``max_model_len``);
* ``GET /health``: liveness, plus the engine's live rows and request counters.

Errors answer with OpenAI's JSON shape and a proper status: 400 for a malformed or invalid
body (422 validation errors included) and for a prompt that does not fit the context
(``code: context_length_exceeded``), 404 for an unknown model or path, 413 for a body over
``max_body_bytes``, 500 for a bug; the server keeps serving. When a client disconnects, its
request is cancelled (``Engine.cancel``): its engine rows are freed before the next decode step.

Concurrency: blocking engine work runs in a thread pool; the transformers engine's step
scheduler batches the rows (and the prefills and self-evaluations) of concurrent requests
into shared forward passes.

Example:
    >>> from langchain_capeval.server import create_app  # doctest: +SKIP
    >>> app = create_app(engine, CapEvalConfig(max_samples=4))  # doctest: +SKIP
    >>> uvicorn.run(app, host="127.0.0.1", port=8000)  # doctest: +SKIP

"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from langchain_capeval.chat_models import ChatCapEval
from langchain_capeval.config import CapEvalConfig
from langchain_capeval.engines.base import Engine
from langchain_capeval.errors import (
    BudgetTooSmallError,
    CapEvalInputError,
    InvalidMessagesError,
    PromptTooLongError,
    RequestCancelledError,
    UnsupportedFeatureError,
)
from langchain_capeval.server.cancel import CancellableEngine
from langchain_capeval.server.chat import (
    chat_chunks,
    chat_response,
    check_budget_fits,
    check_prompt_fits,
    request_policy,
    to_langchain,
)
from langchain_capeval.server.completions import (
    CompletionRun,
    CompletionStep,
    completion_choice,
    prompt_token_ids,
    scorer_for,
)
from langchain_capeval.server.protocol import APIError, ChatCompletionRequest, CompletionRequest, error_body

logger = logging.getLogger(__name__)

T = TypeVar("T")


class ServerConfig(BaseModel):
    """How the HTTP server behaves (the policy and the engine are configured separately)."""

    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)

    served_model_name: str | None = None
    """The name clients pass as ``model``; ``None``: the engine's model name."""
    max_body_bytes: int = Field(default=4 * 2**20, ge=1024)
    """Largest request body accepted; a bigger one gets HTTP 413."""


@dataclass
class ServerStats:
    """Request counters, reported by ``GET /health``."""

    requests: int = 0
    in_flight: int = 0
    cancelled: int = 0
    """Requests whose client disconnected before the answer was complete."""


def api_error(exc: BaseException) -> APIError:
    """The HTTP error for an exception (unknown ones are a 500)."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, PromptTooLongError):
        return APIError(400, str(exc), code="context_length_exceeded")
    if isinstance(exc, InvalidMessagesError):
        return APIError(400, str(exc), param="messages")
    if isinstance(exc, BudgetTooSmallError):
        return APIError(400, str(exc), param="capeval.max_total_tokens")
    if isinstance(exc, CapEvalInputError):
        return APIError(400, str(exc))
    if isinstance(exc, UnsupportedFeatureError):
        return APIError(400, str(exc), code="unsupported")
    if isinstance(exc, RequestCancelledError):
        return APIError(499, str(exc), code="client_closed_request")
    return APIError(500, f"internal error: {type(exc).__name__}: {exc}", type_="internal_error")


class CapEvalServer:
    """The state behind the app: the engine, the default policy, the served name, counters."""

    def __init__(self, engine: Engine, policy: CapEvalConfig, config: ServerConfig) -> None:
        self.engine = engine
        self.policy = policy
        self.config = config
        self.model = config.served_model_name or engine.model_name
        self.scorer = scorer_for(engine)
        self.stats = ServerStats()
        self._lock = threading.Lock()

    def check_model(self, name: str) -> None:
        """Raise a 404 unless ``name`` is the served model."""
        if name != self.model:
            raise APIError(
                404,
                f"model {name!r} is not served here; this server serves {self.model!r} (GET /v1/models)",
                param="model",
                code="model_not_found",
            )

    def begin(self) -> CancellableEngine:
        """A cancellable view of the engine for one HTTP request."""
        with self._lock:
            self.stats.requests += 1
            self.stats.in_flight += 1
        return CancellableEngine(self.engine)

    def end(self, view: CancellableEngine, *, complete: bool) -> None:
        """Free whatever the request still holds in the engine (blocking: call from a worker thread)."""
        view.close_all()
        with self._lock:
            self.stats.in_flight -= 1
            if view.cancelled and not complete:
                self.stats.cancelled += 1

    def health(self) -> dict[str, Any]:
        """Liveness and counters."""
        with self._lock:
            stats = asdict(self.stats)
        return {"status": "ok", "model": self.model, "live_rows": getattr(self.engine, "live_rows", None), **stats}

    def model_card(self) -> dict[str, Any]:
        """The served model as ``/v1/models`` lists it."""
        return {
            "id": self.model,
            "object": "model",
            "created": 0,
            "owned_by": "capeval",
            "max_model_len": self.engine.context_length,
        }


class EventStream(StreamingResponse):
    """Server-sent events from a blocking iterator of JSON objects, ended by ``data: [DONE]``.

    The iterator runs in a worker thread, one item at a time. A client disconnect cancels
    the request's engine view at once (its worker stops at the next engine call); however
    the stream ends, the request's engine rows are freed.
    """

    def __init__(self, events: Iterator[dict[str, Any]], server: CapEvalServer, view: CancellableEngine) -> None:
        self._server = server
        self._view = view
        self._complete = False
        super().__init__(self._sse(events), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    def _sse(self, events: Iterator[dict[str, Any]]) -> Iterator[str]:
        try:
            for event in events:
                yield f"data: {json.dumps(event)}\n\n"
        except RequestCancelledError:
            return
        except Exception as e:  # the status is sent: report the error in the stream, as OpenAI does
            error = api_error(e)
            if error.status >= 500:
                logger.exception("streamed request failed")
            yield f"data: {json.dumps(error.body())}\n\n"
        self._complete = True
        yield "data: [DONE]\n\n"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Stream; on a client disconnect cancel the request; always free its rows."""

        async def watched_receive() -> Message:
            message = await receive()
            if message["type"] == "http.disconnect":
                self._view.cancel_all()
            return message

        try:
            await super().__call__(scope, watched_receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(lambda: self._server.end(self._view, complete=self._complete))


class InternalErrors:
    """ASGI middleware: an unexpected exception answers HTTP 500 with an OpenAI-shaped body and is logged.

    Starlette's catch-all handler sends its 500 and then re-raises, and uvicorn closes the
    connection on an exception from the app, so a client could read a reset instead of the 500.
    Here the exception stops at the response. Once a response has started (a stream), its
    status is out: streams report their errors as events (:class:`EventStream`), and an
    exception that still escapes is re-raised.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Run the app; answer 500 for an exception before the response started."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def watched_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, watched_send)
        except Exception as exc:
            logger.exception("request failed: %s %s", scope.get("method"), scope.get("path"))
            if started:
                raise
            await JSONResponse(api_error(exc).body(), status_code=500)(scope, receive, send)


class BodyLimit:
    """ASGI middleware: a request body over ``max_bytes`` gets HTTP 413 with an OpenAI-shaped body.

    A declared ``Content-Length`` over the limit is refused before the body is read; a
    chunked body is counted as it arrives.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Refuse an oversize body; pass everything else through."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            body = error_body(self._message(), "request_too_large", code="request_too_large")
            await JSONResponse(body, status_code=413)(scope, receive, send)
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise StarletteHTTPException(413, self._message())  # FastAPI passes HTTP errors through
            return message

        await self.app(scope, counted, send)

    def _message(self) -> str:
        return f"the request body is larger than the server's limit of {self.max_bytes} bytes"


async def run_watched(request: Request, view: CancellableEngine, work: Callable[[], T]) -> T:
    """Run blocking ``work`` in a worker thread; cancel ``view`` if the client disconnects meanwhile."""

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        view.cancel_all()

    watcher = asyncio.ensure_future(watch())
    try:
        return await run_in_threadpool(work)
    finally:
        watcher.cancel()


def create_app(
    engine: Engine, default_policy: CapEvalConfig | None = None, config: ServerConfig | None = None
) -> FastAPI:
    """The OpenAI-compatible app over ``engine``.

    Args:
        engine: Any engine (the transformers engine computes ``/v1/completions`` logprobs;
            others answer a logprobs request with a 400).
        default_policy: The policy of every chat request, before its own overrides.
        config: Server settings: the served model name, the body size limit.

    """
    config = config or ServerConfig()
    server = CapEvalServer(engine, default_policy or CapEvalConfig(), config)
    app = FastAPI(title="capeval", summary="ChatCapEval behind an OpenAI-compatible API")
    app.add_middleware(BodyLimit, max_bytes=config.max_body_bytes)
    app.add_middleware(InternalErrors)  # added last: outside BodyLimit, inside Starlette's own catch-all
    app.state.capeval = server

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        err: dict[str, Any] = dict(exc.errors()[0]) if exc.errors() else {"loc": (), "msg": "invalid request body"}
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        message = f"{param}: {err['msg']}" if param else str(err["msg"])
        if err.get("type") == "json_invalid":
            message, param = f"the body is not valid JSON: {err.get('ctx', {}).get('error', '')}", None
        return JSONResponse(error_body(message, "invalid_request_error", param=param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = {404: "not_found_error", 413: "request_too_large"}.get(exc.status_code, "invalid_request_error")
        message = str(exc.detail)
        if exc.status_code == 404:
            message = f"no such endpoint: {request.method} {request.url.path}"
        code = "request_too_large" if exc.status_code == 413 else None
        return JSONResponse(error_body(message, kind, code=code), status_code=exc.status_code)

    @app.exception_handler(CapEvalInputError)
    @app.exception_handler(UnsupportedFeatureError)
    async def _capeval_error(request: Request, exc: Exception) -> JSONResponse:
        error = api_error(exc)
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(RequestCancelledError)
    async def _cancelled(request: Request, exc: RequestCancelledError) -> JSONResponse:
        return JSONResponse(api_error(exc).body(), status_code=499)  # nobody reads it: the client is gone

    @app.get("/health")
    async def health() -> dict[str, Any]:
        """Liveness, the engine's live rows and request counters."""
        return await run_in_threadpool(server.health)  # the engine's lock may be held by a decode

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        """The served model."""
        return {"object": "list", "data": [server.model_card()]}

    @app.get("/v1/models/{model:path}")
    async def get_model(model: str) -> dict[str, Any]:
        """One model, or 404."""
        server.check_model(model)
        return server.model_card()

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> dict[str, Any] | EventStream:
        """ChatCapEval's accepted answer, with usage and the decision trace."""
        server.check_model(body.model)
        body.check()
        policy = request_policy(server.policy, body)
        messages = body.chat_messages()
        stop = list(body.stop_strings()) or None
        check_budget_fits(server.engine, policy)
        await run_in_threadpool(check_prompt_fits, server.engine, messages, policy)  # validates the messages
        lc_messages = to_langchain(messages)
        view = server.begin()
        llm = ChatCapEval(engine=view, policy=policy)
        if body.stream:
            chunks = chat_chunks(
                llm.stream(lc_messages, stop=stop), server.model, policy, include_usage=body.include_usage
            )
            return EventStream(chunks, server, view)
        complete = False
        try:
            message = await run_watched(request, view, lambda: llm.invoke(lc_messages, stop=stop))
            complete = True
        finally:
            await anyio.to_thread.run_sync(lambda: server.end(view, complete=complete))
        return chat_response(message, server.model, policy)

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest, request: Request) -> dict[str, Any] | EventStream:
        """Plain sampling of one row, with top-k logprobs."""
        server.check_model(body.model)
        body.check()
        if body.logprobs is not None and server.scorer is None:
            raise APIError(400, "logprobs: this server's engine cannot compute logprobs", param="logprobs")
        prompt = body.single_prompt()
        params = body.sampling_params()
        tokenizer = engine.chat_format.tokenizer
        view = server.begin()

        def start() -> CompletionRun:
            ids = prompt_token_ids(tokenizer, prompt, add_special_tokens=body.add_special_tokens)
            run = CompletionRun(view, ids, params, logprobs=body.logprobs, scorer=server.scorer)
            run.start()
            return run

        try:
            run = await run_in_threadpool(start)
        except BaseException:
            await anyio.to_thread.run_sync(lambda: server.end(view, complete=True))
            raise
        head = {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": server.model,
        }

        def choice(step: CompletionStep, offset: int, first: bool) -> dict[str, Any]:
            return completion_choice(
                step,
                tokenizer,
                logprobs=body.logprobs is not None,
                tokens_as_ids=body.return_tokens_as_token_ids,
                token_ids=body.return_token_ids,
                prompt_ids=run.prompt_ids if first else None,
                offset=offset,
            )

        if body.stream:

            def events() -> Iterator[dict[str, Any]]:
                offset = 0
                for i, step in enumerate(run.steps()):
                    yield {**head, "choices": [choice(step, offset, i == 0)]}
                    offset += len(step.text)
                if body.include_usage:
                    yield {**head, "choices": [], "usage": run.usage()}

            return EventStream(events(), server, view)
        complete = False
        try:
            step = await run_watched(request, view, run.finish)
            complete = True
        finally:
            await anyio.to_thread.run_sync(lambda: server.end(view, complete=complete))
        return {**head, "choices": [choice(step, 0, True)], "usage": run.usage()}

    return app
