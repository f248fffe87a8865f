"""Task suites with checkable answers, for preference data and benchmarks.

- :mod:`~langchain_capeval.tasks.base`: :class:`Task`, :class:`TaskFamily`, :class:`Splits`.
- :mod:`~langchain_capeval.tasks.answers`: reading answers out of free-form responses
  (:func:`check`, :func:`extract_number`).
- :mod:`~langchain_capeval.tasks.synthetic`: a seeded suite of short questions sized to a
  small model (:data:`FAMILIES`, :func:`build_suite`).
- :mod:`~langchain_capeval.tasks.gsm8k`: GSM8K from the shared data folder (:func:`load_gsm8k`).

Example:
    >>> from langchain_capeval.tasks import build_suite, check
    >>> task = build_suite(["add1"], n_per_family=12, seed=0).test[0]
    >>> check(task, f"The answer is {task.answer}."), check(task, "The answer is 100.")
    (True, False)

"""

from __future__ import annotations

from langchain_capeval.tasks.answers import check, extract_number
from langchain_capeval.tasks.base import AnswerKind, Splits, Task, TaskFamily
from langchain_capeval.tasks.gsm8k import find_gsm8k_dir, load_gsm8k
from langchain_capeval.tasks.synthetic import FAMILIES, build_suite, get_family

__all__ = [
    "FAMILIES",
    "AnswerKind",
    "Splits",
    "Task",
    "TaskFamily",
    "build_suite",
    "check",
    "extract_number",
    "find_gsm8k_dir",
    "get_family",
    "load_gsm8k",
]
