"""The OpenAI-compatible client engine: rows as streaming ``/v1/completions`` requests to a remote server.

It implements the :class:`~langchain_capeval.engines.base.Engine` protocol against any
server with an OpenAI-compatible completions endpoint (vLLM, SGLang, llama.cpp, or
``capeval serve``). Chat templating stays on this side, with a local Hugging Face
tokenizer of the same model (:class:`~langchain_capeval.chat_format.ChatFormat`);
prompts go out as token ids (or as text, for servers that take only text).

* A row is one streaming request (``n=1``, the row's own seed, temperature, top-p,
  ``max_tokens`` and stop strings). :meth:`~OpenAICompatibleEngine.submit` opens it and
  reads the first token, as the transformers engine samples it at submit.
* ``generate(rows, until=k)`` reads each row's stream until it holds ``k`` tokens, then
  stops reading: the checkpoint. Calling again resumes reading the same stream. (The
  server keeps generating meanwhile; a checkpoint costs no re-prefill.)
* ``release`` closes the row's stream: the server sees the connection drop and aborts
  the request, so a pruned sample costs nothing further.
* ``self_evaluate`` sends, per row, a one-token completion over prompt + response + the
  self-evaluation turn with ``logprobs=20`` and reads P("No") and P("Yes") from the top
  logprobs; an answer outside them reads as 0 (counted in ``answers_outside_top_k``, the
  first one logged). A server that returns no logprobs raises
  :class:`~langchain_capeval.errors.ServerFeatureError`. ``prompt_logprobs`` are never used.

Requests retry, with exponential backoff, on connection errors, HTTP 429 and 5xx; 4xx
answers raise :class:`~langchain_capeval.errors.ServerRequestError` with the server's
message. With ``vllm_extensions`` (the default) the engine asks for vLLM's
``return_token_ids`` so it knows the exact tokens generated; without them it
re-tokenizes the text locally (token counts may then differ by a few).

Example:
    >>> from langchain_capeval.engines.openai_client import OpenAICompatibleEngine, OpenAIEngineConfig
    >>> engine = OpenAICompatibleEngine.from_config(
    ...     OpenAIEngineConfig(base_url="http://localhost:8000/v1", model="llama-3.1-8b", tokenizer="/models/llama")
    ... )  # doctest: +SKIP
    >>> ChatCapEval(engine=engine).invoke("What is 2 + 3?")  # doctest: +SKIP

"""

from __future__ import annotations

import itertools
import json
import logging
import math
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import httpx
from pydantic import BaseModel, ConfigDict, Field, SecretStr

from langchain_capeval.chat_format import ChatFormat
from langchain_capeval.engines.base import (
    CancelledRequests,
    FinishReason,
    RowId,
    Sample,
    SelfEvaluation,
    Usage,
    check_until,
    checked_submission,
)
from langchain_capeval.engines.decoding import win_or_tie_probability
from langchain_capeval.errors import (
    InvalidSamplingError,
    ServerConnectionError,
    ServerError,
    ServerFeatureError,
    ServerRequestError,
    ServerTimeoutError,
    UnknownRowError,
)
from langchain_capeval.sampling import SamplingParams

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

A = TypeVar("A")
T = TypeVar("T")

RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
"""HTTP statuses worth retrying: the server is busy or briefly down."""

REQUEST_ID_HEADER = "X-Capeval-Request-Id"
"""Header carrying the engine request id on every completion request: a load balancer that routes on it
keeps a request's rows and self-evaluations on one replica, where its prompt is in the prefix cache."""


class OpenAIEngineConfig(BaseModel):
    """How to reach an OpenAI-compatible server and how to talk to it."""

    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)

    base_url: str
    """The server's OpenAI API root, with ``/v1`` (for example ``http://localhost:8000/v1``)."""
    model: str
    """The served model name (``GET /v1/models``): vLLM's ``--served-model-name``, or a LoRA module's name."""
    tokenizer: str | None = None
    """Local folder (or ``.gguf``) of the same model's Hugging Face tokenizer; ``None``: the embedded default's."""
    api_key: SecretStr | None = None
    """Bearer token, if the server wants one (vLLM's ``--api-key``)."""
    prompt_format: Literal["token_ids", "text"] = "token_ids"
    """Send prompts as token ids (exact; vLLM, SGLang, llama.cpp accept them) or as text (re-tokenized remotely)."""
    vllm_extensions: bool = True
    """Ask for vLLM's extra fields: ``return_token_ids``, ``return_tokens_as_token_ids``, and
    ``add_special_tokens: false`` for text prompts. Servers that do not know them ignore them."""
    context_length: int | None = Field(default=None, ge=16)
    """Most tokens per row; ``None``: the server's ``max_model_len`` (read by :meth:`check_server`)."""
    connect_timeout_s: float = Field(default=5.0, gt=0)
    """Seconds to wait for a connection."""
    read_timeout_s: float = Field(default=120.0, gt=0)
    """Seconds to wait for the next bytes of an answer or of a stream."""
    max_retries: int = Field(default=3, ge=0)
    """Retries of a request after a connection error, HTTP 429 or 5xx."""
    backoff_s: float = Field(default=0.5, ge=0)
    """Wait before the first retry; it doubles for each further one."""
    backoff_max_s: float = Field(default=8.0, ge=0)
    """Longest wait between retries."""
    top_logprobs: int = Field(default=20, ge=1, le=20)
    """Alternatives per position asked for when self-evaluating (vLLM allows at most 20 by default)."""
    max_parallel_requests: int = Field(default=16, ge=1)
    """Self-evaluation requests in flight at once."""


@dataclass
class _Row:
    id: RowId
    request_id: str
    params: SamplingParams
    response: httpx.Response | None = None
    lines: Iterator[str] | None = None
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    exact_ids: bool = True  # whether the server sent the token ids (else they are re-tokenized locally)
    finish_reason: FinishReason | None = None
    usage: Usage = field(default_factory=Usage)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class _Request:
    prompt_ids: list[int]
    rows: list[RowId] = field(default_factory=list)
    usage: Usage = field(default_factory=Usage)


class OpenAICompatibleEngine:
    """An :class:`~langchain_capeval.engines.base.Engine` over a remote OpenAI-compatible ``/v1/completions``.

    Build it with :meth:`from_config` (loads the tokenizer, checks the server), or from a
    ready :class:`ChatFormat` (and optionally an ``httpx.Client``). Public methods are
    thread-safe.

    Args:
        config: Where the server is and how to talk to it.
        chat_format: The chat format of a local tokenizer of the served model.
        client: An HTTP client; by default one is built from ``config``.

    """

    def __init__(self, config: OpenAIEngineConfig, chat_format: ChatFormat, *, client: httpx.Client | None = None):
        self.config = config
        self._format = chat_format
        headers = {"Authorization": f"Bearer {config.api_key.get_secret_value()}"} if config.api_key else {}
        self._http = client or httpx.Client(
            base_url=config.base_url.rstrip("/"),
            headers=headers,
            timeout=httpx.Timeout(config.read_timeout_s, connect=config.connect_timeout_s),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=config.max_parallel_requests),
        )
        self._no_id, self._yes_id = chat_format.answer_token_ids
        self._suffix_room = len(chat_format.self_evaluation_suffix) + 1
        self._served_context: int | None = None
        self._rows: dict[RowId, _Row] = {}
        self._requests: dict[str, _Request] = {}
        self._ids = itertools.count()
        self._lock = threading.RLock()
        self._cancelled = CancelledRequests()  # read without the lock by a stream being read
        self._pool: ThreadPoolExecutor | None = None
        self.answers_outside_top_k = 0
        """Self-evaluations where one answer was outside the top ``top_logprobs`` and read as probability 0,
        which puts P(win or tie) at 0 or 1 (the first one is logged as a warning)."""

    @classmethod
    def from_config(cls, config: OpenAIEngineConfig) -> OpenAICompatibleEngine:
        """Load the local tokenizer, build the engine and check that the server serves ``config.model``."""
        engine = cls(config, ChatFormat(load_tokenizer(config.tokenizer)))
        engine.check_server()
        return engine

    def check_server(self) -> dict[str, Any]:
        """Ask ``GET /models`` for the served model; remember its ``max_model_len``; return its card.

        Raises:
            ServerRequestError: The server does not serve ``config.model``.
            ServerConnectionError: The server cannot be reached.

        """
        response = self._send("GET", "/models")
        cards = response.json().get("data", [])
        card = next((c for c in cards if c.get("id") == self.config.model), None)
        if card is None:
            served = ", ".join(repr(c.get("id")) for c in cards) or "none"
            raise ServerRequestError(
                f"{self.config.base_url} does not serve model {self.config.model!r}; it serves: {served}",
                status_code=404,
                code="model_not_found",
            )
        if isinstance(card.get("max_model_len"), int):
            self._served_context = int(card["max_model_len"])
        return dict(card)

    # -- protocol properties -------------------------------------------------------------------

    @property
    def model_name(self) -> str:
        """The served model name."""
        return self.config.model

    @property
    def chat_format(self) -> ChatFormat:
        """Renders messages and the self-evaluation turn into token ids (locally)."""
        return self._format

    @property
    def context_length(self) -> int:
        """``config.context_length``, else the server's ``max_model_len``, else the tokenizer's limit."""
        if self.config.context_length is not None:
            return self.config.context_length
        if self._served_context is not None:
            return self._served_context
        limit = int(getattr(self._format.tokenizer, "model_max_length", 0) or 0)
        return limit if 0 < limit < 10**7 else 4096

    # -- rows ----------------------------------------------------------------------------------

    def submit(
        self, prompt_ids: Sequence[int], params: Sequence[SamplingParams], *, request_id: str | None = None
    ) -> list[RowId]:
        """Open one stream per ``params`` and read each row's first token."""
        prompt, _ = checked_submission(
            prompt_ids,
            params,
            vocab_size=len(self._format.tokenizer),
            max_tokens=self.context_length - self._suffix_room,
        )
        with self._lock:
            request_id = request_id or uuid.uuid4().hex
            self._cancelled.check(request_id)
            req = self._requests.get(request_id)
            if req is None:
                req = self._requests[request_id] = _Request(prompt)
                req.usage.prompt_tokens = len(prompt)
            elif req.prompt_ids != prompt:
                raise InvalidSamplingError(f"request {request_id!r} already has a different prompt")
            rows = [_Row(next(self._ids), request_id, p) for p in params]
            for row in rows:
                self._rows[row.id] = row
                req.rows.append(row.id)
            try:
                for row in rows:
                    self._open(row, prompt)
                for row in rows:
                    self._read(row, until=1, deadline=None)
            except BaseException:
                self.release([r.id for r in rows])
                raise
            return [r.id for r in rows]

    def generate(
        self, rows: Sequence[RowId], *, until: int | None = None, deadline: float | None = None
    ) -> list[Sample]:
        """Read each row's stream until it is finished or holds ``until`` tokens; return snapshots.

        ``deadline`` (a :func:`time.monotonic` value) stops reading after the chunk that passes it.
        """
        check_until(until)
        with self._lock:
            live = self._lookup(rows)
            for row in live:
                if deadline is not None and time.monotonic() >= deadline:
                    break
                if not row.finished and (until is None or len(row.token_ids) < until):
                    self._read(row, until=until, deadline=deadline)
            return [self._snapshot(r) for r in live]

    def self_evaluate(self, rows: Sequence[RowId]) -> list[SelfEvaluation]:
        """Ask, per row, "Would you do better if you started over?" as a one-token completion with top logprobs."""
        with self._lock:
            live = self._lookup(rows)
            jobs = [(r.request_id, self._self_evaluation_body(r)) for r in live]
            start = time.perf_counter()
            answers = self._parallel(
                lambda job: self._send("POST", "/completions", job[1], request_id=job[0]).json(), jobs
            )
            share = (time.perf_counter() - start) / max(len(live), 1)
            out = []
            for row, answer in zip(live, answers, strict=True):
                choices = answer.get("choices") or [{}]
                p_no, p_yes = read_answer_probabilities(
                    choices[0], self._answer_keys(self._no_id), self._answer_keys(self._yes_id)
                )
                if (p_no == 0.0) != (p_yes == 0.0):
                    self._note_answer_outside_top_k(p_no, p_yes)
                pushed = 1 + len(self._format.suffix_after(row.token_ids))  # as the transformers engine counts it
                row.usage.self_eval_tokens += pushed
                row.usage.wall_time_s += share
                req = self._requests[row.request_id]
                req.usage.self_eval_tokens += pushed
                req.usage.wall_time_s += share
                out.append(SelfEvaluation(row.id, win_or_tie_probability(p_no, p_yes), p_no, p_yes, len(row.token_ids)))
            return out

    def sample(self, row: RowId) -> Sample:
        """A snapshot of one row."""
        with self._lock:
            return self._snapshot(self._lookup([row])[0])

    def release(self, rows: Sequence[RowId]) -> None:
        """Close the rows' streams (the server aborts them); unknown ids are ignored."""
        with self._lock:
            for r in rows:
                row = self._rows.pop(r, None)
                if row is None:
                    continue
                self._close_stream(row)
                req = self._requests.get(row.request_id)
                if req is not None and r in req.rows:
                    req.rows.remove(r)

    def usage(self, request_id: str) -> Usage:
        """Compute spent on a request so far (prompt tokens counted once, as a prefix-caching server spends them)."""
        with self._lock:
            if request_id not in self._requests:
                raise UnknownRowError(f"unknown request {request_id!r}")
            return self._requests[request_id].usage.copy()

    def close_request(self, request_id: str) -> Usage:
        """Close every stream of a request and forget it; return its usage."""
        with self._lock:
            usage = self.usage(request_id)
            self.release(list(self._requests[request_id].rows))
            del self._requests[request_id]
            return usage

    def cancel(self, request_id: str) -> None:
        """Stop a request: a stream being read stops at its next event; its streams close and it is forgotten."""
        self._cancelled.add(request_id)
        with self._lock:
            if request_id in self._requests:
                self.close_request(request_id)

    @property
    def live_rows(self) -> int:
        """Rows this engine holds (open or paused streams, and finished rows not yet released)."""
        with self._lock:
            return len(self._rows)

    def close(self) -> None:
        """Close every stream and the HTTP client."""
        with self._lock:
            self.release(list(self._rows))
            self._requests.clear()
            if self._pool is not None:
                self._pool.shutdown(wait=False)
                self._pool = None
            self._http.close()

    def __enter__(self) -> OpenAICompatibleEngine:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- HTTP ----------------------------------------------------------------------------------

    def _send(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        *,
        stream: bool = False,
        request_id: str | None = None,
    ) -> httpx.Response:
        """One request, retried with backoff on connection errors, 429 and 5xx; raises typed errors."""
        url = f"{self.config.base_url.rstrip('/')}{path}"
        attempts = self.config.max_retries + 1
        failure = ""
        for attempt in range(attempts):
            if attempt:
                wait = min(self.config.backoff_s * 2 ** (attempt - 1), self.config.backoff_max_s)
                logger.warning("retrying %s %s in %.1fs (%s)", method, url, wait, failure)
                time.sleep(wait)
            try:
                headers = {REQUEST_ID_HEADER: request_id} if request_id else None
                request = self._http.build_request(method, path, json=body, headers=headers)
                response = self._http.send(request, stream=stream)
            except httpx.ConnectTimeout as e:
                failure = f"connection timed out after {self.config.connect_timeout_s}s ({e})"
                continue
            except httpx.TimeoutException as e:
                raise ServerTimeoutError(
                    f"{method} {url}: no answer within read_timeout_s={self.config.read_timeout_s}s"
                ) from e
            except httpx.TransportError as e:
                failure = f"{type(e).__name__}: {e}"
                continue
            if response.status_code in RETRY_STATUSES:
                failure = f"HTTP {response.status_code}: {_error_message(response)}"
                response.close()
                continue
            if response.status_code >= 400:
                raise self._request_error(response, method, url)
            return response
        if failure.startswith("HTTP "):
            raise ServerError(f"{method} {url} failed after {attempts} attempt(s): {failure}")
        raise ServerConnectionError(
            f"could not reach {url} after {attempts} attempt(s): {failure}; is the server running "
            "(check base_url, with its /v1)?"
        )

    def _request_error(self, response: httpx.Response, method: str, url: str) -> Exception:
        message = _error_message(response)
        code = _error_code(response)
        response.close()
        if response.status_code in (404, 405) and code != "model_not_found" and "model" not in message.lower():
            return ServerFeatureError(
                f"{method} {url.removeprefix(self.config.base_url.rstrip('/'))}",
                f"{url} answered HTTP {response.status_code} ({message}); the client engine needs an "
                "OpenAI-compatible /v1/completions endpoint (vLLM, SGLang, llama.cpp, capeval serve)",
            )
        hint = ""
        if response.status_code == 400 and self.config.prompt_format == "token_ids" and "prompt" in message.lower():
            hint = "; if the server does not accept token-id prompts, set prompt_format='text'"
        return ServerRequestError(
            f"{method} {url} answered HTTP {response.status_code}: {message}{hint}",
            status_code=response.status_code,
            code=code,
        )

    def _parallel(self, fn: Callable[[A], T], items: list[A]) -> list[T]:
        if len(items) <= 1:
            return [fn(i) for i in items]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.config.max_parallel_requests, thread_name_prefix="capeval-http")
        return list(self._pool.map(fn, items))

    def _prompt(self, ids: list[int]) -> list[int] | str:
        if self.config.prompt_format == "token_ids":
            return ids
        return str(self._format.tokenizer.decode(ids, skip_special_tokens=False))

    def _body(self, prompt: list[int] | str, **fields: Any) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.config.model, "prompt": prompt, "n": 1, **fields}
        if self.config.vllm_extensions:
            body["return_token_ids"] = True
            if fields.get("logprobs") is not None:
                body["return_tokens_as_token_ids"] = True
            if isinstance(prompt, str):
                body["add_special_tokens"] = False
        return body

    def _open(self, row: _Row, prompt_ids: list[int]) -> None:
        p = row.params
        body = self._body(
            self._prompt(prompt_ids),
            max_tokens=p.max_new_tokens,
            temperature=p.temperature,
            top_p=p.top_p,
            seed=p.seed,
            stream=True,
            **({"stop": list(p.stop)} if p.stop else {}),
        )
        response = self._send("POST", "/completions", body, stream=True, request_id=row.request_id)
        if "text/event-stream" not in response.headers.get("content-type", ""):
            response.close()
            raise ServerFeatureError(
                "streaming /v1/completions",
                f"asked for stream=true, got content-type {response.headers.get('content-type')!r}",
            )
        row.response = response
        row.lines = response.iter_lines()

    def _close_stream(self, row: _Row) -> None:
        if row.response is not None:
            row.response.close()  # an unfinished stream closes its connection: the server aborts the request
        row.response = None
        row.lines = None

    def _read(self, row: _Row, *, until: int | None, deadline: float | None) -> None:
        """Read ``row``'s stream until it finishes, holds ``until`` tokens, or ``deadline`` passes."""
        start = time.perf_counter()
        try:
            while not row.finished and (until is None or len(row.token_ids) < until):
                self._cancelled.check(row.request_id)
                event = self._next_event(row)
                if event is None:
                    raise ServerError(f"the stream of row {row.id} ended before its completion finished")
                self._apply(row, event)
                if deadline is not None and time.monotonic() >= deadline:
                    break
        finally:
            elapsed = time.perf_counter() - start
            row.usage.wall_time_s += elapsed
            self._requests[row.request_id].usage.wall_time_s += elapsed
        if row.finished:
            self._close_stream(row)

    def _next_event(self, row: _Row) -> dict[str, Any] | None:
        """The next JSON event of the row's stream; ``None`` at ``[DONE]`` or the end of the stream."""
        if row.lines is None:
            return None
        try:
            for line in row.lines:
                if not line.startswith("data:"):
                    continue  # blank separators, comments, event names
                data = line[5:].strip()
                if data == "[DONE]":
                    return None
                event = json.loads(data)
                if isinstance(event, dict) and "error" in event:
                    raise ServerError(f"the server reported an error mid-stream: {_message_of(event)}")
                return event if isinstance(event, dict) else None
        except httpx.TimeoutException as e:
            raise ServerTimeoutError(
                f"row {row.id}: no stream data within read_timeout_s={self.config.read_timeout_s}s"
            ) from e
        except httpx.TransportError as e:
            raise ServerError(f"row {row.id}: the stream broke: {type(e).__name__}: {e}") from e
        except json.JSONDecodeError as e:
            raise ServerError(f"row {row.id}: the stream sent data that is not JSON: {e}") from e
        return None

    def _apply(self, row: _Row, event: Mapping[str, Any]) -> None:
        """Add one stream chunk's text and tokens to the row."""
        choices = event.get("choices") or []
        if not choices:
            return  # a usage-only chunk
        choice = choices[0]
        row.text += choice.get("text") or ""
        before = len(row.token_ids)
        ids = choice.get("token_ids")
        if ids is not None and row.exact_ids:
            row.token_ids.extend(int(t) for t in ids)
        else:
            row.exact_ids = False
            row.token_ids = list(self._format.tokenizer(row.text, add_special_tokens=False)["input_ids"])
        reason = choice.get("finish_reason")
        if reason is not None:
            row.finish_reason = self._finish_reason(row, reason, choice.get("stop_reason"))
        added = max(len(row.token_ids) - before, 0)
        row.usage.generated_tokens += added
        self._requests[row.request_id].usage.generated_tokens += added

    def _finish_reason(self, row: _Row, reason: str, stop_reason: Any) -> FinishReason:
        """Map OpenAI's ``finish_reason`` (and vLLM's ``stop_reason``) onto eos / stop / length."""
        eos = self._format.eos_token_ids
        if reason == "length":
            return "length"
        if isinstance(stop_reason, str):
            return "stop"
        if row.exact_ids:
            if row.token_ids and row.token_ids[-1] in eos:
                return "eos"
            # neither an end-of-turn token we know nor the length limit: a stop string, or a stop token of the server's
            return "stop" if row.params.stop and stop_reason is None else "eos"
        end = self._format.self_evaluation_suffix[0]
        row.token_ids.append(end if end in eos else min(eos))  # re-tokenized text never shows the end token
        return "eos"

    def _self_evaluation_body(self, row: _Row) -> dict[str, Any]:
        """A one-token completion over prompt + response + the self-evaluation turn, with top logprobs."""
        prompt_ids = self._requests[row.request_id].prompt_ids
        prompt: list[int] | str
        if self.config.prompt_format == "token_ids":
            prompt = [*prompt_ids, *row.token_ids, *self._format.suffix_after(row.token_ids)]
        else:  # the response text never holds its end token, so the whole turn follows it
            decode = self._format.tokenizer.decode
            suffix = self._format.self_evaluation_suffix
            prompt = (
                f"{decode(prompt_ids, skip_special_tokens=False)}{row.text}{decode(suffix, skip_special_tokens=False)}"
            )
        return self._body(prompt, max_tokens=1, temperature=0.0, logprobs=self.config.top_logprobs, stream=False)

    def _note_answer_outside_top_k(self, p_no: float, p_yes: float) -> None:
        self.answers_outside_top_k += 1
        if self.answers_outside_top_k == 1:
            missing, present = ("Yes", p_no) if p_yes == 0.0 else ("No", p_yes)
            logger.warning(
                "self-evaluation: %r is not in the server's top %d logprobs and reads as probability 0 (the other "
                "answer has %.3g), so P(win or tie) reads as %s; an adapter that puts little of the softmax on the two "
                "answers (the two-way loss) ranks them low; the count is in `answers_outside_top_k`",
                missing,
                self.config.top_logprobs,
                present,
                "1" if missing == "Yes" else "0",
            )

    def _answer_keys(self, token_id: int) -> tuple[str, ...]:
        """How a server may name a token in ``top_logprobs``: vLLM's ``token_id:N``, its text, its raw piece."""
        tok = self._format.tokenizer
        return (f"token_id:{token_id}", str(tok.decode([token_id])), str(tok.convert_ids_to_tokens(token_id)))

    def _lookup(self, rows: Sequence[RowId]) -> list[_Row]:
        out = []
        for r in rows:
            row = self._rows.get(r)
            if row is None:
                raise UnknownRowError(f"row {r!r} is not live in this engine (released, or never submitted)")
            out.append(row)
        return out

    def _snapshot(self, r: _Row) -> Sample:
        u = r.usage
        return Sample(
            row=r.id,
            request_id=r.request_id,
            token_ids=list(r.token_ids),
            text=r.text,
            finished=r.finished,
            finish_reason=r.finish_reason,
            temperature=r.params.temperature,
            usage=Usage(0, u.generated_tokens, u.self_eval_tokens, u.wall_time_s),
        )


def read_answer_probabilities(
    choice: Mapping[str, Any], no_keys: Sequence[str], yes_keys: Sequence[str]
) -> tuple[float, float]:
    """Raw P("No") and P("Yes") from a one-token completion's top logprobs.

    Reads OpenAI's legacy completions shape (``logprobs.top_logprobs[0]``: token -> logprob)
    and the chat-style shape some servers use (``logprobs.content[0].top_logprobs``). An
    answer outside the top-k counts as probability 0 (both outside: no information).

    Raises:
        ServerFeatureError: The answer carries no top logprobs.

    Example:
        >>> read_answer_probabilities({"logprobs": {"top_logprobs": [{"No": -0.5, "Yes": -1.5}]}}, ["No"], ["Yes"])
        (0.6065306597126334, 0.22313016014842982)

    """
    logprobs = choice.get("logprobs") or {}
    top: Mapping[str, Any] | None = None
    if logprobs.get("top_logprobs"):
        top = logprobs["top_logprobs"][0]
    elif logprobs.get("content"):
        top = {e.get("token"): e.get("logprob") for e in logprobs["content"][0].get("top_logprobs") or []}
    if not top:
        raise ServerFeatureError(
            "top-k logprobs on /v1/completions",
            "a completion asked for with `logprobs` came back without `logprobs.top_logprobs`; self-evaluation "
            "reads P('No') and P('Yes') from them (vLLM, SGLang and llama.cpp return them)",
        )

    def probability(keys: Sequence[str]) -> float:
        value = next((top[k] for k in keys if k in top and top[k] is not None), None)
        return math.exp(float(value)) if value is not None else 0.0

    return probability(no_keys), probability(yes_keys)


def load_tokenizer(name: str | None) -> PreTrainedTokenizerBase:
    """A local Hugging Face tokenizer: a model folder, a ``.gguf`` file, or ``None`` for the embedded default."""
    from transformers import AutoTokenizer

    from langchain_capeval.models import resolve_model_path

    folder, gguf = resolve_model_path(name)
    if (folder / "tokenizer_config.json").is_file() or gguf is None:
        return AutoTokenizer.from_pretrained(folder)
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def _error_payload(response: httpx.Response) -> Mapping[str, Any]:
    try:
        response.read()
        data = response.json()
    except (json.JSONDecodeError, httpx.HTTPError, UnicodeDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _message_of(data: Mapping[str, Any]) -> str:
    error = data.get("error")
    if isinstance(error, dict):
        return str(error.get("message") or error)
    return str(data.get("message") or data.get("detail") or error or data)


def _error_message(response: httpx.Response) -> str:
    """The message of an error answer: OpenAI's ``error.message``, vLLM's ``message``, FastAPI's ``detail``."""
    data = _error_payload(response)
    if data:
        return _message_of(data)
    try:
        return response.text[:300] or response.reason_phrase
    except httpx.HTTPError:
        return response.reason_phrase


def _error_code(response: httpx.Response) -> str | None:
    error = _error_payload(response).get("error")
    return str(error["code"]) if isinstance(error, dict) and error.get("code") else None
