"""One thread drives the model; concurrent requests share every decode step.

A :class:`StepScheduler` owns a worker thread, the only thread that touches the
model and the engine's row state. Callers on any thread (the LangGraph nodes of
concurrent ``ChatCapEval`` calls, asyncio executors, server workers) hand it two
kinds of work:

* **commands** (:meth:`StepScheduler.run`): release, cancel, snapshots. They run
  in arrival order on the worker, *between* decode steps, so a release or a
  cancel takes effect before the next step;
* **batched commands** (:meth:`StepScheduler.run_batched`): the items queued for
  one handler since the last step are handed to it together, so the prefills
  and the self-evaluations of concurrent requests share forward passes too;
* **decode calls** (:meth:`StepScheduler.decode`): "decode these rows until
  each is finished or has ``until`` tokens". Every pending call joins the next
  step: the engine's ``step`` function decodes the union of their rows in one
  batched forward pass and completes the calls whose rows are done. Rows of
  different requests therefore share decode steps, as in continuous batching;
  there is no global lock held for the length of a generation.

The engine decides what a step is; the scheduler only sequences work. A failing
step fails the calls it served, not the worker.

Example:
    >>> def step(calls):  # a toy engine: every call is done after one step
    ...     for call in calls:
    ...         call.finish(len(call.rows))
    >>> scheduler = StepScheduler(step, name="demo")
    >>> scheduler.run(lambda: 1 + 1)  # a command, run on the worker thread
    2
    >>> scheduler.decode(DecodeCall(rows=[0, 1]))
    2
    >>> scheduler.steps
    1
    >>> scheduler.close()

"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, TypeVar

from langchain_capeval.errors import EngineClosedError

T = TypeVar("T")


@dataclass(eq=False)
class DecodeCall:
    """One pending ``generate``: its rows, where they pause, and the future its caller waits on.

    Attributes:
        rows: Row ids, in the caller's order.
        until: Pause each row once it has this many generated tokens (``None``: decode to the end).
        deadline: A :func:`time.monotonic` value; the call completes after the step that passes it.
        steps: Decode steps this call has taken part in.

    """

    rows: Sequence[int]
    until: int | None = None
    deadline: float | None = None
    steps: int = 0
    future: Future[Any] = field(default_factory=Future, repr=False)

    @property
    def done(self) -> bool:
        """Whether the call has its result or its error."""
        return self.future.done()

    def finish(self, result: Any) -> None:
        """Complete the call with ``result`` (the worker thread calls this)."""
        if not self.future.done():
            self.future.set_result(result)

    def fail(self, error: BaseException) -> None:
        """Complete the call with ``error``, raised in the caller's thread."""
        if not self.future.done():
            self.future.set_exception(error)


class StepScheduler:
    """Sequences commands and batches decode calls on one worker thread.

    Args:
        step: The engine's decode step: given the pending calls (never empty), run
            one batched step over their rows and ``finish``/``fail`` the calls that
            are done. Runs on the worker thread only.
        name: Name of the worker thread.

    Attributes:
        steps: Decode steps run so far.
        max_calls_per_step: The most decode calls one step has served (> 1 means rows of
            concurrent calls shared a forward pass).
        max_step_s: The longest decode step, in seconds (reset it to measure a window).
        max_work_s: The longest single piece of work the worker ran, in seconds: a decode step,
            a command (a prefill, a release) or a batched handler call (prefills, self-evaluations).
            Work in flight cannot be interrupted: a request may end this much after its deadline,
            plus one decode step that sees the deadline passed (reset it to measure a window).
        max_batched_items: The most items one :meth:`run_batched` handler call has served.

    """

    def __init__(self, step: Callable[[list[DecodeCall]], None], *, name: str = "capeval-engine") -> None:
        self._step = step
        self._name = name
        self._cond = threading.Condition()
        self._commands: deque[tuple[Callable[[], Any], Future[Any]]] = deque()
        self._batched: deque[tuple[Callable[[list[Any]], list[Any]], Any, Future[Any]]] = deque()
        self._calls: list[DecodeCall] = []
        self._thread: threading.Thread | None = None
        self._closed = False
        self.steps = 0
        self.max_calls_per_step = 0
        self.max_step_s = 0.0
        self.max_work_s = 0.0
        self.max_batched_items = 0

    # -- callers' side --------------------------------------------------------------------------

    def on_worker(self) -> bool:
        """Whether the current thread is the worker (commands then run inline)."""
        return threading.current_thread() is self._thread

    def run(self, command: Callable[[], T]) -> T:
        """Run ``command`` on the worker thread between decode steps; return its result or raise its error."""
        if self.on_worker():
            return command()
        future: Future[T] = Future()
        with self._cond:
            self._ensure_open()
            self._commands.append((command, future))
            self._cond.notify()
        return future.result()

    def run_batched(self, handler: Callable[[list[Any]], list[Any]], item: Any) -> Any:
        """Run ``handler`` on the worker over ``item`` and every item queued for the same handler meanwhile.

        ``handler`` gets the items in arrival order and returns one result per item, in order; a result that
        is an exception is raised in that item's caller only. Concurrent requests' prefills and
        self-evaluations are batched this way, as their decode steps are.
        """
        if self.on_worker():
            return _unwrap(handler([item])[0])
        future: Future[Any] = Future()
        with self._cond:
            self._ensure_open()
            self._batched.append((handler, item, future))
            self._cond.notify()
        return future.result()

    def decode(self, call: DecodeCall) -> Any:
        """Queue ``call`` for the next decode step and wait for its result."""
        if self.on_worker():
            raise RuntimeError("decode() cannot be called from a command: it would wait on its own thread")
        with self._cond:
            self._ensure_open()
            self._calls.append(call)
            self._cond.notify()
        return call.future.result()

    def pending_calls(self) -> list[DecodeCall]:
        """The decode calls not yet completed (for commands that must fail some, e.g. a cancel)."""
        with self._cond:
            return [c for c in self._calls if not c.done]

    def close(self) -> None:
        """Finish the queued work, then stop the worker; later calls raise :class:`EngineClosedError`."""
        with self._cond:
            self._closed = True
            self._cond.notify()
            thread = self._thread
        if thread is not None and not self.on_worker():
            thread.join()

    # -- worker's side --------------------------------------------------------------------------

    def _ensure_open(self) -> None:
        if self._closed:
            raise EngineClosedError("the engine was closed; build a new one")
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name=self._name, daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not (self._commands or self._batched or self._calls or self._closed):
                    self._cond.wait()
                if self._closed and not self._commands and not self._batched and not self._calls:
                    return
                commands = list(self._commands)
                self._commands.clear()
                batched = list(self._batched)
                self._batched.clear()
            for command, future in commands:
                if future.set_running_or_notify_cancel():
                    start = time.perf_counter()
                    try:
                        future.set_result(command())
                    except BaseException as e:  # re-raised in the caller's thread
                        future.set_exception(e)
                    self._worked(start)
            self._run_batches(batched)
            with self._cond:
                self._calls = [c for c in self._calls if not c.done]
                calls = list(self._calls)
            if not calls:
                continue
            self.steps += 1
            self.max_calls_per_step = max(self.max_calls_per_step, len(calls))
            start = time.perf_counter()
            try:
                self._step(calls)
            except BaseException as e:  # the step's callers get the error; the worker lives on
                for c in calls:
                    c.fail(e)
            self.max_step_s = max(self.max_step_s, time.perf_counter() - start)
            self._worked(start)

    def _worked(self, start: float) -> None:
        self.max_work_s = max(self.max_work_s, time.perf_counter() - start)

    def _run_batches(self, batched: list[tuple[Callable[[list[Any]], list[Any]], Any, Future[Any]]]) -> None:
        groups: dict[Callable[[list[Any]], list[Any]], list[tuple[Any, Future[Any]]]] = {}
        for handler, item, future in batched:
            if future.set_running_or_notify_cancel():
                groups.setdefault(handler, []).append((item, future))
        for handler, entries in groups.items():
            self.max_batched_items = max(self.max_batched_items, len(entries))
            start = time.perf_counter()
            try:
                results = handler([item for item, _ in entries])
            except BaseException as e:  # the whole batch failed: every caller gets the error
                results = [e] * len(entries)
            self._worked(start)
            for (_, future), result in zip(entries, results, strict=True):
                if isinstance(result, BaseException):
                    future.set_exception(result)
                else:
                    future.set_result(result)


def _unwrap(result: Any) -> Any:
    if isinstance(result, BaseException):
        raise result
    return result


__all__ = ["DecodeCall", "StepScheduler"]
