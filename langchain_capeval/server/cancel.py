"""One HTTP request's view of the shared engine: cancellable, and cleaned up when its client goes away.

The server wraps the engine once per HTTP request in a :class:`CancellableEngine`. It
records the engine requests started through it, so that when the client disconnects
the server can :meth:`~CancellableEngine.cancel` it: the next engine call of that HTTP
request raises :class:`~langchain_capeval.errors.RequestCancelledError` (the graph
stops), and :meth:`~CancellableEngine.close_all` frees every row it still holds. Long
decodes run in chunks of ``step_tokens`` so that a cancel takes effect within a few
tokens; a row's tokens do not depend on how its decode is chunked (the engine pauses
and resumes rows exactly).

Example:
    >>> view = CancellableEngine(engine)  # doctest: +SKIP
    >>> rows = view.submit(prompt_ids, [SamplingParams()])  # doctest: +SKIP
    >>> view.cancel(); view.close_all()  # the client went away: free its rows  # doctest: +SKIP

"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING

from langchain_capeval.engines.base import Engine, RowId, Sample, SelfEvaluation, Usage
from langchain_capeval.errors import RequestCancelledError, UnknownRowError

if TYPE_CHECKING:
    from langchain_capeval.chat_format import ChatFormat
    from langchain_capeval.sampling import SamplingParams


class CancellableEngine:
    """An :class:`~langchain_capeval.engines.base.Engine` that delegates to ``engine`` until cancelled.

    Args:
        engine: The shared engine.
        step_tokens: Most tokens decoded per engine call, so that a cancel is seen soon.

    """

    def __init__(self, engine: Engine, *, step_tokens: int = 8) -> None:
        self._engine = engine
        self._step = step_tokens
        self._cancelled = threading.Event()
        self._requests: set[str] = set()
        self._guard = threading.Lock()

    # -- cancellation -------------------------------------------------------------------------

    @property
    def cancelled(self) -> bool:
        """Whether :meth:`cancel` was called."""
        return self._cancelled.is_set()

    def cancel(self) -> None:
        """Make every later engine call raise :class:`RequestCancelledError` (cheap; any thread)."""
        self._cancelled.set()

    def close_all(self) -> None:
        """Close every engine request started through this view that is still open."""
        with self._guard:
            open_requests, self._requests = set(self._requests), set()
        for request_id in open_requests:
            with contextlib.suppress(UnknownRowError):
                self._engine.close_request(request_id)

    def _check(self) -> None:
        if self._cancelled.is_set():
            raise RequestCancelledError("the request was cancelled: its HTTP client disconnected")

    # -- the Engine protocol ------------------------------------------------------------------

    @property
    def model_name(self) -> str:
        """The engine's model name."""
        return self._engine.model_name

    @property
    def chat_format(self) -> ChatFormat:
        """The engine's chat format."""
        return self._engine.chat_format

    @property
    def context_length(self) -> int:
        """The engine's context length."""
        return self._engine.context_length

    def submit(
        self, prompt_ids: Sequence[int], params: Sequence[SamplingParams], *, request_id: str | None = None
    ) -> list[RowId]:
        """Start rows, remembering their request so that a cancel can free it."""
        self._check()
        request_id = request_id or uuid.uuid4().hex
        with self._guard:
            self._requests.add(request_id)
        return self._engine.submit(prompt_ids, params, request_id=request_id)

    def generate(
        self, rows: Sequence[RowId], *, until: int | None = None, deadline: float | None = None
    ) -> list[Sample]:
        """Decode like the engine, in chunks of at most ``step_tokens``, checking for a cancel between chunks."""
        self._check()
        snaps = [self._engine.sample(r) for r in rows]
        while True:
            todo = [s for s in snaps if not s.finished and (until is None or s.num_tokens < until)]
            if not todo:
                return snaps
            step_until = min(s.num_tokens for s in todo) + self._step
            snaps = self._engine.generate(
                rows, until=step_until if until is None else min(until, step_until), deadline=deadline
            )
            if deadline is not None and time.monotonic() >= deadline:
                return snaps
            self._check()

    def self_evaluate(self, rows: Sequence[RowId]) -> list[SelfEvaluation]:
        """The engine's self-evaluation."""
        self._check()
        return self._engine.self_evaluate(rows)

    def sample(self, row: RowId) -> Sample:
        """The engine's snapshot of one row."""
        self._check()
        return self._engine.sample(row)

    def release(self, rows: Sequence[RowId]) -> None:
        """Release rows (allowed after a cancel)."""
        self._engine.release(rows)

    def usage(self, request_id: str) -> Usage:
        """The engine's usage of a request."""
        return self._engine.usage(request_id)

    def close_request(self, request_id: str) -> Usage:
        """Close a request (allowed after a cancel) and forget it."""
        with self._guard:
            self._requests.discard(request_id)
        return self._engine.close_request(request_id)
