"""The method's decisions, as plain functions: no graph, no model."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from langchain_capeval.config import CapEvalConfig
from langchain_capeval.policy import (
    anneal_temperature,
    best_of_n,
    budget_stop_reason,
    plan_next_batch,
    prune_survivors,
    same_response_scores,
    threshold_met,
)


def test_annealing_rises_from_initial_to_final_then_holds() -> None:
    cfg = CapEvalConfig(initial_temperature=0.2, temperature=1.0, anneal_samples=4)
    temps = [anneal_temperature(k, cfg) for k in range(7)]
    assert temps[0] == pytest.approx(0.2)
    assert temps[4:] == [pytest.approx(1.0)] * 3
    assert temps[:5] == sorted(temps[:5]) and len(set(temps[:5])) == 5


def test_no_annealing_for_best_of_n_or_when_disabled() -> None:
    assert anneal_temperature(0, CapEvalConfig(strategy="best_of_n", temperature=0.9)) == 0.9
    assert anneal_temperature(0, CapEvalConfig(anneal_samples=0, temperature=0.6)) == 0.6


def test_batches_follow_the_schedule_and_stop_after_it() -> None:
    cfg = CapEvalConfig(batch_schedule=(1, 2, 4))
    sizes, drawn = [], 0
    for b in range(4):
        plan = plan_next_batch(cfg, batches_drawn=b, samples_drawn=drawn, tokens_spent=0, eval_tokens=28)
        if plan is None:
            break
        sizes.append(plan.size)
        drawn += plan.size
    assert sizes == [1, 2, 4]
    reason = budget_stop_reason(cfg, batches_drawn=3, samples_drawn=7, tokens_spent=0, eval_tokens=28)
    assert reason == "schedule_done"


def test_each_sample_of_a_batch_gets_its_own_annealed_temperature() -> None:
    cfg = CapEvalConfig(initial_temperature=0.0, temperature=0.8, anneal_samples=8, batch_schedule=(1, 4))
    plan = plan_next_batch(cfg, batches_drawn=1, samples_drawn=1, tokens_spent=0, eval_tokens=28)
    assert plan is not None
    assert plan.temperatures == pytest.approx((0.1, 0.2, 0.3, 0.4))


def test_sample_budget_caps_the_batch() -> None:
    cfg = CapEvalConfig(max_samples=5)
    plan = plan_next_batch(cfg, batches_drawn=3, samples_drawn=4, tokens_spent=0, eval_tokens=28)
    assert plan is not None and plan.size == 1
    assert plan_next_batch(cfg, batches_drawn=4, samples_drawn=5, tokens_spent=0, eval_tokens=28) is None
    assert budget_stop_reason(cfg, batches_drawn=4, samples_drawn=5, tokens_spent=0, eval_tokens=28) == "max_samples"


@pytest.mark.parametrize("spent", [0, 100, 500, 900, 990])
@pytest.mark.parametrize("strategy", ["adaptive", "adaptive_prune", "prune", "best_of_n"])
def test_token_budget_holds_by_construction(spent: int, strategy: str) -> None:
    cfg = CapEvalConfig(strategy=strategy, max_total_tokens=1000, max_new_tokens=200, prune_checkpoints=(16, 64))
    batches = 0 if strategy in ("prune", "best_of_n") else 2
    plan = plan_next_batch(cfg, batches_drawn=batches, samples_drawn=batches, tokens_spent=spent, eval_tokens=28)
    if plan is None:
        return
    evals = 1 + (2 if strategy in ("prune", "adaptive_prune") and plan.size > 1 else 0)
    worst = plan.size * (plan.max_new_tokens + evals * 28)
    assert spent + worst <= 1000
    assert plan.max_new_tokens >= 1


def test_token_budget_too_small_for_any_sample() -> None:
    cfg = CapEvalConfig(max_total_tokens=20)
    assert plan_next_batch(cfg, batches_drawn=0, samples_drawn=0, tokens_spent=0, eval_tokens=28) is None
    assert (
        budget_stop_reason(cfg, batches_drawn=0, samples_drawn=0, tokens_spent=0, eval_tokens=28) == "max_total_tokens"
    )


def test_threshold() -> None:
    cfg = CapEvalConfig(accept_threshold=0.7)
    assert threshold_met(0.7, cfg)
    assert not threshold_met(0.69, cfg)
    assert not threshold_met(None, cfg)


def test_prune_keeps_top_k_by_score_in_index_order() -> None:
    assert prune_survivors([0.1, 0.8, 0.3, 0.9, 0.5], keep_ratio=0.4) == [1, 3]
    assert prune_survivors([0.1, 0.8, 0.3], keep_ratio=0.01) == [1]  # at least one
    assert prune_survivors([0.5, 0.5, 0.5, 0.5], keep_ratio=0.5) == [0, 1]  # ties keep the earlier
    assert prune_survivors([0.2, 0.4], keep_ratio=1.0) == [0, 1]
    assert prune_survivors([], keep_ratio=0.5) == []


def test_best_of_n() -> None:
    assert best_of_n([0.3, 0.9, 0.9, 0.1]) == 1
    with pytest.raises(ValueError, match="at least one"):
        best_of_n([])


def test_copies_of_one_response_rank_as_its_earliest_copy() -> None:
    scores = [0.4, 0.7, 0.2, 0.7000003]
    assert best_of_n(scores) == 3  # by score alone, float rounding picks the later copy
    assert best_of_n(scores, responses=["a", "b", "c", "b"]) == 1
    assert same_response_scores(scores, ["a", "b", "c", "b"]) == [0.4, 0.7, 0.2, 0.7]
    assert same_response_scores(scores, None) == scores
    # the earliest copy's score speaks for every copy, even when a later copy scored higher
    assert best_of_n([0.6999997, 0.7, 0.7000001], responses=["x", "y", "x"]) == 1
    assert prune_survivors([0.9, 0.3, 0.9000001, 0.8], keep_ratio=0.5) == [0, 2]
    assert prune_survivors([0.9, 0.3, 0.9000001, 0.8], keep_ratio=0.5, responses=["p", "q", "p", "r"]) == [0, 2]
    assert prune_survivors([0.9, 0.3, 0.9000001, 0.8], keep_ratio=0.25, responses=["p", "q", "p", "r"]) == [0]
    assert prune_survivors([0.8999, 0.3, 0.9, 0.8], keep_ratio=0.25, responses=["p", "q", "p", "r"]) == [0]
    with pytest.raises(ValueError, match="3 scores but 2 responses"):
        best_of_n([0.1, 0.2, 0.3], responses=["a", "b"])


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"accept_threshold": 1.5}, "accept_threshold"),
        ({"accept_threshold": -0.1}, "accept_threshold"),
        ({"max_samples": 0}, "max_samples"),
        ({"max_total_tokens": -5}, "max_total_tokens"),
        ({"deadline_s": -1.0}, "deadline_s"),
        ({"batch_schedule": ()}, "batch_schedule"),
        ({"batch_schedule": (1, 0)}, "batch_schedule"),
        ({"prune_checkpoints": ()}, "prune_checkpoints"),
        ({"prune_checkpoints": (64, 32)}, "prune_checkpoints"),
        ({"keep_ratio": 0.0}, "keep_ratio"),
        ({"top_p": 0.0}, "top_p"),
        ({"temperature": -1.0}, "temperature"),
        ({"strategy": "beam"}, "strategy"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"bogus": 1}, "bogus"),
    ],
)
def test_invalid_config_names_the_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ValidationError) as err:
        CapEvalConfig(**kwargs)  # type: ignore[arg-type]
    assert field in str(err.value)


def test_prune_checkpoint_must_fit_the_sample_length() -> None:
    with pytest.raises(ValidationError, match="prune_checkpoints"):
        CapEvalConfig(strategy="prune", prune_checkpoints=(64,), max_new_tokens=32)


def test_merged_validates_and_leaves_the_original_alone() -> None:
    cfg = CapEvalConfig()
    new = cfg.merged({"max_samples": 3})
    assert new.max_samples == 3 and cfg.max_samples == 16
    with pytest.raises(ValidationError, match="max_samples"):
        cfg.merged({"max_samples": -3})
