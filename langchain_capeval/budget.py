"""A compute budget shared by a session of several ChatCapEval calls.

:class:`CapEvalConfig` budgets one request (``max_samples``, ``max_total_tokens``,
``deadline_s``). A :class:`SessionBudget` spreads one such budget over a list of
questions: each question gets its :class:`Allowance`, an equal share of what is
left for the questions still to come, and is then charged what it really spent.
A question that stops early (its first sample already good enough) leaves its
savings in the pool, so later questions get more. No allowance is ever more
than what is left.

Tokens are counted as ``CapEvalConfig.max_total_tokens`` counts them: generated plus
self-evaluation tokens (``response_metadata["compute"]``). Samples are
``response_metadata["samples_used"]``. The deadline is wall time, from the first
allowance on. The budget is thread-safe: an allowance handed out and not yet
charged is reserved, so questions answered concurrently cannot overspend.

Example:
    >>> from langchain_capeval.budget import SessionBudget
    >>> budget = SessionBudget(questions=3, max_total_tokens=600, max_samples=6)
    >>> first = budget.allow()
    >>> first.max_total_tokens, first.max_samples
    (200, 2)
    >>> first.overrides()
    {'max_samples': 2, 'max_total_tokens': 200}
    >>> spent = budget.charge(first, {"compute": {"generated_tokens": 30, "self_eval_tokens": 30}, "samples_used": 1})
    >>> spent.tokens, budget.tokens_left
    (60, 540)
    >>> budget.allow().max_total_tokens  # the 140 tokens the first question saved, shared by the two left
    270

With a chain whose chat model is a ChatCapEval, pass the allowance as per-call
overrides (``chain.invoke(x, config={"configurable": allowance.overrides()})``, or
``llm.bind(**allowance.overrides())``) and charge the returned message.

"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from langchain_core.messages import BaseMessage
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from langchain_capeval.errors import CapEvalError


class BudgetExhaustedError(CapEvalError):
    """The session budget has nothing left for another question; the message names what ran out."""


@dataclass(frozen=True)
class Allowance:
    """One question's share of a session budget: per-call budget fields of :class:`CapEvalConfig`.

    ``None`` leaves that budget to the model's own policy.
    """

    number: int
    """Which question this allowance is for (0-based, in the order they were handed out)."""
    max_samples: int | None
    """Most samples the question may draw."""
    max_total_tokens: int | None
    """Most generated plus self-evaluation tokens the question may spend."""
    deadline_s: float | None
    """Seconds after which the question's sampling stops."""

    def overrides(self) -> dict[str, Any]:
        """The allowance as per-call overrides, for ``.bind(**...)`` or ``configurable``."""
        fields = {
            "max_samples": self.max_samples,
            "max_total_tokens": self.max_total_tokens,
            "deadline_s": self.deadline_s,
        }
        return {k: v for k, v in fields.items() if v is not None}


@dataclass(frozen=True)
class Spent:
    """What one answered question was charged."""

    tokens: int
    """Generated plus self-evaluation tokens."""
    samples: int
    """Samples drawn."""


@dataclass
class _Ledger:
    """The mutable side of a session budget (guarded by the budget's lock)."""

    tokens: int = 0
    samples: int = 0
    given: int = 0
    started_at: float | None = None
    outstanding: dict[int, Allowance] = field(default_factory=dict)


class SessionBudget(BaseModel):
    """A budget of samples, tokens and seconds shared by ``questions`` ChatCapEval calls.

    Call :meth:`allow` before each question and :meth:`charge` with its answer. Each
    allowance is an equal share of what is left (less what is reserved by questions
    still running) over the questions not yet started, so savings carry forward.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True, use_attribute_docstrings=True)

    questions: int = Field(ge=1)
    """How many questions share the budget."""
    max_total_tokens: int | None = Field(default=None, ge=1)
    """Budget: generated plus self-evaluation tokens for the whole session; ``None``: no limit."""
    max_samples: int | None = Field(default=None, ge=1)
    """Budget: samples for the whole session; ``None``: no limit."""
    deadline_s: float | None = Field(default=None, gt=0.0)
    """Budget: wall-clock seconds for the whole session, from the first allowance; ``None``: no limit."""
    clock: Callable[[], float] = Field(default=time.monotonic, exclude=True, repr=False)
    """Source of the time (seconds); tests pass a fake one."""

    _lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)
    _ledger: _Ledger = PrivateAttr(default_factory=_Ledger)

    # -- what is left ---------------------------------------------------------------------------

    @property
    def tokens_spent(self) -> int:
        """Tokens charged so far."""
        return self._ledger.tokens

    @property
    def samples_spent(self) -> int:
        """Samples charged so far."""
        return self._ledger.samples

    @property
    def tokens_left(self) -> int | None:
        """Tokens not yet charged (``None``: no token budget)."""
        return None if self.max_total_tokens is None else self.max_total_tokens - self._ledger.tokens

    @property
    def samples_left(self) -> int | None:
        """Samples not yet charged (``None``: no sample budget)."""
        return None if self.max_samples is None else self.max_samples - self._ledger.samples

    @property
    def seconds_left(self) -> float | None:
        """Seconds before the session deadline (``None``: no deadline)."""
        if self.deadline_s is None:
            return None
        started = self._ledger.started_at
        return self.deadline_s if started is None else self.deadline_s - (self.clock() - started)

    @property
    def questions_left(self) -> int:
        """Questions that have not had their allowance yet."""
        return self.questions - self._ledger.given

    # -- allow and charge ------------------------------------------------------------------------

    def allow(self) -> Allowance:
        """Reserve and return the next question's allowance.

        Raises:
            BudgetExhaustedError: Every question had its allowance, or a budget has nothing left.

        """
        with self._lock:
            ledger = self._ledger
            waiting = self.questions - ledger.given
            if waiting <= 0:
                raise BudgetExhaustedError(
                    f"questions: all {self.questions} questions have had their allowance; "
                    "create the SessionBudget with more questions"
                )
            if ledger.started_at is None:
                ledger.started_at = self.clock()
            reserved = list(ledger.outstanding.values())
            tokens = _share(
                "max_total_tokens", self.tokens_left, sum(a.max_total_tokens or 0 for a in reserved), waiting
            )
            samples = _share("max_samples", self.samples_left, sum(a.max_samples or 0 for a in reserved), waiting)
            seconds = self.seconds_left
            if seconds is not None and seconds <= 0:
                raise BudgetExhaustedError(f"deadline_s: the session's {self.deadline_s}s have passed")
            allowance = Allowance(
                number=ledger.given,
                max_samples=samples,
                max_total_tokens=tokens,
                deadline_s=None if seconds is None else seconds / waiting,
            )
            ledger.given += 1
            ledger.outstanding[allowance.number] = allowance
            return allowance

    def charge(self, allowance: Allowance, answer: BaseMessage | Mapping[str, Any]) -> Spent:
        """Charge what the answer to ``allowance``'s question spent, and release its reservation.

        Args:
            allowance: The allowance the question was answered under.
            answer: ChatCapEval's message, or its ``response_metadata``.

        Raises:
            ValueError: The answer carries no ChatCapEval compute metadata, or the allowance
                was already charged or is from another budget.

        """
        metadata = answer.response_metadata if isinstance(answer, BaseMessage) else answer
        compute = metadata.get("compute")
        if not isinstance(compute, Mapping) or "samples_used" not in metadata:
            raise ValueError(
                "answer: no response_metadata['compute'] and ['samples_used']; charge the message ChatCapEval returned"
            )
        spent = Spent(
            tokens=int(compute.get("generated_tokens", 0)) + int(compute.get("self_eval_tokens", 0)),
            samples=int(metadata["samples_used"]),
        )
        with self._lock:
            if self._ledger.outstanding.get(allowance.number) != allowance:
                raise ValueError(f"allowance: question {allowance.number} is not awaiting a charge from this budget")
            del self._ledger.outstanding[allowance.number]
            self._ledger.tokens += spent.tokens
            self._ledger.samples += spent.samples
        return spent


def _share(name: str, left: int | None, reserved: int, waiting: int) -> int | None:
    """An equal share of ``left - reserved`` over ``waiting`` questions (at least 1), or ``None`` if unlimited."""
    if left is None:
        return None
    available = left - reserved
    if available < 1:
        raise BudgetExhaustedError(
            f"{name}: the session budget is spent ({left} left, {reserved} reserved by questions still running)"
        )
    return max(1, available // waiting)


__all__ = ["Allowance", "BudgetExhaustedError", "SessionBudget", "Spent"]
