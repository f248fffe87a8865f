"""Strategies replayed exactly over recorded sample pools, with the graph's own decision functions.

Why the replay is exact: every sample the graph draws for a prompt is an independent draw
with its own seeded random stream, at the temperature :func:`~langchain_capeval.policy.anneal_temperature`
gives its position; the recorded pools hold exactly those draws (the fixed pool at T, the
annealed pool at the annealed temperatures), each with its self-evaluation at every checkpoint
and at the end. :func:`replay_graph` then walks the graph's state machine over a pool, calling
the functions the graph calls (:func:`~langchain_capeval.graph.next_batch`,
:func:`~langchain_capeval.graph.pause_checkpoint`, :func:`~langchain_capeval.graph.route_after_self_evaluation`,
:func:`~langchain_capeval.graph.stop_reason`, :func:`~langchain_capeval.graph.pruning_survivors`,
:func:`~langchain_capeval.graph.best_scored`) on the same kind of state, node by node:

- *generate*: continue the samples still generating to the next checkpoint (when the batch of
  a pruning strategy has more than one), or draw the next planned batch;
- *self_evaluate*: score every unpruned sample whose score is not for its current length; a
  checkpoint costs ``eval_tokens`` tokens, a finished sample its final self-evaluation's;
- *prune*: keep the top ``keep_ratio`` of the samples still generating; the dropped ones cost
  the tokens they held;
- *accept*: the best-scored finished, unpruned sample.

The answer, the samples drawn and the tokens spent are then those of a live run on the same
seeds (the live runs of :mod:`langchain_capeval.bench.live` check it).

Baselines that are not graph strategies (greedy, single sample, oracle, judge, self-certainty
and majority vote over the first N samples, oracle stopping) are plain functions of the pool.

Example:
    >>> from langchain_capeval.bench.records import PoolSample
    >>> from langchain_capeval.config import CapEvalConfig
    >>> pool = [PoolSample(index=i, temperature=0.8, seed=i, text=t, num_tokens=10, finish_reason="eos",
    ...                    correct=t == "7", p_final=p, final_eval_tokens=27)
    ...         for i, (t, p) in enumerate([("6", 0.3), ("7", 0.9)])]
    >>> policy = CapEvalConfig(strategy="best_of_n", num_samples=2, max_new_tokens=48)
    >>> replay_graph(pool, policy, eval_tokens=28, checkpoints=(8,), max_new_tokens=48)
    Outcome(correct=1.0, samples=2, generated_tokens=20, eval_tokens=54, pick=1, stop_reason='best_of_n')

"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, cast

from langchain_capeval.bench.baselines import EXTRACTABLE_KINDS
from langchain_capeval.bench.config import BenchConfig
from langchain_capeval.bench.records import Outcome, PoolSample, PromptPool
from langchain_capeval.config import CapEvalConfig
from langchain_capeval.graph import (  # the graph's own helpers: the replay must see state as the graph does
    CapEvalState,
    SampleRecord,
    active_samples,
    best_scored,
    merge_samples,
    new_sample,
    next_batch,
    pause_checkpoint,
    pruning_survivors,
    route_after_self_evaluation,
    stop_reason,
)
from langchain_capeval.policy import best_of_n, plan_next_batch

# -- the graph's policies -----------------------------------------------------------------------


def graph_policy(
    config: BenchConfig,
    strategy: str,
    *,
    num_samples: int | None = None,
    threshold: float | None = None,
    checkpoint: int | None = None,
    keep_ratio: float | None = None,
    anneal: bool = True,
) -> CapEvalConfig:
    """The :class:`CapEvalConfig` the graph runs a strategy with (the replay and the live runs share it).

    Args:
        config: The benchmark's settings (temperatures, schedule, pool size, ``max_new_tokens``).
        strategy: ``best_of_n``, ``prune``, ``adaptive`` or ``adaptive_prune``.
        num_samples: Samples of ``best_of_n`` (``prune`` starts ``pool_size``).
        threshold: Accept threshold of the adaptive strategies.
        checkpoint: The pruning checkpoint of the pruning strategies.
        keep_ratio: Their keep ratio.
        anneal: Anneal the temperature (adaptive strategies); ``False`` samples at T throughout.

    Example:
        >>> p = graph_policy(BenchConfig(), "adaptive", threshold=0.9)
        >>> p.strategy, p.accept_threshold, p.max_samples, p.initial_temperature
        ('adaptive', 0.9, 16, 0.4)

    """
    fields: dict[str, Any] = {
        "strategy": strategy,
        "temperature": config.temperature,
        "initial_temperature": config.initial_temperature,
        "anneal_samples": config.anneal_samples if anneal else 0,
        "top_p": config.top_p,
        "max_new_tokens": config.max_new_tokens,
        "batch_schedule": config.batch_schedule,
        "max_samples": config.pool_size,
        "num_samples": num_samples if num_samples is not None else config.pool_size,
    }
    if threshold is not None:
        fields["accept_threshold"] = threshold
    if checkpoint is not None:
        fields["prune_checkpoints"] = (checkpoint,)
    if keep_ratio is not None:
        fields["keep_ratio"] = keep_ratio
    return CapEvalConfig(**fields)


# -- the graph, replayed ------------------------------------------------------------------------


@dataclass
class _Replay:
    """The replay's working state: the graph's state plus where each paused sample stands."""

    state: CapEvalState
    paused_at: dict[int, int] = field(default_factory=dict)
    """Sample index -> the checkpoint it is paused at."""


def _record(**values: Any) -> SampleRecord:
    return cast(SampleRecord, values)


def _advance(
    record: SampleRecord, sample: PoolSample, until: int | None, checkpoints: Sequence[int], max_new_tokens: int
) -> tuple[SampleRecord, int | None]:
    """The record after ``engine.generate(until=until)``, and the checkpoint it paused at (``None``: finished)."""
    if until is not None and until in sample.p_at:
        paused = {"num_tokens": sample.tokens_at[until], "text": sample.text_at.get(until, sample.text)}
        return _record(**{**record, **paused}), until
    if until is not None and until not in checkpoints and until < max_new_tokens:
        raise ValueError(
            f"the policy pauses at {until} tokens, but the pools were self-evaluated only at {tuple(checkpoints)}"
        )
    done = {
        "text": sample.text,
        "num_tokens": sample.num_tokens,
        "finished": True,
        "finish_reason": sample.finish_reason,
    }
    return _record(**{**record, **done}), None


def _generate(
    run: _Replay,
    pool: Sequence[PoolSample],
    policy: CapEvalConfig,
    eval_tokens: int,
    checkpoints: Sequence[int],
    max_new_tokens: int,
) -> None:
    """Mirror of ``CapEvalNodes.generate``: continue the active samples, or draw the next planned batch."""
    state = run.state
    usage = state["usage"]
    active = active_samples(state)
    if active:
        records = active
    else:
        drawn = len(state.get("samples", []))
        plan = next_batch(state, policy, eval_tokens)
        if drawn + plan.size > len(pool):
            raise ValueError(f"the policy draws {drawn + plan.size} samples but the pool holds {len(pool)}")
        for i, t in enumerate(plan.temperatures):
            if abs(pool[drawn + i].temperature - t) > 1e-9:
                raise ValueError(
                    f"pool sample {drawn + i} was drawn at temperature {pool[drawn + i].temperature}, "
                    f"but the policy draws it at {t}: replay it over the matching pool"
                )
        records = [new_sample(drawn + i, drawn + i, state["batches_drawn"], t) for i, t in enumerate(plan.temperatures)]
        state["batches_drawn"] += 1
    until = pause_checkpoint(records, policy)
    advanced = []
    for r in records:
        new, paused = _advance(r, pool[r["index"]], until, checkpoints, max_new_tokens)
        usage["generated_tokens"] += new["num_tokens"] - r["num_tokens"]
        if paused is None:
            run.paused_at.pop(r["index"], None)
        else:
            run.paused_at[r["index"]] = paused
        advanced.append(new)
    state["samples"] = merge_samples(state.get("samples", []), advanced)


def _self_evaluate(run: _Replay, pool: Sequence[PoolSample], eval_tokens: int) -> None:
    """Mirror of ``CapEvalNodes.self_evaluate``: score each unpruned sample not yet scored at its length."""
    state = run.state
    todo = [s for s in state["samples"] if not s["pruned"] and s["scored_at"] != s["num_tokens"]]
    scored = []
    for s in todo:
        sample = pool[s["index"]]
        if s["finished"]:
            score, cost = sample.p_final, sample.final_eval_tokens
        else:
            score, cost = sample.p_at[run.paused_at[s["index"]]], eval_tokens
        state["usage"]["self_eval_tokens"] += cost
        scored.append(_record(**{**s, "score": score, "scored_at": s["num_tokens"]}))
    state["samples"] = merge_samples(state["samples"], scored)


def _prune(run: _Replay, policy: CapEvalConfig) -> None:
    """Mirror of ``CapEvalNodes.prune``: keep the top ``keep_ratio`` of the active samples by score."""
    active = active_samples(run.state)
    keep = pruning_survivors(active, policy.keep_ratio)
    dropped = [_record(**{**s, "pruned": True}) for i, s in enumerate(active) if i not in keep]
    run.state["samples"] = merge_samples(run.state["samples"], dropped)


def replay_graph(
    pool: Sequence[PoolSample],
    policy: CapEvalConfig,
    *,
    eval_tokens: int,
    checkpoints: Sequence[int],
    max_new_tokens: int,
) -> Outcome:
    """What the graph run with ``policy`` returns and spends on a prompt whose draws are ``pool``.

    Args:
        pool: The prompt's samples, in the order the graph draws them, at the temperatures it draws them at.
        policy: The graph's policy (no token budget, no deadline).
        eval_tokens: Tokens of one mid-generation self-evaluation (the graph's ``eval_tokens``).
        checkpoints: The checkpoints the pool was self-evaluated at.
        max_new_tokens: The pool's ``max_new_tokens``.

    Raises:
        ValueError: The pool is too small, drawn at other temperatures, or lacks a checkpoint the policy pauses at.

    """
    if policy.max_total_tokens is not None or policy.deadline_s is not None:
        raise ValueError("replay covers policies without a token budget or deadline")
    run = _Replay(
        state={
            "samples": [],
            "batches_drawn": 0,
            "usage": {"generated_tokens": 0, "self_eval_tokens": 0},
            "stop_reason": None,
        }
    )
    route = "generate"
    while True:
        if route == "prune":
            _prune(run, policy)
        _generate(run, pool, policy, eval_tokens, checkpoints, max_new_tokens)
        _self_evaluate(run, pool, eval_tokens)
        route = route_after_self_evaluation(run.state, policy, eval_tokens)
        if route == "accept":
            break
    state = run.state
    reason = stop_reason(state, policy, eval_tokens) or "schedule_done"
    candidates = [s for s in state["samples"] if s["finished"] and not s["pruned"]]
    pick = best_scored(candidates)
    usage = state["usage"]
    return Outcome(
        correct=float(pool[pick["index"]].correct),
        samples=len(state["samples"]),
        generated_tokens=int(usage["generated_tokens"]),
        eval_tokens=int(usage["self_eval_tokens"]),
        pick=pick["index"],
        stop_reason=reason,
    )


def replay_policy(pool: PromptPool, policy: CapEvalConfig) -> Outcome:
    """:func:`replay_graph` over the prompt's matching pool: annealed for annealing policies, else fixed."""
    annealing = policy.strategy in ("adaptive", "adaptive_prune") and policy.anneal_samples > 0
    samples = pool.annealed if annealing else pool.fixed
    return replay_graph(
        samples,
        policy,
        eval_tokens=pool.eval_tokens,
        checkpoints=pool.checkpoints,
        max_new_tokens=pool.max_new_tokens,
    )


# -- baselines ------------------------------------------------------------------------------------


def greedy(pool: PromptPool) -> Outcome:
    """One greedy sample."""
    g = pool.greedy
    return Outcome(float(g.correct), 1, g.num_tokens)


def single_sample(pool: PromptPool) -> Outcome:
    """One sample at T, in expectation: the mean over the fixed pool's i.i.d. samples (pass@1)."""
    n = len(pool.fixed)
    return Outcome(sum(s.correct for s in pool.fixed) / n, 1, sum(s.num_tokens for s in pool.fixed) / n)


def first_sample(pool: PromptPool) -> Outcome:
    """The fixed pool's first sample: what one live sample at T on the same seed returns."""
    s = pool.fixed[0]
    return Outcome(float(s.correct), 1, s.num_tokens, pick=0)


def _pick_by(samples: Sequence[PoolSample], scores: Sequence[float], eval_tokens: float) -> Outcome:
    i = best_of_n(scores)
    return Outcome(float(samples[i].correct), len(samples), sum(s.num_tokens for s in samples), eval_tokens, pick=i)


def oracle_best_of_n(pool: PromptPool, n: int) -> Outcome:
    """Best-of-N where the checker picks: right if any of the first N samples is (the ceiling)."""
    samples = pool.fixed[:n]
    return _pick_by(samples, [float(s.correct) for s in samples], 0)


def judge_best_of_n(pool: PromptPool, n: int) -> Outcome | None:
    """Best-of-N by the same model's 0-10 rating; ``None`` if the pool has no ratings."""
    samples = pool.fixed[:n]
    scores = [s.judge_score for s in samples]
    if any(x is None for x in scores):
        return None
    return _pick_by(samples, [float(x or 0.0) for x in scores], sum(s.judge_tokens or 0 for s in samples))


def self_certainty_best_of_n(pool: PromptPool, n: int) -> Outcome | None:
    """Best-of-N by self-certainty (computable while decoding: no extra tokens); ``None`` without scores."""
    samples = pool.fixed[:n]
    scores = [s.self_certainty for s in samples]
    if any(x is None for x in scores):
        return None
    return _pick_by(samples, [float(x or 0.0) for x in scores], 0)


def majority_vote(pool: PromptPool, n: int) -> Outcome | None:
    """The most common extracted answer of the first N samples (ties: the one seen first).

    ``None`` for answer kinds without extraction. With no answer extracted, the first sample is returned.

    Example:
        >>> from langchain_capeval.bench.records import PoolSample
        >>> mk = lambda i, a, ok: PoolSample(index=i, temperature=0.8, seed=i, text=a, num_tokens=3,
        ...     finish_reason="eos", correct=ok, p_final=0.5, final_eval_tokens=27, answer=a)
        >>> g = mk(0, "5", False)
        >>> pool = PromptPool("t", "add1", "number", 0, 28, 48, (8,), g, (g, mk(1, "7", True), mk(2, "7", True)), ())
        >>> majority_vote(pool, 3).correct, majority_vote(pool, 3).pick
        (1.0, 1)

    """
    if pool.kind not in EXTRACTABLE_KINDS:
        return None
    samples = pool.fixed[:n]
    votes = Counter(s.answer for s in samples if s.answer is not None)
    tokens = sum(s.num_tokens for s in samples)
    if not votes:
        return Outcome(float(samples[0].correct), len(samples), tokens, pick=0)
    top = max(votes.values())
    winner = next(s for s in samples if s.answer is not None and votes[s.answer] == top)
    return Outcome(float(winner.correct), len(samples), tokens, pick=winner.index)


def schedule_sizes(policy: CapEvalConfig) -> list[int]:
    """The batch sizes the graph draws under ``policy`` when nothing stops it early.

    Example:
        >>> schedule_sizes(CapEvalConfig(max_samples=6))
        [1, 1, 2, 2]

    """
    sizes: list[int] = []
    while (
        plan := plan_next_batch(
            policy, batches_drawn=len(sizes), samples_drawn=sum(sizes), tokens_spent=0, eval_tokens=1
        )
    ) is not None:
        sizes.append(plan.size)
    return sizes


def first_correct_draw(samples: Sequence[PoolSample], sizes: Sequence[int]) -> int | None:
    """Samples drawn through the first batch holding a right sample; ``None`` if no batch does."""
    drawn = 0
    for size in sizes:
        batch = samples[drawn : drawn + size]
        drawn += len(batch)
        if any(s.correct for s in batch):
            return drawn
    return None


def oracle_stopping(samples: Sequence[PoolSample], sizes: Sequence[int]) -> Outcome:
    """Draw batches on the schedule and stop at the first batch with a right sample (the checker stops).

    A prompt with no right sample draws the whole schedule (the procedure never stops early there).
    """
    hit = first_correct_draw(samples, sizes)
    drawn = hit if hit is not None else min(sum(sizes), len(samples))
    chosen = samples[:drawn]
    pick = next((s.index for s in chosen if s.correct), 0)
    return Outcome(float(hit is not None), drawn, sum(s.num_tokens for s in chosen), pick=pick)


# -- every strategy over every prompt -----------------------------------------------------------


@dataclass(frozen=True)
class StrategyRun:
    """One strategy at one setting, replayed over every prompt.

    Attributes:
        strategy: The strategy's name (``adaptive``, ``best_of_n_judge``, ...).
        params: Its setting (``{"threshold": 0.9}``, ``{"n": 4}``, ...).
        outcomes: One per prompt, in the pools' order; ``None`` where it does not apply.

    """

    strategy: str
    params: dict[str, float | int]
    outcomes: tuple[Outcome | None, ...]

    @property
    def label(self) -> str:
        """``strategy`` with its setting, as in the tables: ``adaptive/threshold=0.9``."""
        if not self.params:
            return self.strategy
        return self.strategy + "/" + ",".join(f"{k}={v}" for k, v in self.params.items())


STRATEGY_DESCRIPTIONS: dict[str, str] = {
    "greedy": "one greedy sample",
    "sample": "one sample at T (pass@1: the mean over the pool)",
    "best_of_n_selfeval": "N samples at T, the best P(win or tie) returned (the graph's best_of_n)",
    "best_of_n_oracle": "N samples at T, the checker picks (the ceiling)",
    "best_of_n_judge": "N samples at T, the same model rates each 0-10 (LLM as judge, optillm style)",
    "best_of_n_self_certainty": "N samples at T, the most self-certain returned (Kang et al. 2025)",
    "majority_vote": "N samples at T, the most common extracted answer",
    "adaptive": "adaptive sampling with annealing, stop once P(win or tie) >= threshold (the graph's adaptive)",
    "adaptive_fixed_t": "adaptive sampling at T throughout (no annealing)",
    "prune": "pool_size samples at T, pruned to keep x at checkpoint c (the graph's prune)",
    "adaptive_prune": "adaptive sampling with annealing, batches pruned at checkpoint c (the graph's adaptive_prune)",
    "oracle_stopping": "adaptive schedule (annealed), stop at the first batch with a right sample",
    "oracle_stopping_fixed_t": "adaptive schedule at T, stop at the first batch with a right sample",
}
"""What each replayed strategy is, for the reports."""


def replay_all(pools: Sequence[PromptPool], config: BenchConfig) -> list[StrategyRun]:
    """Replay every strategy and setting of ``config`` over ``pools``."""
    runs: list[StrategyRun] = []

    def add(strategy: str, params: dict[str, float | int], fn: Callable[[PromptPool], Outcome | None]) -> None:
        runs.append(StrategyRun(strategy, params, tuple(fn(p) for p in pools)))

    add("greedy", {}, greedy)
    add("sample", {}, single_sample)
    for n in range(1, config.pool_size + 1):
        bon = graph_policy(config, "best_of_n", num_samples=n)
        add("best_of_n_selfeval", {"n": n}, partial(replay_policy, policy=bon))
        add("best_of_n_oracle", {"n": n}, partial(oracle_best_of_n, n=n))
        add("best_of_n_judge", {"n": n}, partial(judge_best_of_n, n=n))
        add("best_of_n_self_certainty", {"n": n}, partial(self_certainty_best_of_n, n=n))
        add("majority_vote", {"n": n}, partial(majority_vote, n=n))
    for t in config.thresholds:
        add("adaptive", {"threshold": t}, partial(replay_policy, policy=graph_policy(config, "adaptive", threshold=t)))
        fixed_t = graph_policy(config, "adaptive", threshold=t, anneal=False)
        add("adaptive_fixed_t", {"threshold": t}, partial(replay_policy, policy=fixed_t))
    for c in config.collected_checkpoints:
        for k in config.keep_ratios:
            pruning = graph_policy(config, "prune", checkpoint=c, keep_ratio=k)
            add("prune", {"checkpoint": c, "keep": k}, partial(replay_policy, policy=pruning))
    for t in config.thresholds:
        for c in config.collected_checkpoints:
            for k in config.keep_ratios:
                both = graph_policy(config, "adaptive_prune", threshold=t, checkpoint=c, keep_ratio=k)
                add("adaptive_prune", {"threshold": t, "checkpoint": c, "keep": k}, partial(replay_policy, policy=both))
    sizes_annealed = schedule_sizes(graph_policy(config, "adaptive"))
    sizes_fixed = schedule_sizes(graph_policy(config, "adaptive", anneal=False))
    add("oracle_stopping", {}, lambda p: oracle_stopping(p.annealed, sizes_annealed))
    add("oracle_stopping_fixed_t", {}, lambda p: oracle_stopping(p.fixed, sizes_fixed))
    return runs
