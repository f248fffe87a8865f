"""Tasks, task families and train/dev/test splits.

A :class:`Task` is one prompt with a canonical answer and everything its checker
needs (the answer kind, accepted aliases, competing candidates), so a task can be
checked on its own, without a registry. A :class:`TaskFamily` enumerates a fixed
pool of tasks by index; sampling a family is sampling indices with a seeded
generator, which makes every suite reproducible from its seed. :class:`Splits`
holds the disjoint train/dev/test tuples that a suite builder returns.

Example:
    >>> from langchain_capeval.tasks.base import Task
    >>> t = Task(id="add1/3+4", family="add1", prompt="What is 3 + 4?", answer="7")
    >>> t.messages()
    [{'role': 'user', 'content': 'What is 3 + 4?'}]
    >>> Task(id="x", family="add1", prompt="What is 3 + 4?", answer="seven")
    Traceback (most recent call last):
    ...
    langchain_capeval.errors.InvalidTaskError: task 'x': answer must be a number for kind 'number', got 'seven'

"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Literal, get_args

from langchain_capeval.errors import InvalidTaskError

AnswerKind = Literal["number", "cot_number", "fact", "larger"]
"""How a task's answer is read from a response (see :mod:`langchain_capeval.tasks.answers`).

- ``"number"``: a short numeric answer (arithmetic, next number).
- ``"cot_number"``: a numeric answer at the end of a chain of thought (GSM8K).
- ``"fact"``: a word or name, matched as a whole word, with aliases and competing candidates.
- ``"larger"``: the larger of two numbers named in the prompt.
"""

ANSWER_KINDS: tuple[str, ...] = get_args(AnswerKind)
"""The valid values of :data:`AnswerKind`."""

NUMERIC_KINDS: frozenset[str] = frozenset({"number", "cot_number", "larger"})
"""Kinds whose canonical answer (and distractors) must parse as numbers."""


def parse_decimal(text: str) -> Decimal | None:
    """Parse a plain number such as ``"-1,234.50"`` or ``"$7"``; ``None`` if it is not one."""
    cleaned = text.strip().replace(",", "").replace("$", "").replace("\u2212", "-")
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return None
    return value if value.is_finite() else None


def _strings(task_id: str, name: str, values: object) -> tuple[str, ...]:
    """Validate a sequence of non-empty strings and return it as a tuple."""
    if isinstance(values, str) or not isinstance(values, Sequence):
        raise InvalidTaskError(f"task {task_id!r}: {name} must be a sequence of strings, got {values!r}")
    out = tuple(values)
    if not all(isinstance(v, str) and v.strip() for v in out):
        raise InvalidTaskError(f"task {task_id!r}: {name} must hold non-empty strings, got {out!r}")
    return out


@dataclass(frozen=True)
class Task:
    """One prompt with a canonical answer, checkable on its own.

    Attributes:
        id: Stable identifier, ``"<family>/<key>"``; the same item has the same id
            whatever the seed.
        family: Name of the family the task belongs to.
        prompt: The user message text.
        answer: The canonical answer (a number written without commas for the
            numeric kinds).
        kind: How the answer is read from a response; see :data:`AnswerKind`.
        aliases: Other accepted spellings of the answer (``"fact"`` kind).
        distractors: Competing candidate answers: naming one of them makes a
            ``"fact"`` response wrong; for ``"larger"`` it holds the other number.

    Example:
        >>> t = Task(id="capitals/france", family="capitals", prompt="What is the capital of France?",
        ...          answer="Paris", kind="fact", distractors=("Rome", "Berlin"))
        >>> t.kind, t.distractors
        ('fact', ('Rome', 'Berlin'))

    """

    id: str
    family: str
    prompt: str
    answer: str
    kind: AnswerKind = "number"
    aliases: tuple[str, ...] = ()
    distractors: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("id", "family", "prompt", "answer"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise InvalidTaskError(f"task {self.id!r}: {name} must be a non-empty string, got {value!r}")
        if self.kind not in ANSWER_KINDS:
            raise InvalidTaskError(f"task {self.id!r}: kind must be one of {ANSWER_KINDS}, got {self.kind!r}")
        object.__setattr__(self, "aliases", _strings(self.id, "aliases", self.aliases))
        object.__setattr__(self, "distractors", _strings(self.id, "distractors", self.distractors))
        if self.kind in NUMERIC_KINDS:
            for value in (self.answer, *self.distractors):
                if parse_decimal(value) is None:
                    raise InvalidTaskError(
                        f"task {self.id!r}: answer must be a number for kind {self.kind!r}, got {value!r}"
                    )
        if self.kind == "larger" and (
            len(self.distractors) != 1 or parse_decimal(self.distractors[0]) == parse_decimal(self.answer)
        ):
            raise InvalidTaskError(
                f"task {self.id!r}: kind 'larger' needs exactly one distractor (the smaller number) "
                f"different from the answer, got {self.distractors!r}"
            )

    def messages(self) -> list[dict[str, str]]:
        """Return the prompt as a one-turn chat: ``[{"role": "user", "content": prompt}]``."""
        return [{"role": "user", "content": self.prompt}]


@dataclass(frozen=True)
class TaskFamily:
    """A fixed, enumerable pool of tasks of one kind.

    The pool is never materialised: ``make(i)`` builds the ``i``-th task of the
    canonical enumeration, so families with thousands of items cost nothing
    until sampled.

    Attributes:
        name: Registry name, also the ``family`` of every task it makes.
        description: One line saying what the family asks.
        size: Number of distinct tasks (distinct prompts) in the pool.
        make: Builds the task at a pool index in ``[0, size)``.

    Example:
        >>> fam = TaskFamily("twice", "Doubling.", 10,
        ...                  lambda i: Task(f"twice/{i}", "twice", f"What is 2 * {i}?", str(2 * i)))
        >>> [t.answer for t in fam.sample(3, seed=0)]
        ['10', '16', '8']

    """

    name: str
    description: str
    size: int
    make: Callable[[int], Task]

    def __post_init__(self) -> None:
        if not isinstance(self.size, int) or isinstance(self.size, bool) or self.size < 1:
            raise InvalidTaskError(f"family {self.name!r}: size must be an integer >= 1, got {self.size!r}")

    def task(self, index: int) -> Task:
        """Return the task at ``index`` of the canonical enumeration."""
        if not 0 <= index < self.size:
            raise InvalidTaskError(f"family {self.name!r}: index must be in [0, {self.size}), got {index}")
        return self.make(index)

    def sample(self, n: int, seed: int = 0) -> list[Task]:
        """Return ``min(n, size)`` distinct tasks in a seeded random order."""
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise InvalidTaskError(f"family {self.name!r}: n must be an integer >= 0, got {n!r}")
        rng = random.Random(f"{seed}:{self.name}")
        return [self.task(i) for i in rng.sample(range(self.size), min(n, self.size))]


@dataclass(frozen=True)
class Splits:
    """Disjoint train/dev/test task tuples.

    Attributes:
        train: Tasks to build training data from.
        dev: Tasks to tune thresholds and schedules on.
        test: Held-out tasks to report.

    Example:
        >>> t = Task(id="a/1", family="a", prompt="What is 1 + 1?", answer="2")
        >>> s = Splits(train=(t,), dev=(), test=())
        >>> s.sizes()
        {'train': 1, 'dev': 0, 'test': 0}

    """

    train: tuple[Task, ...]
    dev: tuple[Task, ...]
    test: tuple[Task, ...]

    def __post_init__(self) -> None:
        seen: dict[str, str] = {}
        for split_name, tasks in self.items():
            for task in tasks:
                other = seen.setdefault(task.prompt, split_name)
                if other != split_name:
                    raise InvalidTaskError(
                        f"splits are not disjoint: prompt {task.prompt!r} is in both {other} and {split_name}"
                    )

    def items(self) -> Iterator[tuple[str, tuple[Task, ...]]]:
        """Yield ``(split name, tasks)`` for train, dev and test, in that order."""
        yield "train", self.train
        yield "dev", self.dev
        yield "test", self.test

    def sizes(self) -> dict[str, int]:
        """Return the number of tasks in each split."""
        return {name: len(tasks) for name, tasks in self.items()}

    def by_family(self, split: Literal["train", "dev", "test"]) -> dict[str, list[Task]]:
        """Group one split's tasks by family, keeping their order."""
        groups: dict[str, list[Task]] = {}
        for task in getattr(self, split):
            groups.setdefault(task.family, []).append(task)
        return groups
