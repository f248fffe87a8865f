"""The engine protocol: sample rows, self-evaluate them, prune them.

An engine speaks token ids and *rows*. A row is one sample of one request: it
has a prompt (shared with the other rows of its request), the tokens generated
so far, and the engine-side state (a KV cache, a server stream) that lets it
continue. Chat templates and messages live one layer up, in
:mod:`langchain_capeval.chat_format`.

The four operations are the method's primitives:

* :meth:`Engine.submit` starts rows for a prompt, one per :class:`SamplingParams`
  (so one batch may follow an annealing schedule);
* :meth:`Engine.generate` decodes rows until each finishes or reaches a token
  checkpoint, then hands control back; calling it again resumes;
* :meth:`Engine.self_evaluate` asks the model, on top of each row's live state,
  whether it would do better by starting over, and returns P(win or tie);
* :meth:`Engine.release` drops rows (pruned, or done with): they cost nothing
  further; :meth:`Engine.cancel` stops a whole request from any thread.

Example:
    >>> from langchain_capeval.engines import load_engine  # doctest: +SKIP
    >>> engine = load_engine()  # doctest: +SKIP
    >>> ids = engine.chat_format.encode([{"role": "user", "content": "2+2?"}])  # doctest: +SKIP
    >>> rows = engine.submit(ids, [SamplingParams(seed=i) for i in range(4)])  # doctest: +SKIP
    >>> engine.generate(rows, until=16)  # doctest: +SKIP
    >>> scores = engine.self_evaluate(rows)  # doctest: +SKIP
    >>> engine.release(rows)  # doctest: +SKIP

"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Literal, Protocol, runtime_checkable

from langchain_capeval.errors import InvalidSamplingError, PromptTooLongError, RequestCancelledError
from langchain_capeval.sampling import SamplingParams

if TYPE_CHECKING:
    from langchain_capeval.chat_format import ChatFormat

RowId = int
"""Engine-wide id of one row (one sample)."""

FinishReason = Literal["eos", "stop", "length"]


@dataclass
class Usage:
    """Compute spent, in tokens pushed through the model and seconds.

    Attributes:
        prompt_tokens: Prompt tokens prefilled (once per request, shared by its rows).
        generated_tokens: Tokens sampled.
        self_eval_tokens: Tokens pushed through the model to self-evaluate
            (the pending sampled token plus the self-evaluation turn).
        wall_time_s: Seconds spent inside the engine on this row or request.
        cached_prompt_tokens: Of ``prompt_tokens``, those whose keys and values were copied
            from a cached prompt that starts the same way instead of being prefilled
            (the transformers engine's prefix caching; the other engines leave 0, and the
            vLLM engine reports its own cache through ``prefix_cache_stats``).

    """

    prompt_tokens: int = 0
    generated_tokens: int = 0
    self_eval_tokens: int = 0
    wall_time_s: float = 0.0
    cached_prompt_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        """Every token the model processed or produced."""
        return self.prompt_tokens + self.generated_tokens + self.self_eval_tokens

    def copy(self) -> Usage:
        """A snapshot that later charges to this usage do not change."""
        return replace(self)

    def add(self, other: Usage) -> Usage:
        """Return the sum of two usages."""
        return Usage(
            self.prompt_tokens + other.prompt_tokens,
            self.generated_tokens + other.generated_tokens,
            self.self_eval_tokens + other.self_eval_tokens,
            self.wall_time_s + other.wall_time_s,
            self.cached_prompt_tokens + other.cached_prompt_tokens,
        )


@dataclass
class Sample:
    """A snapshot of one row.

    Attributes:
        row: The row id.
        request_id: The request the row belongs to.
        token_ids: Tokens generated so far (including a final EOS, if any).
        text: Decoded response text, cut before a matched stop string and
            without the EOS token.
        finished: Whether the row will generate no more tokens.
        finish_reason: ``"eos"``, ``"stop"`` or ``"length"`` once finished.
        temperature: The temperature the row was sampled at.
        usage: Generated and self-evaluation tokens of this row (prompt tokens
            are counted per request).

    """

    row: RowId
    request_id: str
    token_ids: list[int]
    text: str
    finished: bool
    finish_reason: FinishReason | None
    temperature: float
    usage: Usage = field(default_factory=Usage)

    @property
    def num_tokens(self) -> int:
        """Number of generated tokens."""
        return len(self.token_ids)


@dataclass(frozen=True)
class SelfEvaluation:
    """The model's answer to "Would you do better if you started over?".

    Attributes:
        row: The row that was evaluated.
        p_win_or_tie: P("No") / (P("No") + P("Yes")): the probability that a
            fresh sample would not beat this one. The score the method uses.
        p_no: Raw P("No") over the whole vocabulary.
        p_yes: Raw P("Yes") over the whole vocabulary.
        num_tokens: Response tokens the evaluation saw (a prefix, mid-generation).

    """

    row: RowId
    p_win_or_tie: float
    p_no: float
    p_yes: float
    num_tokens: int


@runtime_checkable
class Engine(Protocol):
    """What every engine (transformers, vLLM, an OpenAI-compatible server) implements."""

    @property
    def model_name(self) -> str:
        """A name for the model, reported in ``response_metadata``."""
        ...

    @property
    def chat_format(self) -> ChatFormat:
        """Renders messages and the self-evaluation turn into token ids."""
        ...

    @property
    def context_length(self) -> int:
        """Most tokens (prompt + response + self-evaluation) a row may hold."""
        ...

    def submit(
        self, prompt_ids: Sequence[int], params: Sequence[SamplingParams], *, request_id: str | None = None
    ) -> list[RowId]:
        """Start one row per ``params`` on ``prompt_ids``; rows of one request share the prompt.

        Raises:
            PromptTooLongError: The prompt plus ``max_new_tokens`` does not fit.
            InvalidSamplingError: ``params`` is empty.

        """
        ...

    def generate(
        self, rows: Sequence[RowId], *, until: int | None = None, deadline: float | None = None
    ) -> list[Sample]:
        """Decode ``rows`` until each is finished or has ``until`` generated tokens.

        ``until=None`` decodes to the end; ``deadline`` (a :func:`time.monotonic`
        value) stops after the decode step that passes it. Returns a snapshot per
        row, in order.
        """
        ...

    def self_evaluate(self, rows: Sequence[RowId]) -> list[SelfEvaluation]:
        """Score ``rows``, finished or not, without disturbing their generation."""
        ...

    def sample(self, row: RowId) -> Sample:
        """A snapshot of one row."""
        ...

    def release(self, rows: Sequence[RowId]) -> None:
        """Drop rows: free their state; they cost nothing further."""
        ...

    def usage(self, request_id: str) -> Usage:
        """Total compute of a request so far: prompt, generation, self-evaluation."""
        ...

    def close_request(self, request_id: str) -> Usage:
        """Release every row and the cached prompt of a request; return its usage."""
        ...

    def cancel(self, request_id: str) -> None:
        """Stop a request from any thread: free its rows at once; its pending and later calls raise.

        A ``generate`` waiting on the request's rows and any later ``submit`` for it raise
        :class:`~langchain_capeval.errors.RequestCancelledError`. Cancelling an unknown or
        closed request is allowed.
        """
        ...


# -- what every engine checks and keeps, whatever runs the model -------------------------------


def checked_submission(
    prompt_ids: Sequence[int], params: Sequence[SamplingParams], *, vocab_size: int, max_tokens: int
) -> tuple[list[int], int]:
    """Check a :meth:`Engine.submit` call before it touches any state; return the prompt and its longest row.

    Args:
        prompt_ids: The prompt's token ids.
        params: One :class:`SamplingParams` per row.
        vocab_size: The model's vocabulary size: every prompt id must be below it.
        max_tokens: Room for prompt + response (the context length less the self-evaluation turn's tokens).

    Returns:
        The prompt as a list of ``int`` and the largest ``max_new_tokens`` of ``params``.

    Raises:
        InvalidSamplingError: ``params`` is empty or holds something else than ``SamplingParams``; the
            prompt is empty or holds an id outside the vocabulary.
        PromptTooLongError: The prompt plus the longest row does not fit in ``max_tokens``.

    Example:
        >>> checked_submission([1, 2, 3], [SamplingParams(max_new_tokens=8)], vocab_size=10, max_tokens=64)
        ([1, 2, 3], 8)
        >>> checked_submission([1, 12], [SamplingParams()], vocab_size=10, max_tokens=64)
        Traceback (most recent call last):
        ...
        langchain_capeval.errors.InvalidSamplingError: prompt_ids: token ids must be in [0, 10), got 1..12

    """
    if not params:
        raise InvalidSamplingError("params: give at least one SamplingParams (one per row)")
    if not all(isinstance(p, SamplingParams) for p in params):
        raise InvalidSamplingError("params: every item must be a SamplingParams")
    prompt = [int(t) for t in prompt_ids]
    if not prompt:
        raise InvalidSamplingError("prompt_ids: the prompt is empty")
    if min(prompt) < 0 or max(prompt) >= vocab_size:
        lo, hi = min(prompt), max(prompt)
        raise InvalidSamplingError(f"prompt_ids: token ids must be in [0, {vocab_size}), got {lo}..{hi}")
    longest = max(p.max_new_tokens for p in params)
    if len(prompt) + longest > max_tokens:
        raise PromptTooLongError(len(prompt), longest, max_tokens)
    return prompt, longest


def check_until(until: object) -> None:
    """Check :meth:`Engine.generate`'s ``until``: ``None`` or an integer >= 1.

    Raises:
        InvalidSamplingError: ``until`` is anything else.

    """
    if until is not None and (not isinstance(until, int) or isinstance(until, bool) or until < 1):
        raise InvalidSamplingError(f"until must be an integer >= 1 or None, got {until!r}")


class CancelledRequests:
    """The ids of recently cancelled requests, so that a late ``submit`` for one of them fails.

    A long-running server cancels requests without end, so only the newest ``capacity`` ids
    are kept. Membership tests are safe from any thread (a ``dict`` lookup under the GIL).

    Example:
        >>> cancelled = CancelledRequests(capacity=2)
        >>> for request_id in ("a", "b", "c"):
        ...     cancelled.add(request_id)
        >>> "a" in cancelled, "c" in cancelled, len(cancelled)
        (False, True, 2)
        >>> cancelled.check("c")
        Traceback (most recent call last):
        ...
        langchain_capeval.errors.RequestCancelledError: request 'c' was cancelled

    """

    def __init__(self, capacity: int = 4096) -> None:
        self.capacity = capacity
        self._ids: OrderedDict[str, None] = OrderedDict()

    def add(self, request_id: str) -> None:
        """Remember ``request_id`` as cancelled; forget the oldest past ``capacity``."""
        self._ids[request_id] = None
        self._ids.move_to_end(request_id)
        while len(self._ids) > self.capacity:
            self._ids.popitem(last=False)

    def check(self, request_id: str) -> None:
        """Raise :class:`~langchain_capeval.errors.RequestCancelledError` if ``request_id`` was cancelled."""
        if request_id in self._ids:
            raise RequestCancelledError(f"request {request_id!r} was cancelled")

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._ids

    def __len__(self) -> int:
        return len(self._ids)
