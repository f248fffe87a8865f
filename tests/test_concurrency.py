"""Concurrent requests on one engine: shared decode steps, no crossed results, cancellation frees rows.

Every test runs the real embedded model. Concurrency is real too: OS threads and asyncio
tasks calling one shared :class:`TransformersEngine`, whose scheduler thread batches the
rows of every pending ``generate`` call into each decode step.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from langchain_capeval import ChatCapEval
from langchain_capeval.chat_format import ChatFormat
from langchain_capeval.engines.scheduler import DecodeCall, StepScheduler
from langchain_capeval.engines.transformers import TransformersEngine
from langchain_capeval.errors import EngineClosedError, RequestCancelledError, UnknownRowError
from langchain_capeval.sampling import SamplingParams

PROMPTS = [
    "What is 3 + 4?",
    "Name a color.",
    "What is the capital of Italy?",
    "Say hello.",
    "What is 9 - 2?",
    "Name an animal.",
    "What is 5 + 5?",
    "Name a fruit.",
]


def encode(chat_format: ChatFormat, text: str) -> list[int]:
    return chat_format.encode([{"role": "user", "content": text}])


def run_alone(engine: TransformersEngine, prompt: list[int], seed: int, until: int) -> list[int]:
    rows = engine.submit(prompt, [SamplingParams(temperature=0.8, seed=seed, max_new_tokens=until)])
    out = engine.generate(rows)
    engine.close_request(out[0].request_id)
    return out[0].token_ids


def in_threads(fns: list[Callable[[], Any]]) -> list[Any]:
    """Run ``fns`` in as many threads, released together by a barrier; results in order."""
    barrier = threading.Barrier(len(fns))

    def go(fn: Callable[[], Any]) -> Any:
        barrier.wait()
        return fn()

    with ThreadPoolExecutor(len(fns)) as pool:
        return list(pool.map(go, fns))


def wait_for(predicate: Callable[[], bool], timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "timed out waiting"
        time.sleep(0.005)


# -- the scheduler alone (no model) ------------------------------------------------------------


def test_batched_commands_share_one_handler_call_and_fail_alone() -> None:
    calls: list[list[int]] = []
    gate = threading.Event()

    def step(calls_: list[DecodeCall]) -> None:
        gate.wait(5)  # hold the worker in a step while the items queue up
        for c in calls_:
            c.finish(None)

    def handler(items: list[int]) -> list[Any]:
        calls.append(items)
        return [ValueError(f"bad {i}") if i < 0 else i * 10 for i in items]

    sched = StepScheduler(step, name="test-batched")
    with ThreadPoolExecutor(5) as pool:
        blocker = pool.submit(sched.decode, DecodeCall(rows=[0]))
        wait_for(lambda: sched.steps == 1)
        futures = [pool.submit(sched.run_batched, handler, i) for i in (1, 2, -3, 4)]
        wait_for(lambda: len(sched._batched) == 4)
        gate.set()
        blocker.result(5)
        assert [f.result(5) for f in futures if not f.exception(5)] == [10, 20, 40]
        assert "bad -3" in str(futures[2].exception(5))
    assert calls == [[1, 2, -3, 4]]  # one handler call served the four callers
    sched.close()


def test_scheduler_runs_commands_in_order_and_fails_only_the_failing_call() -> None:
    seen: list[int] = []

    def step(calls: list[DecodeCall]) -> None:
        for c in calls:
            if 13 in c.rows:
                c.fail(ValueError("row 13 is unlucky"))
            else:
                c.finish(sum(c.rows))

    sched = StepScheduler(step, name="test")
    assert [sched.run(lambda i=i: seen.append(i) or i) for i in range(3)] == [0, 1, 2]
    assert seen == [0, 1, 2]
    with pytest.raises(ValueError, match="unlucky"):
        sched.decode(DecodeCall(rows=[13]))
    assert sched.decode(DecodeCall(rows=[1, 2])) == 3  # the worker survived the failed call
    with pytest.raises(ZeroDivisionError):
        sched.run(lambda: 1 / 0)
    sched.close()
    with pytest.raises(EngineClosedError, match="closed"):
        sched.run(lambda: 0)


def test_the_longest_piece_of_work_counts_commands_and_handlers_not_only_steps() -> None:
    """``max_work_s`` (what a deadline may overrun by) covers prefills and self-evaluations, which are no steps."""
    sched = StepScheduler(lambda calls: [c.finish(None) for c in calls], name="test-work")
    sched.decode(DecodeCall(rows=[0]))
    assert sched.steps == 1 and sched.max_work_s >= sched.max_step_s  # a step is a piece of work too
    sched.run(lambda: time.sleep(0.1))
    assert sched.max_work_s >= 0.1 > sched.max_step_s
    sched.max_work_s = 0.0
    assert sched.run_batched(lambda items: [time.sleep(0.1) or i for i in items], 7) == 7
    assert sched.max_work_s >= 0.1 > sched.max_step_s
    sched.close()


# -- shared decode steps ---------------------------------------------------------------------


def test_concurrent_generate_calls_share_decode_steps_and_never_cross(
    engine: TransformersEngine, chat_format: ChatFormat
) -> None:
    prompts = [encode(chat_format, p) for p in PROMPTS]
    alone = [run_alone(engine, p, seed=100 + i, until=16) for i, p in enumerate(prompts)]
    steps_alone = engine.scheduler.steps

    before = engine.scheduler.steps
    engine.scheduler.max_calls_per_step = 0
    engine.scheduler.max_batched_items = 0
    together = in_threads([lambda p=p, i=i: run_alone(engine, p, 100 + i, 16) for i, p in enumerate(prompts)])
    steps_together = engine.scheduler.steps - before

    assert together == alone  # same seed, same tokens: nothing crossed between requests
    assert engine.scheduler.max_calls_per_step >= 4  # rows of several requests shared a forward pass
    assert engine.scheduler.max_batched_items >= 2  # and so did prefills of several requests
    assert steps_together < steps_alone / 2  # 8 requests of <= 15 decode steps each, mostly in common steps
    assert engine.live_rows == 0


def test_rows_pausing_at_different_checkpoints(engine: TransformersEngine, chat_format: ChatFormat) -> None:
    """Calls with different ``until`` share steps; each returns when its own rows reach its checkpoint."""
    prompt = encode(chat_format, "Write a long story about a dragon.")
    rows_a = engine.submit(prompt, [SamplingParams(seed=1, max_new_tokens=40)])
    rows_b = engine.submit(prompt, [SamplingParams(seed=2, max_new_tokens=40)])
    a, b = in_threads([lambda: engine.generate(rows_a, until=6), lambda: engine.generate(rows_b, until=20)])
    assert a[0].num_tokens == 6 or a[0].finished
    assert b[0].num_tokens == 20 or b[0].finished
    resumed = engine.generate(rows_a, until=20)
    assert resumed[0].token_ids[:6] == a[0].token_ids
    engine.close_request(a[0].request_id)
    engine.close_request(b[0].request_id)
    assert engine.live_rows == 0


async def test_asyncio_gather_matches_sequential(engine: TransformersEngine) -> None:
    llm = ChatCapEval(engine=engine, max_tokens=16, max_samples=2, accept_threshold=1.0, seed=11)
    sequential = [await llm.ainvoke(p) for p in PROMPTS[4:8]]
    gathered = await asyncio.gather(*(llm.ainvoke(p) for p in PROMPTS[4:8]))
    assert [m.content for m in gathered] == [m.content for m in sequential]
    assert engine.live_rows == 0


# -- cancellation ----------------------------------------------------------------------------


def test_cancel_fails_the_waiting_generate_and_later_submits(
    engine: TransformersEngine, chat_format: ChatFormat
) -> None:
    prompt = encode(chat_format, "Write a long story about a dragon.")
    baseline = engine.kv_cache_bytes
    rows = engine.submit(prompt, [SamplingParams(seed=s, max_new_tokens=400) for s in range(4)], request_id="doomed")
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(engine.generate, rows)
        wait_for(lambda: engine.sample(rows[0]).num_tokens >= 3)
        steps = engine.scheduler.steps
        engine.cancel("doomed")
        with pytest.raises(RequestCancelledError, match="doomed"):
            waiting.result(timeout=10)
    assert engine.scheduler.steps - steps <= 1  # freed before the next step (one may have been under way)
    assert engine.live_rows == 0
    assert engine.kv_cache_bytes == baseline
    with pytest.raises(RequestCancelledError):
        engine.submit(prompt, [SamplingParams()], request_id="doomed")
    with pytest.raises(UnknownRowError):
        engine.self_evaluate(rows)


async def test_cancelling_ainvoke_frees_its_rows_at_the_next_step(engine: TransformersEngine) -> None:
    llm = ChatCapEval(engine=engine, strategy="best_of_n", num_samples=4, max_tokens=400, seed=3)
    baseline = engine.kv_cache_bytes
    task = asyncio.create_task(llm.ainvoke("Write a long story about a dragon."))
    while engine.live_rows == 0:
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.3)  # mid-generation
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert engine.live_rows == 0  # the cancel ran (shielded) before CancelledError reached us
    assert engine.kv_cache_bytes == baseline
    # the engine keeps serving
    assert (await llm.ainvoke("Say hi.", max_tokens=4, num_samples=1)).content


async def test_cancelling_astream_frees_its_rows(engine: TransformersEngine) -> None:
    llm = ChatCapEval(engine=engine, strategy="best_of_n", num_samples=2, max_tokens=400, seed=5)

    async def consume() -> list[Any]:
        return [c async for c in llm.astream("Write a long story about a dragon.")]

    task = asyncio.create_task(consume())
    while engine.live_rows == 0:
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert engine.live_rows == 0
    assert engine.live_requests == 0
