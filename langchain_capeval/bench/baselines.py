"""How the baselines score samples: majority-vote answers, the LLM-as-judge rating, self-certainty.

These are what a user would otherwise pick to choose among samples:

- **Majority vote**: the most common extracted answer (numeric kinds only: a free-form fact
  answer has no canonical form to vote on). :func:`answer_key` reads an answer with the same
  rules as the task's checker, so a sample's key equals the task's answer exactly when the
  checker accepts it.
- **LLM-as-judge** (as optillm's best-of-n does it): the same model, in a new chat, rates the
  response 0-10; the highest rating wins. :func:`judge_messages` builds that chat,
  :func:`parse_judge_score` reads the rating (unreadable counts as 0, the lowest).
- **Self-certainty** (Kang et al., 2025): the mean over response tokens of
  KL(uniform || p(. | prefix)); higher is more confident. :func:`self_certainty_from_logits`
  computes it from the next-token logits at the response's positions.

Example:
    >>> from langchain_capeval.tasks.base import Task
    >>> t = Task(id="add1/3+4", family="add1", prompt="What is 3 + 4?", answer="7")
    >>> answer_key(t, "3 + 4 = 7.0"), answer_key(t, "I am not sure.")
    ('7', None)
    >>> parse_judge_score("8/10"), parse_judge_score("Great answer!")
    (8.0, 0.0)

"""

from __future__ import annotations

import math
import re
from decimal import Decimal
from typing import TYPE_CHECKING

from langchain_capeval.tasks.answers import extract_number, larger_claim, numbers
from langchain_capeval.tasks.base import Task, parse_decimal

if TYPE_CHECKING:
    import torch

EXTRACTABLE_KINDS = frozenset({"number", "cot_number", "larger"})
"""Answer kinds whose responses have an extractable answer to vote on."""

JUDGE_INSTRUCTION = (
    "Rate the above response on a scale from 0 to 10, where 0 is poor and 10 is excellent. "
    "Consider factors such as relevance, coherence, and helpfulness. Respond with only a number."
)
"""The rating request of the LLM-as-judge baseline, in the words of optillm's best-of-n."""

_SCORE = re.compile(r"\d+(?:\.\d+)?")


def _canonical(value: Decimal) -> str:
    """``7.0`` -> ``'7'``, ``1E+1`` -> ``'10'``: one spelling per number."""
    return format(value.normalize(), "f")


def answer_key(task: Task, response: str) -> str | None:
    """The answer a response gives, in canonical form, or ``None`` (no answer, or a kind without extraction).

    Uses the checker's own rules (:mod:`langchain_capeval.tasks.answers`), so the key equals
    ``answer_key`` of the task's answer exactly when :func:`~langchain_capeval.tasks.answers.check`
    accepts the response.
    """
    if task.kind not in EXTRACTABLE_KINDS:
        return None
    if task.kind == "larger":
        answer, other = parse_decimal(task.answer), parse_decimal(task.distractors[0])
        assert answer is not None and other is not None  # validated by Task
        found = larger_claim(response, (answer, other))
    else:
        skip = set(numbers(task.prompt)) if task.kind == "number" else set()
        found = extract_number(response, skip=skip)
    return None if found is None else _canonical(found)


def task_answer_key(task: Task) -> str | None:
    """The task's own answer in the form :func:`answer_key` returns; ``None`` for kinds without extraction."""
    if task.kind not in EXTRACTABLE_KINDS:
        return None
    value = parse_decimal(task.answer)
    return None if value is None else _canonical(value)


def judge_messages(task: Task, response: str) -> list[dict[str, str]]:
    """The judge's new chat: the question, the response to rate, and the rating request.

    Example:
        >>> t = Task(id="add1/3+4", family="add1", prompt="What is 3 + 4?", answer="7")
        >>> [m["role"] for m in judge_messages(t, "7")]
        ['user', 'assistant', 'user']

    """
    return [
        {"role": "user", "content": task.prompt},
        {"role": "assistant", "content": response},
        {"role": "user", "content": f"{JUDGE_INSTRUCTION}\n\nRate the above response:"},
    ]


def parse_judge_score(text: str) -> float:
    """The first number in a rating, clipped to [0, 10]; 0 (the lowest) when there is none."""
    found = _SCORE.search(text)
    return min(10.0, float(found.group())) if found else 0.0


def self_certainty_from_logits(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Self-certainty of each row: mean over its real positions of KL(uniform || softmax(logits)).

    KL(U || p) = sum_j (1/V) log((1/V) / p_j) = -log V - mean_j log p_j.

    Args:
        logits: ``[B, T, V]`` next-token logits at the response's positions.
        mask: ``[B, T]`` true where the position predicts a real response token.

    Returns:
        ``[B]`` float32 scores (higher is more confident).

    Example:
        >>> import torch
        >>> flat = self_certainty_from_logits(torch.zeros(1, 2, 4), torch.ones(1, 2, dtype=torch.bool))
        >>> round(float(flat[0]), 6)  # a uniform distribution: no certainty at all
        0.0

    """
    import torch

    logp = torch.log_softmax(logits.float(), dim=-1)
    kl = -math.log(logits.shape[-1]) - logp.mean(dim=-1)  # [B, T]
    m = mask.to(kl.dtype)
    return (kl * m).sum(dim=-1) / m.sum(dim=-1).clamp(min=1.0)
