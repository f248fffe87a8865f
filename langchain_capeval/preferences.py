"""Pairwise preferences with ties, and the win-or-tie targets they give.

The paper labels on-policy samples of one prompt by pairwise preference *with
ties*: two samples whose rewards differ by at most ``epsilon`` tie, since samples
of the same model are often equally good. The self-evaluation target of a
sample is its win-or-tie probability: the fraction of the *other* samples of its
prompt that it beats or ties. Train "No" with that probability, "Yes" with the rest.

With a verifiable 0/1 reward and ``epsilon < 1``, a correct sample gets 1.0 and a
wrong one gets the share of the other samples that are wrong too: on a prompt no
sample solves, every target is 1.0 (sampling more would not help).

Example:
    >>> from langchain_capeval.preferences import win_or_tie_targets, pairwise_preferences, tie_rate
    >>> win_or_tie_targets([1.0, 0.0, 0.0, 1.0], epsilon=0.0)
    [1.0, 0.3333333333333333, 0.3333333333333333, 1.0]
    >>> pairwise_preferences([0.50, 0.52, 0.9], epsilon=0.05)
    [(0, 1, 'tie'), (0, 2, 'loss'), (1, 2, 'loss')]
    >>> tie_rate([0.50, 0.52, 0.9], epsilon=0.05)
    0.3333333333333333

"""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Real
from typing import Literal

from langchain_capeval.errors import InvalidRewardError

Outcome = Literal["win", "loss", "tie"]
"""The result of sample ``i`` against sample ``j``, from ``i``'s side."""


def _checked(rewards: Sequence[float], epsilon: float) -> list[float]:
    """Validate rewards (finite reals) and epsilon (finite, >= 0); return rewards as floats."""
    if isinstance(epsilon, bool) or not isinstance(epsilon, Real) or not math.isfinite(epsilon) or epsilon < 0:
        raise InvalidRewardError(f"epsilon must be a finite number >= 0, got {epsilon!r}")
    if isinstance(rewards, str) or not isinstance(rewards, Sequence):
        raise InvalidRewardError(f"rewards must be a sequence of numbers, got {type(rewards).__name__}")
    out: list[float] = []
    for i, r in enumerate(rewards):
        if isinstance(r, bool) or not isinstance(r, Real) or not math.isfinite(r):
            raise InvalidRewardError(f"rewards[{i}] must be a finite number, got {r!r}")
        out.append(float(r))
    return out


def outcome(reward_i: float, reward_j: float, epsilon: float) -> Outcome:
    """Compare two rewards: a gap of at most ``epsilon`` is a tie.

    Example:
        >>> outcome(0.7, 0.5, 0.1), outcome(0.5, 0.7, 0.1), outcome(0.5, 0.55, 0.1)
        ('win', 'loss', 'tie')

    """
    if abs(reward_i - reward_j) <= epsilon:
        return "tie"
    return "win" if reward_i > reward_j else "loss"


def pairwise_preferences(rewards: Sequence[float], epsilon: float) -> list[tuple[int, int, Outcome]]:
    """Return ``(i, j, outcome of i against j)`` for every pair ``i < j``.

    Args:
        rewards: Rewards of the samples of one prompt.
        epsilon: Largest reward gap that counts as a tie (>= 0).

    Raises:
        InvalidRewardError: A reward is not a finite number, or ``epsilon`` is
            negative or not finite.

    """
    values = _checked(rewards, epsilon)
    n = len(values)
    return [(i, j, outcome(values[i], values[j], epsilon)) for i in range(n) for j in range(i + 1, n)]


def win_or_tie_targets(rewards: Sequence[float], epsilon: float) -> list[float]:
    """Return, per sample, the fraction of the other samples it beats or ties.

    A single sample has no rival and gets 1.0 (nothing sampled would beat it).

    Args:
        rewards: Rewards of the samples of one prompt.
        epsilon: Largest reward gap that counts as a tie (>= 0).

    Returns:
        One target in [0, 1] per sample, in order.

    Raises:
        InvalidRewardError: As :func:`pairwise_preferences`.

    Example:
        >>> win_or_tie_targets([0.2, 0.25, 0.9], epsilon=0.1)
        [0.5, 0.5, 1.0]
        >>> win_or_tie_targets([3.0], epsilon=0.0)
        [1.0]

    """
    values = _checked(rewards, epsilon)
    n = len(values)
    if n == 1:
        return [1.0]
    return [
        sum(1 for j in range(n) if j != i and outcome(values[i], values[j], epsilon) != "loss") / (n - 1)
        for i in range(n)
    ]


def tie_rate(rewards: Sequence[float], epsilon: float) -> float:
    """Return the fraction of sample pairs that tie; 0.0 with fewer than two samples.

    Raises:
        InvalidRewardError: As :func:`pairwise_preferences`.

    """
    pairs = pairwise_preferences(rewards, epsilon)
    if not pairs:
        return 0.0
    return sum(1 for *_, result in pairs if result == "tie") / len(pairs)
