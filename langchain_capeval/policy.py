"""The method's decisions as plain functions: annealing, batch sizes, budget, accept, prune, best-of-N.

These are what the LangGraph nodes and routers of :mod:`langchain_capeval.graph`
call; they read numbers and return numbers, so they are tested without a graph
or a model.

Example:
    >>> from langchain_capeval.config import CapEvalConfig
    >>> cfg = CapEvalConfig()
    >>> [round(anneal_temperature(k, cfg), 2) for k in range(6)]
    [0.4, 0.5, 0.6, 0.7, 0.8, 0.8]
    >>> prune_survivors([0.2, 0.9, 0.5, 0.7], keep_ratio=0.5)
    [1, 3]
    >>> best_of_n([0.2, 0.9, 0.5])
    1

"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from langchain_capeval.config import CapEvalConfig

StopReason = Literal["threshold_met", "best_of_n", "max_samples", "max_total_tokens", "deadline", "schedule_done"]
"""Why sampling stopped, as reported in ``response_metadata["stop_reason"]``."""


def anneal_temperature(samples_drawn: int, config: CapEvalConfig) -> float:
    """Temperature of the next sample, given how many have been drawn.

    Rises linearly from ``initial_temperature`` (first sample) to ``temperature``
    after ``anneal_samples`` samples: early samples exploit, later ones explore.
    ``best_of_n`` and ``prune`` draw every sample at ``temperature``.
    """
    if config.strategy in ("best_of_n", "prune") or config.anneal_samples == 0:
        return config.temperature
    frac = min(1.0, samples_drawn / config.anneal_samples)
    return config.initial_temperature + frac * (config.temperature - config.initial_temperature)


@dataclass(frozen=True)
class BatchPlan:
    """The next batch: how many samples, how long each may grow, and each one's annealed temperature."""

    size: int
    max_new_tokens: int
    temperatures: tuple[float, ...]


def self_evaluations_per_sample(config: CapEvalConfig, batch_size: int) -> int:
    """Self-evaluations one sample of a batch may receive: one at the end, plus one per pruning checkpoint."""
    prunes = config.strategy in ("prune", "adaptive_prune") and batch_size > 1
    return 1 + (len(config.prune_checkpoints) if prunes else 0)


def plan_next_batch(
    config: CapEvalConfig, *, batches_drawn: int, samples_drawn: int, tokens_spent: int, eval_tokens: int
) -> BatchPlan | None:
    """Size the next batch so that no budget can be exceeded; ``None`` if none can be drawn.

    Args:
        config: The policy.
        batches_drawn: Batches drawn so far for this request.
        samples_drawn: Samples drawn so far.
        tokens_spent: Generated plus self-evaluation tokens so far.
        eval_tokens: Upper bound of the tokens one self-evaluation pushes.

    The token budget is kept by construction: a batch of ``n`` samples of at most
    ``m`` tokens, each self-evaluated ``e`` times, costs at most ``n * (m + e * eval_tokens)``.

    """
    if config.strategy in ("best_of_n", "prune"):
        if batches_drawn > 0:
            return None
        wanted = config.num_samples
    else:
        if batches_drawn >= len(config.batch_schedule):
            return None
        wanted = config.batch_schedule[batches_drawn]
    size = min(wanted, config.max_samples - samples_drawn)
    max_new = config.max_new_tokens
    if config.max_total_tokens is not None:
        left = config.max_total_tokens - tokens_spent
        while size > 0:
            evals = self_evaluations_per_sample(config, size) * eval_tokens
            max_new = min(config.max_new_tokens, left // size - evals)
            if max_new >= 1:
                break
            size -= 1
    if size <= 0 or max_new < 1:
        return None
    temperatures = tuple(anneal_temperature(samples_drawn + i, config) for i in range(size))
    return BatchPlan(size=size, max_new_tokens=max_new, temperatures=temperatures)


def threshold_met(best_score: float | None, config: CapEvalConfig) -> bool:
    """Whether the best P(win or tie) so far clears the accept threshold."""
    return best_score is not None and best_score >= config.accept_threshold


def budget_stop_reason(
    config: CapEvalConfig, *, batches_drawn: int, samples_drawn: int, tokens_spent: int, eval_tokens: int
) -> StopReason | None:
    """Why no further batch may be drawn, or ``None`` if one may."""
    if samples_drawn >= config.max_samples:
        return "max_samples"
    plan = plan_next_batch(
        config,
        batches_drawn=batches_drawn,
        samples_drawn=samples_drawn,
        tokens_spent=tokens_spent,
        eval_tokens=eval_tokens,
    )
    if plan is not None:
        return None
    if config.strategy in ("best_of_n", "prune"):
        return "best_of_n"
    if batches_drawn >= len(config.batch_schedule):
        return "schedule_done"
    return "max_total_tokens"


def same_response_scores(scores: Sequence[float], responses: Sequence[str] | None) -> list[float]:
    """``scores`` with every copy of a response given the score of its earliest copy.

    Two samples with the same text are the same response, but their self-evaluations can differ
    in the last float bits (each was scored in a different batch). Sharing the earliest copy's
    score makes the choice between copies a tie, which every decision here breaks towards the
    earlier sample, whatever the batch. ``responses=None`` leaves the scores as they are.

    Example:
        >>> same_response_scores([0.5, 0.7, 0.7000001], ["4", "5", "5"])
        [0.5, 0.7, 0.7]

    """
    if responses is None:
        return list(scores)
    if len(responses) != len(scores):
        raise ValueError(f"{len(scores)} scores but {len(responses)} responses")
    earliest: dict[str, int] = {}
    return [scores[earliest.setdefault(r, i)] for i, r in enumerate(responses)]


def prune_survivors(scores: Sequence[float], keep_ratio: float, responses: Sequence[str] | None = None) -> list[int]:
    """Indices of the samples kept at a pruning checkpoint: the top ``ceil(n * keep_ratio)`` by score.

    At least one is kept; ties keep the earlier sample; the result is in index order. With
    ``responses`` (the samples' texts so far), copies of one prefix rank as its earliest copy
    (:func:`same_response_scores`).

    Example:
        >>> prune_survivors([0.4, 0.9, 0.9000001, 0.2], keep_ratio=0.25, responses=["a", "b", "b", "c"])
        [1]

    """
    scores = same_response_scores(scores, responses)
    n = len(scores)
    if n == 0:
        return []
    k = max(1, math.ceil(n * keep_ratio - 1e-9))
    order = sorted(range(n), key=lambda i: (-scores[i], i))
    return sorted(order[:k])


def best_of_n(scores: Sequence[float], responses: Sequence[str] | None = None) -> int:
    """Index of the sample with the highest self-evaluation (the earliest on ties).

    With ``responses``, copies of one response rank as its earliest copy
    (:func:`same_response_scores`), so the earliest copy is returned.

    Example:
        >>> best_of_n([0.3, 0.8, 0.8000001], responses=["x", "y", "y"])
        1

    """
    if not scores:
        raise ValueError("best_of_n needs at least one score")
    scores = same_response_scores(scores, responses)
    return max(range(len(scores)), key=lambda i: (scores[i], -i))
