"""One HTTP request's view of the shared engine: cancellable, and cleaned up when its client goes away.

The server wraps the engine once per HTTP request in a :class:`CancellableEngine`. It
records the engine requests started through it, so that when the client disconnects
the server can :meth:`~CancellableEngine.cancel_all` it: the engine frees its rows
before the next decode step, the engine call the HTTP request is waiting in raises
:class:`~langchain_capeval.errors.RequestCancelledError` (the graph stops), and so does
any later one; :meth:`~CancellableEngine.close_all` frees whatever is left.

Example:
    >>> view = CancellableEngine(engine)  # doctest: +SKIP
    >>> rows = view.submit(prompt_ids, [SamplingParams()])  # doctest: +SKIP
    >>> view.cancel_all(); view.close_all()  # the client went away: free its rows  # doctest: +SKIP

"""

from __future__ import annotations

import contextlib
import threading
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

    """

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._cancelled = threading.Event()
        self._requests: set[str] = set()
        self._guard = threading.Lock()

    # -- cancellation -------------------------------------------------------------------------

    @property
    def cancelled(self) -> bool:
        """Whether :meth:`cancel` was called."""
        return self._cancelled.is_set()

    def cancel_all(self) -> None:
        """Cancel every engine request started through this view; later calls raise :class:`RequestCancelledError`.

        Safe from any thread: the engine frees the requests' rows before its next
        decode step, and a ``generate`` waiting on them raises at once.
        """
        self._cancelled.set()
        with self._guard:
            started = list(self._requests)
        for request_id in started:
            self._engine.cancel(request_id)

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
        """The engine's decode; a cancel from another thread makes it raise at the engine's next step."""
        self._check()
        return self._engine.generate(rows, until=until, deadline=deadline)

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

    def cancel(self, request_id: str) -> None:
        """Cancel one engine request (the :class:`Engine` protocol's ``cancel``)."""
        self._engine.cancel(request_id)
