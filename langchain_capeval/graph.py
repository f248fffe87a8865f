"""The adaptive-compute state machine as a LangGraph graph.

::

    start -> generate -> self_evaluate -> accept
                ^  |            |
                |  +-(deadline)-+-> accept
                +---- prune <---+  (at a pruning checkpoint)
                +---------------+  (no sample good enough, budget left: resample)

Nodes are thin: they call the engine and the pure decision functions of
:mod:`langchain_capeval.policy`, and return a partial state update. Routers
read state only. The state is JSON-serialisable (texts, token counts, scores,
temperatures, decisions); KV caches stay in the engine, keyed by row id.
Settings come from the run's context (a :class:`CapEvalConfig`), falling back
to the config the graph was built with. The loop is bounded by the budget and
the batch schedule, never by the recursion limit. Progress is streamed as
custom events (``stream_mode="custom"``).

Example:
    >>> from langchain_capeval.graph import build_graph
    >>> graph = build_graph(engine)  # doctest: +SKIP
    >>> out = graph.invoke({"messages": [{"role": "user", "content": "What is 3 + 4?"}]})  # doctest: +SKIP
    >>> out["answer"], out["stop_reason"]  # doctest: +SKIP
    ('3 + 4 = 7', 'threshold_met')

"""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Sequence
from typing import Annotated, Any, Literal, TypedDict, cast

from langgraph.config import get_stream_writer
from langgraph.graph import END, START, StateGraph
from langgraph.graph.state import CompiledStateGraph
from langgraph.runtime import Runtime

from langchain_capeval.config import CapEvalConfig
from langchain_capeval.engines.base import Engine, Sample
from langchain_capeval.errors import BudgetTooSmallError
from langchain_capeval.policy import (
    BatchPlan,
    StopReason,
    best_of_n,
    budget_stop_reason,
    plan_next_batch,
    prune_survivors,
    threshold_met,
)
from langchain_capeval.sampling import SamplingParams


class SampleRecord(TypedDict):
    """One sample as the graph sees it (no tensors: the cache stays in the engine)."""

    index: int
    """Order in which the sample was drawn (0-based)."""
    row: int
    """Engine row id."""
    batch: int
    """Batch the sample was drawn in."""
    temperature: float
    text: str
    num_tokens: int
    finished: bool
    finish_reason: str | None
    score: float | None
    """Latest self-evaluation, P(win or tie)."""
    scored_at: int | None
    """Generated tokens when last self-evaluated."""
    pruned: bool


def merge_samples(old: list[SampleRecord], new: list[SampleRecord]) -> list[SampleRecord]:
    """Reducer: records with a known index replace the old ones; new indices are appended."""
    by_index = {s["index"]: s for s in old}
    for s in new:
        by_index[s["index"]] = s
    return [by_index[i] for i in sorted(by_index)]


class CapEvalState(TypedDict, total=False):
    """State of one request."""

    messages: list[dict[str, str]]
    """Input: chat messages as ``{"role", "content"}`` dicts."""
    stop: list[str]
    """Input: stop strings."""
    request_id: str
    prompt_ids: list[int]
    seed: int
    deadline_at: float | None
    """:func:`time.monotonic` value after which sampling stops."""
    batches_drawn: int
    samples: Annotated[list[SampleRecord], merge_samples]
    usage: dict[str, float]
    trace: Annotated[list[dict[str, Any]], lambda a, b: a + b]
    """Decision trace: every progress event, in order."""
    stop_reason: StopReason | None
    answer: str
    answer_index: int | None


def _emit(event: dict[str, Any]) -> list[dict[str, Any]]:
    """Stream a progress event (``stream_mode="custom"``) and return it for the trace."""
    get_stream_writer()(event)
    return [event]


def active_samples(state: CapEvalState) -> list[SampleRecord]:
    """Samples still generating: not finished, not pruned (the graph's nodes and the benchmark's replay)."""
    return [s for s in state.get("samples", []) if not s["finished"] and not s["pruned"]]


def tokens_spent(state: CapEvalState) -> int:
    """Tokens the request has spent so far: generated plus self-evaluation tokens."""
    u = state.get("usage", {})
    return int(u.get("generated_tokens", 0) + u.get("self_eval_tokens", 0))


def next_batch(state: CapEvalState, config: CapEvalConfig, eval_tokens: int) -> BatchPlan:
    """The batch to draw now: its size, annealed temperatures and token cap.

    :func:`~langchain_capeval.policy.plan_next_batch` on the request's state; only called when the
    router resamples, which it does only when a batch fits the budget.
    """
    plan = plan_next_batch(
        config,
        batches_drawn=state["batches_drawn"],
        samples_drawn=len(state.get("samples", [])),
        tokens_spent=tokens_spent(state),
        eval_tokens=eval_tokens,
    )
    assert plan is not None, "the router only resamples when a batch fits the budget"
    return plan


def new_sample(index: int, row: int, batch: int, temperature: float) -> SampleRecord:
    """The record of a sample just submitted: nothing generated, not scored, not pruned."""
    return SampleRecord(
        index=index,
        row=row,
        batch=batch,
        temperature=temperature,
        text="",
        num_tokens=0,
        finished=False,
        finish_reason=None,
        score=None,
        scored_at=None,
        pruned=False,
    )


def pause_checkpoint(records: Sequence[SampleRecord], config: CapEvalConfig) -> int | None:
    """Where generation pauses for mid-generation self-evaluation: the next pruning checkpoint, or ``None``.

    Pruning strategies pause a batch of two or more at the first checkpoint past the shortest
    sample's length; a lone sample, or any other strategy, generates to the end.
    """
    if config.strategy not in ("prune", "adaptive_prune") or len(records) < 2:
        return None
    done = min(r["num_tokens"] for r in records)
    return next((c for c in config.prune_checkpoints if c > done), None)


def best_scored(samples: Sequence[SampleRecord]) -> SampleRecord:
    """The sample best-of-N returns among ``samples`` (:func:`~langchain_capeval.policy.best_of_n`).

    The highest self-evaluation wins, unscored samples rank last, copies of one response count as the earliest.
    """
    scores = [s["score"] if s["score"] is not None else -1.0 for s in samples]
    return samples[best_of_n(scores, responses=[s["text"] for s in samples])]


def pruning_survivors(active: Sequence[SampleRecord], keep_ratio: float) -> set[int]:
    """Positions in ``active`` kept at a pruning checkpoint (:func:`~langchain_capeval.policy.prune_survivors`)."""
    return set(prune_survivors([s["score"] or 0.0 for s in active], keep_ratio, responses=[s["text"] for s in active]))


def _best_finished_score(state: CapEvalState) -> float | None:
    """The score of the finished sample ``accept`` would return."""
    scored = [s for s in state.get("samples", []) if s["finished"] and s["score"] is not None]
    return best_scored(scored)["score"] if scored else None


def stop_reason(state: CapEvalState, config: CapEvalConfig, eval_tokens: int) -> StopReason | None:
    """Why sampling should stop now, or ``None`` to draw another batch (pure)."""
    if state.get("stop_reason") == "deadline":
        return "deadline"
    if config.strategy in ("adaptive", "adaptive_prune") and threshold_met(_best_finished_score(state), config):
        return "threshold_met"
    return budget_stop_reason(
        config,
        batches_drawn=state.get("batches_drawn", 0),
        samples_drawn=len(state.get("samples", [])),
        tokens_spent=tokens_spent(state),
        eval_tokens=eval_tokens,
    )


def route_after_generate(state: CapEvalState) -> Literal["self_evaluate", "accept"]:
    """Self-evaluate what was generated, unless the deadline passed."""
    return "accept" if state.get("stop_reason") == "deadline" else "self_evaluate"


def route_after_self_evaluation(
    state: CapEvalState, config: CapEvalConfig, eval_tokens: int
) -> Literal["prune", "generate", "accept"]:
    """Prune at a checkpoint; otherwise accept if a stop condition holds, else resample (pure)."""
    if state.get("stop_reason") == "deadline":
        return "accept"
    if active_samples(state):
        return "prune"
    return "accept" if stop_reason(state, config, eval_tokens) else "generate"


class CapEvalNodes:
    """The graph's nodes, bound to one engine. Each returns a partial state update."""

    def __init__(self, engine: Engine, config: CapEvalConfig) -> None:
        self.engine = engine
        self.config = config
        self.eval_tokens = len(engine.chat_format.self_evaluation_suffix) + 1

    def settings(self, runtime: Runtime[CapEvalConfig] | None) -> CapEvalConfig:
        """The run's config: the fields the context sets, over the graph's default (which may hold an adapter's)."""
        ctx = runtime.context if runtime is not None else None
        if ctx is None:
            return self.config
        return self.config.merged(ctx.model_dump(exclude_unset=True) if isinstance(ctx, CapEvalConfig) else dict(ctx))

    def _usage(self, state: CapEvalState) -> dict[str, float]:
        u = self.engine.usage(state["request_id"])
        return {
            "prompt_tokens": u.prompt_tokens,
            "generated_tokens": u.generated_tokens,
            "self_eval_tokens": u.self_eval_tokens,
            "wall_time_s": u.wall_time_s,
            "cached_prompt_tokens": u.cached_prompt_tokens,
        }

    def start(self, state: CapEvalState, runtime: Runtime[CapEvalConfig]) -> CapEvalState:
        """Encode the messages; fix the request id, the seed and the deadline.

        Raises:
            BudgetTooSmallError: ``max_total_tokens`` cannot fit one sample of one token and its self-evaluation.

        """
        cfg = self.settings(runtime)
        first = plan_next_batch(cfg, batches_drawn=0, samples_drawn=0, tokens_spent=0, eval_tokens=self.eval_tokens)
        if first is None:  # only a token budget can leave no room for a first sample
            raise BudgetTooSmallError(cfg.max_total_tokens or 0, 1 + self.eval_tokens)
        seed = cfg.seed if cfg.seed is not None else random.SystemRandom().randrange(2**31)
        deadline = time.monotonic() + cfg.deadline_s if cfg.deadline_s is not None else None
        return {
            "request_id": state.get("request_id") or uuid.uuid4().hex,
            "prompt_ids": self.engine.chat_format.encode(state["messages"]),
            "seed": seed,
            "deadline_at": deadline,
            "batches_drawn": 0,
            "stop_reason": None,
        }

    def generate(self, state: CapEvalState, runtime: Runtime[CapEvalConfig]) -> CapEvalState:
        """Continue the active samples to the next checkpoint, or draw the next batch at an annealed temperature."""
        cfg = self.settings(runtime)
        active = active_samples(state)
        update: CapEvalState = {}
        trace: list[dict[str, Any]] = []
        if active:
            records = active
        else:
            drawn = len(state.get("samples", []))
            plan = next_batch(state, cfg, self.eval_tokens)
            params = [
                SamplingParams(
                    temperature=t,
                    top_p=cfg.top_p,
                    max_new_tokens=plan.max_new_tokens,
                    stop=tuple(state.get("stop", ())),
                    seed=(state["seed"] + 7919 * (drawn + i)) % 2**31,
                )
                for i, t in enumerate(plan.temperatures)
            ]
            rows = self.engine.submit(state["prompt_ids"], params, request_id=state["request_id"])
            batch = state["batches_drawn"]
            records = [
                new_sample(drawn + i, r, batch, t) for i, (r, t) in enumerate(zip(rows, plan.temperatures, strict=True))
            ]
            update["batches_drawn"] = batch + 1
            trace += _emit(
                {
                    "event": "sampling" if batch == 0 else "resampling",
                    "batch": batch,
                    "samples": plan.size,
                    "temperatures": [round(t, 4) for t in plan.temperatures],
                    "max_new_tokens": plan.max_new_tokens,
                }
            )
        until = pause_checkpoint(records, cfg)
        samples = self.engine.generate([r["row"] for r in records], until=until, deadline=state.get("deadline_at"))
        update["samples"] = [_with_sample(r, s) for r, s in zip(records, samples, strict=True)]
        update["usage"] = self._usage(state)
        deadline = state.get("deadline_at")
        if deadline is not None and time.monotonic() >= deadline:
            update["stop_reason"] = "deadline"
            trace += _emit({"event": "deadline", "after_s": cfg.deadline_s})
        update["trace"] = trace
        return update

    def self_evaluate(self, state: CapEvalState, runtime: Runtime[CapEvalConfig]) -> CapEvalState:
        """Ask the model, for each unscored sample, whether it would do better by starting over."""
        todo = [s for s in state["samples"] if not s["pruned"] and s["scored_at"] != s["num_tokens"]]
        evals = self.engine.self_evaluate([s["row"] for s in todo])
        records: list[SampleRecord] = []
        trace: list[dict[str, Any]] = []
        for s, e in zip(todo, evals, strict=True):
            records.append(_updated(s, score=e.p_win_or_tie, scored_at=s["num_tokens"]))
            trace += _emit(
                {
                    "event": "scored",
                    "sample": s["index"],
                    "p_win_or_tie": round(e.p_win_or_tie, 6),
                    "temperature": s["temperature"],
                    "tokens": s["num_tokens"],
                    "finished": s["finished"],
                }
            )
        update: CapEvalState = {"samples": records, "usage": self._usage(state), "trace": trace}
        deadline = state.get("deadline_at")
        if deadline is not None and time.monotonic() >= deadline:
            update["stop_reason"] = "deadline"
        return update

    def prune(self, state: CapEvalState, runtime: Runtime[CapEvalConfig]) -> CapEvalState:
        """Keep the top ``keep_ratio`` of the active samples by self-evaluation; release the others."""
        cfg = self.settings(runtime)
        active = active_samples(state)
        keep = pruning_survivors(active, cfg.keep_ratio)
        dropped = [s for i, s in enumerate(active) if i not in keep]
        self.engine.release([s["row"] for s in dropped])
        trace = _emit(
            {
                "event": "pruned",
                "pruned": len(dropped),
                "of": len(active),
                "at_tokens": max(s["num_tokens"] for s in active),
                "kept": [s["index"] for i, s in enumerate(active) if i in keep],
            }
        )
        return {"samples": [_updated(s, pruned=True) for s in dropped], "trace": trace}

    def accept(self, state: CapEvalState, runtime: Runtime[CapEvalConfig]) -> CapEvalState:
        """Return the best-scored sample (best-of-N over everything drawn) and free the request."""
        cfg = self.settings(runtime)
        reason = stop_reason(state, cfg, self.eval_tokens) or "schedule_done"
        candidates = [s for s in state.get("samples", []) if s["finished"] and not s["pruned"]]
        if not candidates:  # deadline before any sample finished: the best partial one
            candidates = [s for s in state.get("samples", []) if not s["pruned"]]
        usage = self._usage(state)
        self.engine.close_request(state["request_id"])
        if not candidates:
            trace = _emit({"event": "accepted", "sample": None, "reason": reason, "samples": 0})
            return {"answer": "", "answer_index": None, "stop_reason": reason, "usage": usage, "trace": trace}
        pick = best_scored(candidates)
        trace = _emit(
            {
                "event": "accepted",
                "sample": pick["index"],
                "p_win_or_tie": pick["score"],
                "reason": reason,
                "samples": len(state.get("samples", [])),
            }
        )
        return {
            "answer": pick["text"],
            "answer_index": pick["index"],
            "stop_reason": reason,
            "usage": usage,
            "trace": trace,
        }

    def route_after_self_evaluation(
        self, state: CapEvalState, runtime: Runtime[CapEvalConfig]
    ) -> Literal["prune", "generate", "accept"]:
        """Router: see :func:`route_after_self_evaluation`."""
        return route_after_self_evaluation(state, self.settings(runtime), self.eval_tokens)


def _updated(record: SampleRecord, **changes: Any) -> SampleRecord:
    """A copy of ``record`` with ``changes`` (state is never mutated in place)."""
    return cast(SampleRecord, {**record, **changes})


def _with_sample(record: SampleRecord, sample: Sample) -> SampleRecord:
    return _updated(
        record,
        text=sample.text,
        num_tokens=sample.num_tokens,
        finished=sample.finished,
        finish_reason=sample.finish_reason,
    )


def build_graph(engine: Engine, config: CapEvalConfig | None = None) -> CompiledStateGraph[Any, Any, Any, Any]:
    """The adaptive-compute graph over ``engine``.

    ``config`` is the default policy, overridable per run through the run's ``context``.
    """
    nodes = CapEvalNodes(engine, config or CapEvalConfig())
    graph = StateGraph(CapEvalState, context_schema=CapEvalConfig)
    graph.add_node("start", nodes.start)
    graph.add_node("generate", nodes.generate)
    graph.add_node("self_evaluate", nodes.self_evaluate)
    graph.add_node("prune", nodes.prune)
    graph.add_node("accept", nodes.accept)
    graph.add_edge(START, "start")
    graph.add_edge("start", "generate")
    graph.add_conditional_edges("generate", route_after_generate, ["self_evaluate", "accept"])
    graph.add_conditional_edges("self_evaluate", nodes.route_after_self_evaluation, ["prune", "generate", "accept"])
    graph.add_edge("prune", "generate")
    graph.add_edge("accept", END)
    # The budget and the batch schedule bound the loop; the recursion limit must never be what stops it.
    return graph.compile(checkpointer=False, name="capeval").with_config(recursion_limit=_STEP_LIMIT)


_STEP_LIMIT = 100_000
