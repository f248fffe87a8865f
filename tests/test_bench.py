"""The benchmark harness: exact replay over hand-built pools, metrics, and one real end-to-end run.

The replay tests build pools by hand, so each expected number is worked out in the test. The
end-to-end test runs ``run_benchmark`` on the embedded model (2 prompts, 4 samples each), checks
the recorded pools and every output, checks that each live graph run matches its replay exactly,
then resumes with one more prompt and checks that only that prompt is sampled.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from langchain_capeval.bench import run_benchmark
from langchain_capeval.bench.baselines import answer_key, parse_judge_score, task_answer_key
from langchain_capeval.bench.cli import add_bench_command
from langchain_capeval.bench.collect import load_tasks
from langchain_capeval.bench.config import BenchConfig
from langchain_capeval.bench.metrics import bootstrap_ci, floor_samples, gain_fraction, oracle_floor
from langchain_capeval.bench.records import POOLS_FILE, PoolFileMismatchError, PoolSample, PoolStore, PromptPool
from langchain_capeval.bench.replay import (
    graph_policy,
    judge_best_of_n,
    majority_vote,
    oracle_stopping,
    replay_graph,
    schedule_sizes,
    self_certainty_best_of_n,
)
from langchain_capeval.config import CapEvalConfig
from langchain_capeval.tasks import build_suite, check
from langchain_capeval.tasks.answers import numbers
from langchain_capeval.training.cli import config_from_args

EVAL = 28  # tokens of one mid-generation self-evaluation in these hand-built pools
FINAL = 27  # tokens of a final self-evaluation (the response ended its turn)


def sample(
    i: int,
    p: float,
    *,
    tokens: int = 10,
    correct: bool = False,
    temperature: float = 0.8,
    p_at: dict[int, float] | None = None,
    answer: str | None = None,
    judge: float | None = None,
    certainty: float | None = None,
    text: str | None = None,
    text_at: dict[int, str] | None = None,
) -> PoolSample:
    """A hand-built sample; ``p_at`` gives its scores at the checkpoints it is still generating at."""
    at = p_at or {}
    assert all(c < tokens for c in at), "a sample is only paused at checkpoints below its length"
    return PoolSample(
        index=i,
        temperature=temperature,
        seed=i,
        text=f"response {i}: {answer}" if text is None else text,  # by default each sample its own response
        num_tokens=tokens,
        finish_reason="eos",
        correct=correct,
        p_final=p,
        final_eval_tokens=FINAL,
        p_at=dict(at),
        tokens_at={c: c for c in at},
        text_at=dict(text_at or {}),
        answer=answer,
        judge_score=judge,
        judge_tokens=100 if judge is not None else None,
        self_certainty=certainty,
    )


def replay(pool: Sequence[PoolSample], **policy: Any) -> Any:
    cfg = CapEvalConfig(**{"max_new_tokens": 48, "max_samples": len(pool), **policy})
    return replay_graph(pool, cfg, eval_tokens=EVAL, checkpoints=(4, 8, 16), max_new_tokens=48)


def fixed_t(scores: Sequence[float], correct_at: int | None = None) -> list[PoolSample]:
    """A pool at T throughout (``anneal_samples=0`` policies), right only at ``correct_at``."""
    return [sample(i, p, correct=i == correct_at) for i, p in enumerate(scores)]


# -- adaptive sampling ------------------------------------------------------------------------


def test_threshold_zero_accepts_after_one_sample() -> None:
    out = replay(fixed_t([0.01] * 16), strategy="adaptive", accept_threshold=0.0, anneal_samples=0)
    assert (out.samples, out.stop_reason, out.pick) == (1, "threshold_met", 0)
    assert (out.generated_tokens, out.eval_tokens) == (10, FINAL)


def test_threshold_above_every_score_draws_the_whole_schedule() -> None:
    out = replay(fixed_t([0.5] * 15 + [0.99]), strategy="adaptive", accept_threshold=1.0, anneal_samples=0)
    assert (out.samples, out.stop_reason, out.pick) == (16, "max_samples", 15)
    assert (out.generated_tokens, out.eval_tokens) == (160, 16 * FINAL)


def test_adaptive_stops_after_the_batch_that_clears_the_threshold() -> None:
    scores = [0.1, 0.2, 0.3, 0.95] + [0.99] * 12  # batches 1, 1, 2: sample 3 clears 0.9 in the third batch
    out = replay(fixed_t(scores, correct_at=3), strategy="adaptive", accept_threshold=0.9, anneal_samples=0)
    assert (out.samples, out.pick, out.correct, out.stop_reason) == (4, 3, 1.0, "threshold_met")


def test_annealing_policy_refuses_a_pool_drawn_at_other_temperatures() -> None:
    with pytest.raises(ValueError, match=r"drawn at temperature 0.8, but the policy draws it at 0.4"):
        replay(fixed_t([0.5] * 16), strategy="adaptive", accept_threshold=1.0)  # anneals from 0.4


def test_oracle_stopping_stops_at_the_first_batch_with_a_right_sample() -> None:
    sizes = schedule_sizes(CapEvalConfig(max_samples=16))
    assert sizes == [1, 1, 2, 4, 8]
    out = oracle_stopping(fixed_t([0.5] * 16, correct_at=5), sizes)  # sample 5 is in the batch of samples 4..7
    assert (out.correct, out.samples, out.pick, out.generated_tokens) == (1.0, 8, 5, 80)
    none = oracle_stopping(fixed_t([0.5] * 16), sizes)
    assert (none.correct, none.samples) == (0.0, 16)
    # the floor: prompts answered at draws 1 and 8, one never; each costs at least the first batch (1 sample)
    curve = oracle_floor([1, 8, None], first_batch=1)
    assert curve == [(0.0, 1.0), (1 / 3, 1.0), (2 / 3, pytest.approx(10 / 3))]
    assert floor_samples(curve, 0.5) == pytest.approx(10 / 3) and floor_samples(curve, 0.9) is None


# -- pruning --------------------------------------------------------------------------------


def test_pruning_token_accounting() -> None:
    pool = [
        sample(0, 0.2, tokens=20, p_at={4: 0.9, 8: 0.9, 16: 0.9}),
        sample(1, 0.99, tokens=5, p_at={4: 0.1}),  # finishes before checkpoint 8: no pruning candidate
        sample(2, 0.95, tokens=30, p_at={4: 0.5, 8: 0.1, 16: 0.5}, correct=True),  # pruned at 8, best final score
        sample(3, 0.6, tokens=12, p_at={4: 0.3, 8: 0.8}),
    ]
    out = replay(pool, strategy="prune", num_samples=4, prune_checkpoints=(8,), keep_ratio=0.5)
    # at 8: samples 0, 2, 3 are still generating; ceil(3 * 0.5) = 2 kept (0 and 3); 2 is pruned holding 8 tokens
    assert out.generated_tokens == 5 + 20 + 8 + 12
    assert out.eval_tokens == 3 * EVAL + FINAL + 2 * FINAL  # 3 at the checkpoint, 1 finished early, 2 survivors
    assert (out.samples, out.pick, out.correct) == (4, 1, 0.0)  # the pruned sample is no candidate


def test_pruning_at_several_checkpoints_stops_pausing_a_lone_survivor() -> None:
    pool = [sample(i, 0.5, tokens=30, p_at={4: 0.1 * (i + 1), 8: 0.1 * (i + 1), 16: 0.5}) for i in range(4)]
    out = replay(pool, strategy="prune", num_samples=4, prune_checkpoints=(4, 8, 16), keep_ratio=0.5)
    # at 4: 4 -> 2 (samples 2, 3); at 8: 2 -> 1 (sample 3); the lone survivor decodes to the end unpaused
    assert out.generated_tokens == 2 * 4 + 8 + 30
    assert out.eval_tokens == 4 * EVAL + 2 * EVAL + FINAL
    assert out.pick == 3


def test_pruning_at_an_unrecorded_checkpoint_is_refused() -> None:
    pool = [sample(i, 0.5, tokens=30, p_at={4: 0.5, 8: 0.5, 16: 0.5}) for i in range(4)]
    with pytest.raises(ValueError, match="pauses at 12 tokens"):
        replay(pool, strategy="prune", num_samples=4, prune_checkpoints=(12,))


def test_copies_of_one_response_replay_as_the_graph_picks_them() -> None:
    # Copies of one text whose scores differ in the last float bits: the earliest copy, as the graph picks.
    pool = [sample(0, 0.4), sample(1, 0.7, text="7", correct=True), sample(2, 0.7000002, text="7", correct=True)]
    assert replay(pool, strategy="best_of_n", num_samples=3).pick == 1
    # Copies of one prefix at the pruning checkpoint: the earliest copy survives, whatever its later text.
    prefix = {8: "3 + 4 ="}
    pool = [
        sample(0, 0.9, tokens=20, p_at={4: 0.5, 8: 0.6}, text="3 + 4 = 7", text_at=prefix, correct=True),
        sample(1, 0.8, tokens=20, p_at={4: 0.5, 8: 0.6000003}, text="3 + 4 = 8", text_at=prefix),
        sample(2, 0.7, tokens=20, p_at={4: 0.5, 8: 0.2}),
        sample(3, 0.7, tokens=20, p_at={4: 0.5, 8: 0.1}),
    ]
    out = replay(pool, strategy="prune", num_samples=4, prune_checkpoints=(8,), keep_ratio=0.25)
    assert (out.pick, out.correct) == (0, 1.0)
    # A pool written before text_at: prefixes compare by full text, which tells these two apart.
    older = [s.with_changes(text_at={}) for s in pool]
    assert replay(older, strategy="prune", num_samples=4, prune_checkpoints=(8,), keep_ratio=0.25).pick == 1
    assert PoolSample.from_dict(json.loads(json.dumps(pool[1].to_dict()))) == pool[1]


# -- best-of-N and the baselines ------------------------------------------------------------


def test_best_of_n_picks_the_max() -> None:
    pool = [
        sample(0, 0.3, judge=9.0, certainty=0.1),
        sample(1, 0.9, correct=True, judge=2.0, certainty=0.7),
        sample(2, 0.9, judge=9.0, certainty=0.2),
    ]
    out = replay(pool, strategy="best_of_n", num_samples=3)
    assert (out.pick, out.correct, out.samples, out.eval_tokens) == (1, 1.0, 3, 3 * FINAL)  # ties: the earliest
    assert replay(pool, strategy="best_of_n", num_samples=1).pick == 0
    prompt = PromptPool("t", "add1", "number", 0, EVAL, 48, (4, 8, 16), pool[0], tuple(pool), ())
    judged = judge_best_of_n(prompt, 3)
    assert judged is not None and (judged.pick, judged.eval_tokens) == (0, 300)
    certain = self_certainty_best_of_n(prompt, 3)
    assert certain is not None and (certain.pick, certain.eval_tokens) == (1, 0)


def test_majority_vote() -> None:
    def prompt(answers: Sequence[str | None], right: str, kind: str = "number") -> PromptPool:
        pool = tuple(sample(i, 0.5, answer=a, correct=a == right) for i, a in enumerate(answers))
        return PromptPool("t", "add1", kind, 0, EVAL, 48, (4,), pool[0], pool, ())

    votes = majority_vote(prompt(["5", "7", None, "7"], "7"), 4)
    assert votes is not None and (votes.correct, votes.pick, votes.samples) == (1.0, 1, 4)
    tie = majority_vote(prompt(["5", "7", "7", "5"], "7"), 4)
    assert tie is not None and (tie.correct, tie.pick) == (0.0, 0)  # a tie goes to the answer seen first
    assert majority_vote(prompt(["5", "7", "7"], "7"), 1).pick == 0  # type: ignore[union-attr]
    silent = majority_vote(prompt([None, None], "7"), 2)
    assert silent is not None and silent.pick == 0
    assert majority_vote(prompt(["Paris"], "Paris", kind="fact"), 1) is None


def test_answer_key_agrees_with_the_checker() -> None:
    tasks = [t for t in build_suite(["add1", "compare", "next_number"], n_per_family=12, seed=0).test]
    for task in tasks:
        right = task_answer_key(task)
        others = [str(n) for n in numbers(task.prompt)]
        for response in (f"The answer is {task.answer}.", f"{task.answer}", *others, "I do not know."):
            assert (answer_key(task, response) == right) == check(task, response), (task.id, response)
    assert parse_judge_score("Rating: 7.5") == 7.5 and parse_judge_score("12") == 10.0
    assert parse_judge_score("no idea") == 0.0


# -- metrics --------------------------------------------------------------------------------


def test_bootstrap_ci_brackets_the_mean_and_is_seeded() -> None:
    values = [1, 0, 1, 1, 0, 1, 0, 1, 1, 1] * 3
    low, high = bootstrap_ci(values, iterations=400, seed=3)
    assert low < sum(values) / len(values) < high
    assert low >= 0.0 and high <= 1.0
    assert bootstrap_ci(values, iterations=400, seed=3) == (low, high)
    assert bootstrap_ci(values, iterations=400, seed=4) != (low, high)
    assert bootstrap_ci([1, 1, 1], iterations=50, seed=0) == (1.0, 1.0)
    assert gain_fraction(0.7, pass_at_1=0.5, best=0.9) == pytest.approx(0.5)
    assert gain_fraction(0.7, pass_at_1=0.5, best=0.5) is None


def test_pool_store_refuses_other_settings_and_another_engine(tmp_path: Path) -> None:
    PoolStore(tmp_path, {"pool_size": 4})
    with pytest.raises(PoolFileMismatchError, match="pool_size"):
        PoolStore(tmp_path, {"pool_size": 8})
    store = PoolStore(tmp_path, {"pool_size": 4})
    store.check_engine("model-a", "sha-1")
    store.check_engine("model-a", None)  # a passed engine: its adapter is not known, its name is
    with pytest.raises(PoolFileMismatchError, match="model-b"):
        store.check_engine("model-b", "sha-1")
    with pytest.raises(PoolFileMismatchError, match="sha-2"):
        store.check_engine("model-a", "sha-2")


# -- config and command line ----------------------------------------------------------------


def test_config_validation_and_flags() -> None:
    with pytest.raises(ValueError, match="none of"):
        BenchConfig(max_new_tokens=8, checkpoints=(8, 16))
    with pytest.raises(ValueError, match="GSM8K has only"):
        BenchConfig(task="gsm8k", split="dev")
    with pytest.raises(ValueError, match="served_model"):
        BenchConfig(base_url="http://localhost:8000/v1")
    with pytest.raises(ValueError, match="thresholds"):
        BenchConfig(thresholds=(0.5, 1.5))
    parser = argparse.ArgumentParser(prog="capeval")
    add_bench_command(parser.add_subparsers(dest="command"))
    ns = parser.parse_args(["bench", "--task", "gsm8k", "--max-prompts", "5", "--keep-ratios", "0.5"])
    cfg = config_from_args(BenchConfig, ns)
    assert (cfg.task, cfg.max_prompts, cfg.keep_ratios, cfg.max_new_tokens) == ("gsm8k", 5, (0.5,), 384)
    assert cfg.output_dir == "results/bench/gsm8k-test"
    assert graph_policy(cfg, "adaptive", threshold=0.9, anneal=False).anneal_samples == 0


# -- one real run, then a resume ------------------------------------------------------------


def test_end_to_end_run_writes_everything_and_resumes(engine: Any, tmp_path: Path, monkeypatch: Any) -> None:
    settings: dict[str, Any] = {
        "families": ("add1",),
        "pool_size": 4,
        "max_new_tokens": 12,
        "checkpoints": (4, 8),
        "anneal_samples": 2,  # annealed temperatures 0.4, 0.6, 0.8, 0.8: the last two are the fixed pool's samples
        "thresholds": (0.0, 0.5, 1.0),
        "judge_max_new_tokens": 4,
        "live_prompts": 1,
        "live_strategies": ("single_sample", "best_of_n", "adaptive", "prune", "adaptive_prune"),
        "live_accept_threshold": 1.0,  # draw the whole schedule live, through the shared samples
        "bootstrap_iterations": 200,
        "output_dir": str(tmp_path),
        "progress": False,
    }
    config = BenchConfig(max_prompts=2, **settings)
    results = run_benchmark(config, engine=engine)

    for name in ("results.json", "results.md", "collection.json", "live.jsonl"):
        assert (tmp_path / name).is_file(), name
    for name in ("accuracy_vs_samples.png", "accuracy_vs_tokens.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "results.json").read_text())["prompts"] == 2
    assert "## Adaptive sampling" in (tmp_path / "results.md").read_text()

    lines = (tmp_path / POOLS_FILE).read_text().splitlines()
    pools = [PromptPool.from_dict(json.loads(line)["pool"]) for line in lines]
    tasks = {t.id: t for t in load_tasks(config)}
    assert [p.task_id for p in pools] == list(tasks)
    for pool in pools:
        task = tasks[pool.task_id]
        assert [s.temperature for s in pool.fixed] == [0.8] * 4
        assert [round(s.temperature, 6) for s in pool.annealed] == [0.4, 0.6, 0.8, 0.8]
        assert [s.text for s in pool.annealed[2:]] == [s.text for s in pool.fixed[2:]]
        assert pool.greedy.temperature == 0.0
        for s in (*pool.fixed, *pool.annealed):
            assert s.correct == check(task, s.text) and s.answer == answer_key(task, s.text)
            assert set(s.p_at) == {c for c in (4, 8) if s.num_tokens > c}  # paused only while generating
            assert all(s.tokens_at[c] == c and s.text.startswith(s.text_at[c]) for c in s.p_at)
            assert 0.0 <= s.p_final <= 1.0 and set(s.text_at) == set(s.p_at)
        for s in pool.fixed:
            assert s.judge_score is not None and 0.0 <= s.judge_score <= 10.0 and s.judge_tokens
            assert s.self_certainty is not None and s.self_certainty > 0.0

    points = {p["label"]: p for p in results["points"]}
    bo4 = points["best_of_n_selfeval/n=4"]
    assert bo4["avg_samples"] == 4 and bo4["prompts"] == 2
    expected_eval = sum(s.final_eval_tokens for p in pools for s in p.fixed) / 2
    assert bo4["avg_eval_tokens"] == pytest.approx(expected_eval)
    assert points["adaptive/threshold=0.0"]["avg_samples"] == 1
    for p in results["points"]:
        if p["strategy"] in ("adaptive", "adaptive_fixed_t", "adaptive_prune"):  # no policy beats the oracle floor
            assert p["floor_samples"] is not None and p["avg_samples"] >= p["floor_samples"] - 1e-9, p
    assert results["unavailable"] == {}

    live = results["live"]
    assert live["prompts"] == 1 and len(live["strategies"]) == 5
    for label, s in live["strategies"].items():
        assert s["exact_matches"] == 1, (label, s)  # the live graph drew the recorded samples and chose the same
        assert s["wall_time_s"] > 0

    # resume: one more prompt, after a run cut off in the middle of writing a line
    with (tmp_path / POOLS_FILE).open("a") as f:
        f.write('{"config_hash": "torn')
    submitted: list[str] = []
    real_submit = engine.submit

    def counting_submit(*args: Any, **kwargs: Any) -> Any:
        submitted.append(kwargs["request_id"])
        return real_submit(*args, **kwargs)

    monkeypatch.setattr(engine, "submit", counting_submit)
    more = run_benchmark(BenchConfig(max_prompts=3, **settings), engine=engine)
    new_id = list(load_tasks(BenchConfig(max_prompts=3, **settings)))[2].id
    assert submitted and all(r.endswith(new_id) or f":{new_id}:" in r for r in submitted), submitted
    assert more["prompts"] == 3
    assert (tmp_path / POOLS_FILE).read_text().splitlines()[:2] == lines

    with pytest.raises(PoolFileMismatchError, match="pool_size"):
        run_benchmark(BenchConfig(max_prompts=3, **{**settings, "pool_size": 3}), engine=engine)
