"""The benchmark's numbers: accuracy with bootstrap intervals, cost, gain fraction, savings, the oracle floor.

Per strategy and setting (a :class:`~langchain_capeval.bench.replay.StrategyRun`), over the
prompts it applies to:

- accuracy, with a seeded percentile-bootstrap 95% interval over prompts;
- average samples, generated tokens and evaluation tokens per prompt;
- the fraction of the best-of-N gain reached: (accuracy - pass@1) / (best-of-N - pass@1), with
  N the pool size, best-of-N selected by self-evaluation and pass@1 a single sample at T;
- for pruning, the tokens saved against best-of-N and the accuracy change (with a paired
  bootstrap interval); for adaptive+pruning, the same against adaptive at that threshold;
- the floor: with samples drawn on the adaptive schedule, a prompt can only be answered right
  once a batch with a right sample has been drawn, and every prompt costs at least the first
  batch. :func:`oracle_floor` gives, for each accuracy, the fewest average samples any
  stopping rule needs (an oracle that stops at the first right batch and gives up at once
  where no batch is right); :func:`floor_samples` reads it at a strategy's accuracy.

Example:
    >>> low, high = bootstrap_ci([1, 0, 1, 1, 0, 1, 1, 1], iterations=500, seed=0)
    >>> low < 0.75 < high
    True
    >>> gain_fraction(0.75, pass_at_1=0.5, best=1.0)
    0.5
    >>> oracle_floor([1, 4, None, 2], first_batch=1)
    [(0.0, 1.0), (0.25, 1.0), (0.5, 1.25), (0.75, 2.0)]

"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

from langchain_capeval.bench.config import BenchConfig
from langchain_capeval.bench.records import Outcome, PromptPool
from langchain_capeval.bench.replay import StrategyRun, first_correct_draw, graph_policy, schedule_sizes

FLOOR_OF = {"adaptive": "annealed", "adaptive_prune": "annealed", "adaptive_fixed_t": "fixed_t"}
"""Which schedule's oracle floor bounds each adaptive strategy."""


def bootstrap_ci(values: Sequence[float], iterations: int, seed: int, level: float = 0.95) -> tuple[float, float]:
    """Percentile-bootstrap interval of the mean of ``values``, resampling them (prompts) with replacement.

    The same ``seed`` and number of values give the same resamples, so intervals of strategies
    over the same prompts are paired.
    """
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        raise ValueError("bootstrap_ci needs at least one value")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(iterations, x.size))].mean(axis=1)
    tail = (1.0 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def paired_difference(a: Sequence[float], b: Sequence[float], iterations: int, seed: int) -> tuple[float, float, float]:
    """Mean of ``a - b`` over prompts, with its paired bootstrap 95% interval: (difference, low, high).

    Example:
        >>> paired_difference([1, 1, 0, 1], [1, 0, 0, 1], iterations=200, seed=0)[0]
        0.25

    """
    if len(a) != len(b):
        raise ValueError(f"paired_difference needs one value per prompt on both sides, got {len(a)} and {len(b)}")
    d = [x - y for x, y in zip(a, b, strict=True)]
    low, high = bootstrap_ci(d, iterations, seed)
    return sum(d) / len(d), low, high


def gain_fraction(accuracy: float, pass_at_1: float, best: float) -> float | None:
    """(accuracy - pass@1) / (best - pass@1); ``None`` when best-of-N gains nothing over one sample."""
    gain = best - pass_at_1
    return (accuracy - pass_at_1) / gain if gain > 1e-12 else None


def oracle_floor(first_correct: Sequence[int | None], first_batch: int) -> list[tuple[float, float]]:
    """The fewest average samples that reach each accuracy, drawing on a schedule: (accuracy, samples) points.

    Args:
        first_correct: Per prompt, the samples drawn through the first batch holding a right
            sample (``None``: no batch does).
        first_batch: Size of the first batch (what a prompt given up on still costs).

    Returns:
        For k = 0 .. the number of prompts some batch answers: accuracy k / n and the average
        samples when the k prompts answered are those cheapest to answer.

    """
    n = len(first_correct)
    if n == 0:
        return []
    extra = sorted(c - first_batch for c in first_correct if c is not None)
    points = [(0.0, float(first_batch))]
    spent = 0
    for k, e in enumerate(extra, 1):
        spent += e
        points.append((k / n, first_batch + spent / n))
    return points


def floor_samples(curve: Sequence[tuple[float, float]], accuracy: float) -> float | None:
    """The floor's average samples at ``accuracy`` (the first point reaching it); ``None`` beyond the ceiling.

    Example:
        >>> floor_samples([(0.0, 1.0), (0.5, 1.25), (1.0, 2.0)], 0.6)
        2.0

    """
    return next((s for a, s in curve if a >= accuracy - 1e-9), None)


def _r(x: float | None, digits: int = 4) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else round(float(x), digits)


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs)


def summarize_runs(runs: Sequence[StrategyRun], pools: Sequence[PromptPool], config: BenchConfig) -> dict[str, Any]:
    """Every strategy point's numbers, the references (pass@1, best-of-N) and the oracle floors.

    Returns:
        ``{"reference": ..., "floor": {"annealed": [...], "fixed_t": [...]}, "points": [...],
        "unavailable": {strategy: reason}}``.

    """
    by_label = {r.label: r for r in runs}
    sample_run = by_label["sample"]
    best_run = by_label[f"best_of_n_selfeval/n={config.pool_size}"]
    iters, seed = config.bootstrap_iterations, config.seed
    sizes = {
        "annealed": schedule_sizes(graph_policy(config, "adaptive")),
        "fixed_t": schedule_sizes(graph_policy(config, "adaptive", anneal=False)),
    }
    floors = {
        name: oracle_floor([first_correct_draw(p.annealed if name == "annealed" else p.fixed, s) for p in pools], s[0])
        for name, s in sizes.items()
    }
    points: list[dict[str, Any]] = []
    unavailable: dict[str, str] = {}
    for run in runs:
        idx = [i for i, o in enumerate(run.outcomes) if o is not None]
        if not idx:
            unavailable[run.strategy] = _why_unavailable(run.strategy)
            continue
        outs = [run.outcomes[i] for i in idx]
        assert all(o is not None for o in outs)
        got: list[Outcome] = [o for o in outs if o is not None]
        correct = [o.correct for o in got]
        accuracy = _mean(correct)
        low, high = bootstrap_ci(correct, iters, seed)
        pass_1 = _mean([_outcome(sample_run, i).correct for i in idx])
        best = _mean([_outcome(best_run, i).correct for i in idx])
        point: dict[str, Any] = {
            "label": run.label,
            "strategy": run.strategy,
            "params": run.params,
            "prompts": len(idx),
            "accuracy": _r(accuracy),
            "ci_low": _r(low),
            "ci_high": _r(high),
            "avg_samples": _r(_mean([o.samples for o in got])),
            "avg_generated_tokens": _r(_mean([o.generated_tokens for o in got]), 2),
            "avg_eval_tokens": _r(_mean([o.eval_tokens for o in got]), 2),
            "avg_tokens": _r(_mean([o.total_tokens for o in got]), 2),
            "gain_fraction": _r(gain_fraction(accuracy, pass_1, best)),
        }
        if len(idx) < len(pools):
            point["note"] = f"over the {len(idx)} of {len(pools)} prompts it applies to"
        if run.strategy in FLOOR_OF and len(idx) == len(pools):
            point["floor_samples"] = _r(floor_samples(floors[FLOOR_OF[run.strategy]], accuracy))
        reasons = Counter(o.stop_reason for o in got if o.stop_reason is not None)
        if reasons:
            point["stop_reasons"] = dict(sorted(reasons.items()))
        reference = _savings_reference(run, by_label, config)
        if reference is not None:
            point.update(_savings(got, [_outcome(reference, i) for i in idx], iters, seed, reference.label))
        points.append(point)
    return {
        "reference": {
            "pass_at_1": _r(_mean([o.correct for o in sample_run.outcomes if o is not None])),
            "best_of_n": _r(_mean([o.correct for o in best_run.outcomes if o is not None])),
            "n": config.pool_size,
        },
        "floor": {k: [{"accuracy": _r(a), "avg_samples": _r(s)} for a, s in v] for k, v in floors.items()},
        "points": points,
        "unavailable": unavailable,
    }


def _outcome(run: StrategyRun, i: int) -> Outcome:
    o = run.outcomes[i]
    if o is None:
        raise ValueError(f"{run.label} has no outcome for prompt {i}")
    return o


def _why_unavailable(strategy: str) -> str:
    return {
        "best_of_n_self_certainty": "self-certainty needs full next-token distributions: the transformers engine",
        "best_of_n_judge": "judge ratings were not collected (judge=false)",
        "majority_vote": "no prompt has an extractable answer (fact families only)",
    }.get(strategy, "no prompt")


def _savings_reference(run: StrategyRun, by_label: dict[str, StrategyRun], config: BenchConfig) -> StrategyRun | None:
    """What pruning is measured against: best-of-N for ``prune``, adaptive at that threshold for ``adaptive_prune``."""
    if run.strategy == "prune":
        return by_label[f"best_of_n_selfeval/n={config.pool_size}"]
    if run.strategy == "adaptive_prune":
        return by_label[f"adaptive/threshold={run.params['threshold']}"]
    return None


def _savings(
    got: Sequence[Outcome], ref: Sequence[Outcome], iters: int, seed: int, label: str
) -> dict[str, float | str | None]:
    total, total_ref = _mean([o.total_tokens for o in got]), _mean([o.total_tokens for o in ref])
    gen, gen_ref = _mean([o.generated_tokens for o in got]), _mean([o.generated_tokens for o in ref])
    diff, low, high = paired_difference([o.correct for o in got], [o.correct for o in ref], iters, seed)
    return {
        "compared_with": label,
        "tokens_saved": _r(1 - total / total_ref if total_ref else None),
        "generated_tokens_saved": _r(1 - gen / gen_ref if gen_ref else None),
        "accuracy_change": _r(diff),
        "accuracy_change_ci_low": _r(low),
        "accuracy_change_ci_high": _r(high),
    }
