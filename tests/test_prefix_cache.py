"""Prefix caching: the bookkeeping on small tensors, then the engine on the real model.

A prompt prefilled on top of a cached prefix must give what a full prefill gives: the
same self-evaluation (within 1e-4) and the same greedy continuation, alone and when
several prompts are prefilled together.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from langchain_capeval.chat_format import ChatFormat
from langchain_capeval.engines.kv_batch import KVBatch
from langchain_capeval.engines.prefix_cache import PrefixCache, shared_prefix_length
from langchain_capeval.engines.transformers import TransformersEngine
from langchain_capeval.sampling import SamplingParams

TOL = 1e-4


def prompt_cache(n: int, pads: tuple[int, ...] = ()) -> KVBatch:
    """A one-row cache of ``n`` real tokens; column ``c`` holds the value ``c``; ``pads`` are padding columns."""
    width = n + len(pads)
    kv = torch.arange(width, dtype=torch.float32).reshape(1, 1, width, 1).expand(1, 1, width, 2).contiguous()
    mask = torch.ones(1, width, dtype=torch.bool)
    mask[0, list(pads)] = False
    return KVBatch([-1], [kv], [kv.clone()], mask, torch.tensor([n]), width)


# -- bookkeeping ---------------------------------------------------------------------------------


def test_prefix_copies_the_columns_up_to_the_last_kept_token() -> None:
    source = prompt_cache(5, pads=(0, 3))  # columns: pad, t0, t1, pad, t2, t3, t4
    copy = source.prefix(3, extra_capacity=4)
    assert copy.length == 5 and copy.capacity == 9  # up to t2 (column 4), room for 4 more
    assert copy.mask[0, :5].tolist() == [False, True, True, False, True]
    assert copy.keys[0][0, 0, :5, 0].tolist() == [0, 1, 2, 3, 4]
    assert copy.next_pos.tolist() == [3]
    assert copy.keys[0].data_ptr() != source.keys[0].data_ptr()  # a copy: the source may be extended
    with pytest.raises(ValueError, match=r"tokens must be in \[1, 5\], got 6"):
        source.prefix(6)


def test_longest_prefix_picks_the_longest_and_stops_one_token_short() -> None:
    cache = PrefixCache(max_bytes=2**20, min_tokens=2)
    cache.add([1, 2, 3], prompt_cache(3))
    cache.add([1, 2, 3, 4, 5, 6], prompt_cache(6))
    batch, tokens = cache.longest_prefix([1, 2, 3, 4, 9])
    assert tokens == 4 and batch is not None and batch.capacity == 5
    _, tokens = cache.longest_prefix([1, 2, 3, 4, 5, 6])  # the whole prompt is cached
    assert tokens == 5, "the last prompt token is pushed again, for the first token's logits"
    live = [([7, 7, 7, 7], prompt_cache(4))]
    assert cache.longest_prefix([7, 7, 7, 1], live)[1] == 3
    assert cache.longest_prefix([1, 9, 9]) == (None, 0)  # 1 shared token < min_tokens
    assert (cache.hits, cache.reused_tokens) == (3, 12)
    assert shared_prefix_length([1, 2], [1, 2, 3]) == 2 and shared_prefix_length([], [1]) == 0


def test_the_least_recently_used_go_first_within_the_byte_budget() -> None:
    size = prompt_cache(4).nbytes
    cache = PrefixCache(max_bytes=2 * size, min_tokens=2)
    cache.add([1, 1, 1, 1], prompt_cache(4))
    cache.add([2, 2, 2, 2], prompt_cache(4))
    assert cache.longest_prefix([1, 1, 1, 5])[1] == 3  # [1, ...] is now the most recently used
    cache.add([3, 3, 3, 3], prompt_cache(4))  # over budget: [2, ...] goes
    assert len(cache) == 2 and cache.nbytes == 2 * size
    assert cache.longest_prefix([2, 2, 2, 5]) == (None, 0)
    assert cache.longest_prefix([1, 1, 1, 5])[1] == 3
    cache.add([3, 3, 3, 3], prompt_cache(4))  # the same prompt again replaces, not duplicates
    assert len(cache) == 2 and cache.nbytes == 2 * size
    cache.add([4] * 20, prompt_cache(20))  # larger than the whole budget: not kept, nothing evicted
    assert len(cache) == 2
    cache.clear()
    assert len(cache) == 0 and cache.nbytes == 0
    with pytest.raises(ValueError, match="max_bytes must be >= 0"):
        PrefixCache(max_bytes=-1)


# -- the engine ------------------------------------------------------------------------------------


def ask(chat_format: ChatFormat, question: str) -> list[int]:
    return chat_format.encode([{"role": "user", "content": question}])


def greedy_and_score(engine: TransformersEngine, prompt: list[int]) -> tuple[list[int], float, int]:
    """Greedy 8 tokens, then the self-evaluation; the request's cached prompt tokens."""
    rows = engine.submit(prompt, [SamplingParams(temperature=0.0, max_new_tokens=8)])
    sample = engine.generate(rows)[0]
    score = engine.self_evaluate(rows)[0].p_no
    usage = engine.close_request(sample.request_id)
    return sample.token_ids, score, usage.cached_prompt_tokens


def without_prefix_cache(engine: TransformersEngine, prompt: list[int]) -> tuple[list[int], float, int]:
    kept, engine.prefix_cache = engine.prefix_cache, None
    try:
        return greedy_and_score(engine, prompt)
    finally:
        engine.prefix_cache = kept


def test_a_prompt_on_a_cached_prefix_equals_a_full_prefill(engine: TransformersEngine, chat_format: ChatFormat) -> None:
    first = ask(chat_format, "Name a large animal.")
    second = ask(chat_format, "What is the capital of France?")
    system = shared_prefix_length(first, second)
    assert system >= 20, "the default system turn is shared"
    greedy_and_score(engine, first)  # its prompt cache is kept when the request closes
    tokens, p_no, cached = greedy_and_score(engine, second)
    assert cached >= system  # more if an earlier test's prompt also asked "What is the ..."
    ref_tokens, ref_p_no, ref_cached = without_prefix_cache(engine, second)
    assert ref_cached == 0
    assert tokens == ref_tokens
    assert p_no == pytest.approx(ref_p_no, abs=TOL)


def test_the_next_turn_of_a_conversation_reuses_the_whole_previous_prompt(
    engine: TransformersEngine, chat_format: ChatFormat
) -> None:
    turn = [{"role": "user", "content": "Say a color."}]
    first = chat_format.encode(turn)
    answer, _, _ = greedy_and_score(engine, first)
    reply = chat_format.decode([t for t in answer if t not in chat_format.eos_token_ids])
    turn += [{"role": "assistant", "content": reply}, {"role": "user", "content": "Another one."}]
    second = chat_format.encode(turn)
    assert second[: len(first)] == first
    tokens, p_no, cached = greedy_and_score(engine, second)
    assert cached >= len(first)
    assert (tokens, pytest.approx(p_no, abs=TOL)) == without_prefix_cache(engine, second)[:2]


def test_prompts_prefilled_together_on_cached_prefixes_equal_full_prefills(
    engine: TransformersEngine, chat_format: ChatFormat
) -> None:
    questions = ["What is 2 + 2?", "Name a planet.", "What color is grass?"]
    prompts = [ask(chat_format, q) for q in questions]
    system = shared_prefix_length(prompts[1], prompts[2])
    greedy_and_score(engine, ask(chat_format, "Hello!"))  # caches the system turn
    expected = [without_prefix_cache(engine, p)[:2] for p in prompts]

    # The scheduler is kept busy while the three submits queue up: they are prefilled in one batch.
    busy = threading.Thread(target=lambda: engine.scheduler.run(lambda: time.sleep(0.5)))
    busy.start()
    time.sleep(0.1)
    with ThreadPoolExecutor(3) as pool:
        rows = list(pool.map(lambda p: engine.submit(p, [SamplingParams(temperature=0.0, max_new_tokens=8)]), prompts))
    busy.join()
    for r, (ref_tokens, ref_p_no) in zip(rows, expected, strict=True):
        sample = engine.generate(r)[0]
        assert sample.token_ids == ref_tokens
        assert engine.self_evaluate(r)[0].p_no == pytest.approx(ref_p_no, abs=TOL)
        assert engine.close_request(sample.request_id).cached_prompt_tokens >= system


def test_closed_prompts_are_kept_and_cancelled_ones_are_not(
    engine: TransformersEngine, chat_format: ChatFormat
) -> None:
    assert engine.prefix_cache is not None
    prompt = ask(chat_format, "Write a haiku about autumn leaves.")
    rows = engine.submit(prompt, [SamplingParams(max_new_tokens=4, seed=0)], request_id="kept")
    engine.generate(rows)
    before = engine.kv_cache_bytes
    engine.close_request("kept")
    assert engine.live_rows == 0
    assert engine.prefix_cache.longest_prefix(prompt)[1] == len(prompt) - 1
    assert engine.kv_cache_bytes <= before  # the prompt cache moved; the rows were freed

    other = ask(chat_format, "Write a limerick about a cat.")
    baseline = engine.kv_cache_bytes
    engine.submit(other, [SamplingParams(max_new_tokens=4, seed=0)], request_id="dropped")
    engine.cancel("dropped")
    assert engine.kv_cache_bytes == baseline
    assert engine.prefix_cache.longest_prefix(other)[1] < len(other) - 1, (
        "a cancelled request's prompt is freed, not kept"
    )
