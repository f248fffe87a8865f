"""Routing of the adaptive-compute graph, on real runs of the embedded model."""

from __future__ import annotations

import time
from typing import Any

import pytest

from langchain_capeval.config import CapEvalConfig
from langchain_capeval.graph import build_graph, new_sample, pause_checkpoint, stop_reason

QUESTION = [{"role": "user", "content": "What is 3 + 4?"}]


def run(engine: Any, **policy: Any) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Run the graph once; return the final state and the streamed progress events."""
    cfg = CapEvalConfig(**{"max_new_tokens": 24, "seed": 11, **policy})
    events: list[dict[str, Any]] = []
    final: dict[str, Any] = {}
    for mode, chunk in build_graph(engine, cfg).stream({"messages": QUESTION}, stream_mode=["custom", "values"]):
        if mode == "custom":
            events.append(chunk)
        else:
            final = chunk
    assert engine.live_rows == 0, "the request must be released when the graph ends"
    return final, events


def expected_pick(samples: list[dict[str, Any]]) -> int:
    """The sample best-of-N returns: the highest score, copies of one text ranked by their earliest copy."""
    first: dict[str, dict[str, Any]] = {}
    for s in samples:
        first.setdefault(s["text"], s)
    return max(first.values(), key=lambda s: (s["score"], -s["index"]))["index"]


def test_met_threshold_accepts_after_one_sample(engine: Any) -> None:
    final, events = run(engine, accept_threshold=0.0)
    assert len(final["samples"]) == 1
    assert final["stop_reason"] == "threshold_met"
    assert [e["event"] for e in events] == ["sampling", "scored", "accepted"]
    assert final["answer"] == final["samples"][0]["text"]
    assert final["trace"] == events


def test_unmet_threshold_resamples_with_annealing_until_the_sample_budget(engine: Any) -> None:
    final, events = run(engine, accept_threshold=1.0, max_samples=4, initial_temperature=0.2, temperature=1.0)
    assert len(final["samples"]) == 4
    assert final["stop_reason"] == "max_samples"
    temps = [s["temperature"] for s in final["samples"]]
    assert temps == sorted(temps) and temps[0] == pytest.approx(0.2) and temps[-1] > temps[0]
    assert [e["event"] for e in events if e["event"].endswith("sampling")] == ["sampling", "resampling", "resampling"]
    assert final["answer_index"] == expected_pick(final["samples"])


def test_token_budget_is_never_exceeded(engine: Any) -> None:
    final, _ = run(engine, accept_threshold=1.0, max_total_tokens=150)
    spent = final["usage"]["generated_tokens"] + final["usage"]["self_eval_tokens"]
    assert spent <= 150
    assert final["stop_reason"] == "max_total_tokens"
    assert len(final["samples"]) >= 1


def test_deadline_holds(engine: Any) -> None:
    start = time.monotonic()
    final, events = run(engine, accept_threshold=1.0, deadline_s=1.5, max_new_tokens=400)
    elapsed = time.monotonic() - start
    assert final["stop_reason"] == "deadline"
    assert elapsed < 1.5 * 1.1 + 1.0, elapsed  # a decode step, the final bookkeeping and the graph overhead
    assert any(e["event"] == "deadline" for e in events)


def test_pruning_keeps_the_top_k_by_score(engine: Any) -> None:
    final, events = run(engine, strategy="prune", num_samples=4, keep_ratio=0.5, prune_checkpoints=(6,))
    scored_at_checkpoint = {
        e["sample"]: e["p_win_or_tie"] for e in events if e["event"] == "scored" and e["tokens"] == 6
    }
    pruned = next(e for e in events if e["event"] == "pruned")
    unfinished = sorted(scored_at_checkpoint, key=lambda i: -scored_at_checkpoint[i])
    assert pruned["kept"] == sorted(unfinished[: max(1, (len(unfinished) + 1) // 2)])
    assert pruned["pruned"] == len(unfinished) - len(pruned["kept"])
    pruned_ids = {s["index"] for s in final["samples"] if s["pruned"]}
    assert pruned_ids == set(unfinished) - set(pruned["kept"])
    assert all(s["num_tokens"] == 6 for s in final["samples"] if s["pruned"])  # they stopped at the checkpoint


def test_best_of_n_returns_the_highest_scored_sample(engine: Any) -> None:
    final, _ = run(engine, strategy="best_of_n", num_samples=4)
    assert len(final["samples"]) == 4 and final["stop_reason"] == "best_of_n"
    best = final["samples"][expected_pick(final["samples"])]
    assert final["answer_index"] == best["index"] and final["answer"] == best["text"]


def test_copies_of_one_response_resolve_to_the_earliest_whatever_batch_scored_them(engine: Any) -> None:
    # Greedy samples are copies of one response; scored in batches of 1, 2 and 3 rows, their
    # P(win or tie) differ in the last float bits (here by up to 3e-6). The graph treats them as one
    # response: the earliest copy is returned, not whichever copy the rounding favoured.
    greedy = {"initial_temperature": 0.0, "temperature": 0.0, "accept_threshold": 1.0}
    final, _ = run(engine, max_samples=6, batch_schedule=(1, 2, 3), **greedy)
    assert len({s["text"] for s in final["samples"]}) == 1 and len(final["samples"]) == 6
    assert final["answer_index"] == 0
    final, _ = run(engine, strategy="best_of_n", num_samples=4, temperature=0.0)
    assert final["answer_index"] == 0


def test_the_threshold_reads_the_score_of_the_copy_accept_returns() -> None:
    def finished(index: int, text: str, score: float) -> dict[str, Any]:
        return {
            "index": index,
            "row": index,
            "batch": index,
            "temperature": 0.4,
            "text": text,
            "num_tokens": 9,
            "finished": True,
            "finish_reason": "eos",
            "score": score,
            "scored_at": 9,
            "pruned": False,
        }

    cfg = CapEvalConfig(accept_threshold=0.7, max_samples=8)
    state: Any = {"samples": [finished(0, "7", 0.6999999), finished(1, "7", 0.7000002)], "batches_drawn": 2}
    assert stop_reason(state, cfg, eval_tokens=28) is None  # the earliest copy, the one returned, is below it
    state["samples"].append(finished(2, "8", 0.7000001))
    assert stop_reason(state, cfg, eval_tokens=28) == "threshold_met"


def test_generation_pauses_at_the_next_pruning_checkpoint_past_the_shortest_sample() -> None:
    def batch(*lengths: int) -> list[Any]:
        return [{**new_sample(i, i, 0, 0.4), "num_tokens": n} for i, n in enumerate(lengths)]

    prune = CapEvalConfig(strategy="prune", num_samples=4, prune_checkpoints=(8, 32))
    assert pause_checkpoint(batch(0, 0, 0, 0), prune) == 8
    assert pause_checkpoint(batch(8, 8, 8), prune) == 32
    assert pause_checkpoint(batch(32, 9), prune) == 32  # the shortest sample sets the checkpoint
    assert pause_checkpoint(batch(32, 32), prune) is None  # past the last checkpoint: to the end
    assert pause_checkpoint(batch(0), prune) is None  # nothing to prune a lone sample against
    adaptive_prune = prune.model_copy(update={"strategy": "adaptive_prune"})
    assert pause_checkpoint(batch(0, 0), adaptive_prune) == 8
    for strategy in ("adaptive", "best_of_n"):
        assert pause_checkpoint(batch(0, 0), prune.model_copy(update={"strategy": strategy})) is None


def test_pruning_keeps_the_earliest_copies_of_one_prefix(engine: Any) -> None:
    final, events = run(
        engine, strategy="prune", num_samples=4, temperature=0.0, keep_ratio=0.5, prune_checkpoints=(6,)
    )
    pruned = next(e for e in events if e["event"] == "pruned")
    assert pruned["kept"] == [0, 1] and final["answer_index"] == 0


def test_graph_has_the_method_nodes_and_draws_offline(engine: Any, tmp_path: Any) -> None:
    g = build_graph(engine).get_graph()
    assert {"start", "generate", "self_evaluate", "prune", "accept"} <= set(g.nodes)
    mermaid = g.draw_mermaid()
    assert "self_evaluate -.-> prune" in mermaid and "prune --> generate" in mermaid
    png = g.draw_png()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_state_is_json_serialisable(engine: Any) -> None:
    import json

    final, _ = run(engine, accept_threshold=0.0)
    assert json.loads(json.dumps(final))["answer"] == final["answer"]
