"""SessionBudget: the arithmetic of sharing one budget across several questions."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from langchain_capeval.budget import Allowance, BudgetExhaustedError, SessionBudget


def metadata(tokens: int, samples: int = 1, self_eval: int = 0) -> dict[str, Any]:
    """The part of ChatCapEval's response_metadata that a charge reads."""
    return {"compute": {"generated_tokens": tokens - self_eval, "self_eval_tokens": self_eval}, "samples_used": samples}


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_equal_shares_and_savings_carry_forward() -> None:
    budget = SessionBudget(questions=4, max_total_tokens=400, max_samples=8)
    a = budget.allow()
    assert (a.max_total_tokens, a.max_samples, a.deadline_s) == (100, 2, None)
    spent = budget.charge(a, metadata(40, samples=1, self_eval=28))
    assert (spent.tokens, spent.samples) == (40, 1)
    b = budget.allow()
    assert (b.max_total_tokens, b.max_samples) == (360 // 3, 7 // 3)  # the 60 tokens and 1 sample saved are shared
    budget.charge(b, metadata(b.max_total_tokens or 0, samples=2))
    c = budget.allow()
    assert c.max_total_tokens == (400 - 40 - 120) // 2
    assert budget.tokens_spent == 160 and budget.samples_spent == 3 and budget.questions_left == 1


def test_the_last_question_gets_everything_left() -> None:
    budget = SessionBudget(questions=2, max_total_tokens=300)
    budget.charge(budget.allow(), metadata(10))
    assert budget.allow().max_total_tokens == 290


def test_outstanding_allowances_are_reserved() -> None:
    budget = SessionBudget(questions=3, max_total_tokens=100, max_samples=3)
    allowances = [budget.allow() for _ in range(3)]
    assert [a.max_total_tokens for a in allowances] == [33, 33, 34]
    assert [a.max_samples for a in allowances] == [1, 1, 1]
    assert sum(a.max_total_tokens or 0 for a in allowances) <= 100


def test_overrides_name_only_the_budgets_set() -> None:
    budget = SessionBudget(questions=2, max_samples=5)
    a = budget.allow()
    assert a.overrides() == {"max_samples": 2}
    assert SessionBudget(questions=1).allow().overrides() == {}


def test_deadline_is_shared_wall_time_from_the_first_allowance() -> None:
    clock = FakeClock()
    budget = SessionBudget(questions=2, deadline_s=10.0, clock=clock)
    clock.now += 50  # time before the first allowance is not counted
    a = budget.allow()
    assert a.deadline_s == pytest.approx(5.0)
    clock.now += 2
    budget.charge(a, metadata(10))
    assert budget.seconds_left == pytest.approx(8.0)
    assert budget.allow().deadline_s == pytest.approx(8.0)


def test_exhausted_budgets_are_named() -> None:
    budget = SessionBudget(questions=1, max_total_tokens=50)
    budget.charge(budget.allow(), metadata(50))
    with pytest.raises(BudgetExhaustedError, match="questions"):
        budget.allow()

    tokens = SessionBudget(questions=3, max_total_tokens=60)
    tokens.charge(tokens.allow(), metadata(60))  # a question that overspent its share leaves nothing
    with pytest.raises(BudgetExhaustedError, match="max_total_tokens"):
        tokens.allow()

    clock = FakeClock()
    late = SessionBudget(questions=2, deadline_s=1.0, clock=clock)
    late.charge(late.allow(), metadata(5))
    clock.now += 1.5
    with pytest.raises(BudgetExhaustedError, match="deadline_s"):
        late.allow()


def test_charge_checks_what_it_is_given() -> None:
    budget = SessionBudget(questions=2, max_total_tokens=100)
    a = budget.allow()
    with pytest.raises(ValueError, match="compute"):
        budget.charge(a, {"finish_reason": "stop"})
    budget.charge(a, metadata(10))
    with pytest.raises(ValueError, match="not awaiting"):
        budget.charge(a, metadata(10))
    stranger = Allowance(number=1, max_samples=None, max_total_tokens=50, deadline_s=None)
    with pytest.raises(ValueError, match="not awaiting"):
        budget.charge(stranger, metadata(10))


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"questions": 0}, "questions"),
        ({"questions": 2, "max_total_tokens": 0}, "max_total_tokens"),
        ({"questions": 2, "deadline_s": -1}, "deadline_s"),
    ],
)
def test_invalid_budgets_name_the_field(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError, match=field):
        SessionBudget(**kwargs)


@settings(max_examples=200, deadline=None)
@given(
    questions=st.integers(1, 8),
    max_total_tokens=st.integers(1, 2000),
    max_samples=st.integers(1, 20),
    use=st.lists(st.floats(0.0, 1.0), min_size=8, max_size=8),
)
def test_never_more_than_what_is_left(
    questions: int, max_total_tokens: int, max_samples: int, use: list[float]
) -> None:
    budget = SessionBudget(questions=questions, max_total_tokens=max_total_tokens, max_samples=max_samples)
    for i in range(questions):
        try:
            a = budget.allow()
        except BudgetExhaustedError:
            assert (budget.tokens_left or 0) < 1 or (budget.samples_left or 0) < 1
            return
        assert a.max_total_tokens is not None and a.max_samples is not None
        assert 1 <= a.max_total_tokens <= (budget.tokens_left or 0)
        assert 1 <= a.max_samples <= (budget.samples_left or 0)
        budget.charge(a, metadata(int(a.max_total_tokens * use[i]), samples=max(1, int(a.max_samples * use[i]))))
        assert budget.tokens_spent <= max_total_tokens and budget.samples_spent <= max_samples


def test_concurrent_questions_cannot_overspend() -> None:
    budget = SessionBudget(questions=16, max_total_tokens=1000, max_samples=16)
    barrier = threading.Barrier(16)

    def ask() -> None:
        barrier.wait()
        a = budget.allow()
        budget.charge(a, metadata(a.max_total_tokens or 0, samples=a.max_samples or 0))

    threads = [threading.Thread(target=ask) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert budget.questions_left == 0
    assert budget.tokens_spent <= 1000 and budget.samples_spent <= 16


def test_charges_a_real_answer(engine: Any) -> None:
    from langchain_capeval import ChatCapEval

    llm = ChatCapEval(engine=engine, max_new_tokens=16, seed=1)
    budget = SessionBudget(questions=2, max_total_tokens=120, max_samples=4)
    a = budget.allow()
    msg = llm.invoke("Say hello.", accept_threshold=1.0, **a.overrides())
    spent = budget.charge(a, msg)
    compute = msg.response_metadata["compute"]
    assert spent.tokens == compute["generated_tokens"] + compute["self_eval_tokens"] <= (a.max_total_tokens or 0)
    assert spent.samples == msg.response_metadata["samples_used"] <= (a.max_samples or 0)
    assert budget.allow().max_total_tokens == 120 - spent.tokens
