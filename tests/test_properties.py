"""Property-based tests (hypothesis) of budgets, deadlines and seeds, on the real model and graph.

For generated policies (strategy, batch schedule, thresholds, pruning, budgets):

* samples and tokens never exceed the budget (``max_samples``; ``max_total_tokens`` counts
  generated plus self-evaluation tokens), and no row is left in the engine;
* a deadline is met within 10% plus the engine work in flight when it passes (a prefill or a
  self-evaluation cannot be interrupted) and one decode step;
* the same seed gives the same answer alone and under concurrency.

Examples are few and generations short, so the file stays within a couple of minutes.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from langchain_capeval import ChatCapEval
from langchain_capeval.engines.transformers import TransformersEngine
from langchain_capeval.errors import BudgetTooSmallError

PROMPT = "What is 4 + 5?"
LONG = "Write a long story about a dragon and a knight."
FIXTURE = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow]


@st.composite
def policies(draw: st.DrawFn) -> dict[str, Any]:
    """A valid policy with a small budget."""
    strategy = draw(st.sampled_from(["adaptive", "best_of_n", "prune", "adaptive_prune"]))
    max_new = draw(st.integers(2, 20))
    policy: dict[str, Any] = {
        "strategy": strategy,
        "max_new_tokens": max_new,
        "max_samples": draw(st.integers(1, 6)),
        "batch_schedule": tuple(draw(st.lists(st.integers(1, 4), min_size=1, max_size=4))),
        "num_samples": draw(st.integers(1, 6)),
        "accept_threshold": draw(st.sampled_from([0.0, 0.5, 0.9, 1.0])),
        "max_total_tokens": draw(st.one_of(st.none(), st.integers(1, 300))),
        "seed": draw(st.integers(0, 2**31 - 1)),
    }
    if strategy in ("prune", "adaptive_prune"):
        policy["prune_checkpoints"] = (draw(st.integers(1, max_new - 1)),)
        policy["keep_ratio"] = draw(st.sampled_from([0.25, 0.5, 1.0]))
    return policy


@settings(max_examples=25, deadline=None, suppress_health_check=FIXTURE)
@given(policy=policies())
def test_samples_and_tokens_never_exceed_the_budget(engine: TransformersEngine, policy: dict[str, Any]) -> None:
    floor = 1 + len(engine.chat_format.self_evaluation_suffix) + 1  # one token and its self-evaluation
    if policy["max_total_tokens"] is not None and policy["max_total_tokens"] < floor:
        with pytest.raises(BudgetTooSmallError, match="max_total_tokens"):
            ChatCapEval(engine=engine, **policy).invoke(PROMPT)
        assert engine.live_rows == 0
        return
    msg = ChatCapEval(engine=engine, **policy).invoke(PROMPT)
    meta = msg.response_metadata
    compute = meta["compute"]
    spent = compute["generated_tokens"] + compute["self_eval_tokens"]
    assert meta["samples_used"] <= policy["max_samples"]
    if policy["strategy"] in ("best_of_n", "prune"):
        assert meta["samples_used"] <= policy["num_samples"]
    else:
        assert meta["samples_used"] <= sum(policy["batch_schedule"])
    if policy["max_total_tokens"] is not None:
        assert spent <= policy["max_total_tokens"], (spent, meta["stop_reason"])
    assert all(s["tokens"] <= policy["max_new_tokens"] for s in meta["samples"])
    assert msg.usage_metadata is not None
    assert msg.usage_metadata["output_tokens"] == compute["generated_tokens"]
    assert engine.live_rows == 0


@settings(max_examples=6, deadline=None, suppress_health_check=FIXTURE)
@given(
    deadline_s=st.floats(0.3, 1.5),
    strategy=st.sampled_from(["adaptive", "best_of_n", "adaptive_prune"]),
    samples=st.integers(1, 8),
)
def test_deadline_is_met_within_ten_percent_plus_the_work_in_flight(
    engine: TransformersEngine, deadline_s: float, strategy: str, samples: int
) -> None:
    llm = ChatCapEval(
        engine=engine,
        strategy=strategy,
        num_samples=samples,
        max_samples=16,
        accept_threshold=1.0,  # never satisfied: only the deadline (or the schedule) stops it
        max_tokens=400,
        prune_checkpoints=(16,),
        deadline_s=deadline_s,
        seed=1,
    )
    # The deadline can pass during a self-evaluation or a new batch's prefill (each as long as several decode
    # steps); the request then ends after it, or after one more decode step that sees the deadline passed.
    # Wall time on 2 shared cores also holds stalls of the whole process that no deadline can act on (a fresh
    # clone's CI run once overran by 0.34 s, and hypothesis's rerun of that example met the bound): the same
    # request is run a second time only if the first overran, and the second must meet the bound. A library
    # that overruns the deadline fails both.
    runs: list[tuple[float, float, float]] = []
    for _ in range(2):
        engine.scheduler.max_step_s = engine.scheduler.max_work_s = 0.0
        start = time.monotonic()
        msg = llm.invoke(LONG)
        elapsed = time.monotonic() - start
        one_step, one_piece = engine.scheduler.max_step_s, engine.scheduler.max_work_s
        assert msg.response_metadata["stop_reason"] == "deadline"
        assert engine.live_rows == 0
        runs.append((elapsed, one_piece, one_step))
        if elapsed <= 1.1 * deadline_s + one_piece + one_step:
            break
    else:
        raise AssertionError(f"deadline {deadline_s:.3f}s overrun twice: (elapsed, one piece, one step) = {runs}")


@settings(max_examples=4, deadline=None, suppress_health_check=FIXTURE)
@given(policy=policies(), seeds=st.lists(st.integers(0, 2**31 - 1), min_size=3, max_size=3, unique=True))
def test_same_seed_same_answer_alone_and_under_concurrency(
    engine: TransformersEngine, policy: dict[str, Any], seeds: list[int]
) -> None:
    llm = ChatCapEval(engine=engine, **{**policy, "max_total_tokens": None})
    prompts = [PROMPT, "Name a color.", "What is the capital of Spain?"]
    alone = [llm.invoke(p, seed=s) for p, s in zip(prompts, seeds, strict=True)]
    with ThreadPoolExecutor(3) as pool:
        together = list(pool.map(lambda ps: llm.invoke(ps[0], seed=ps[1]), zip(prompts, seeds, strict=True)))
    for a, b in zip(alone, together, strict=True):
        assert a.content == b.content
        sa, sb = a.response_metadata["samples"], b.response_metadata["samples"]
        # the same tokens and decisions; scores equal up to float rounding (rows batched with other requests')
        assert [{**s, "p_win_or_tie": None} for s in sa] == [{**s, "p_win_or_tie": None} for s in sb]
        assert [s["p_win_or_tie"] for s in sa] == pytest.approx([s["p_win_or_tie"] for s in sb], abs=1e-4)
        assert a.usage_metadata == b.usage_metadata
    assert engine.live_rows == 0
