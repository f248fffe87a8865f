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

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol, runtime_checkable

if TYPE_CHECKING:
    from langchain_capeval.chat_format import ChatFormat
    from langchain_capeval.sampling import SamplingParams

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
