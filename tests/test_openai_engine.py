"""The OpenAI-compatible client engine against a real server over loopback (no mocked transport).

The server is `capeval serve`'s app over the session's transformers engine, in-process, so each
test can compare the client engine with the transformers engine on the same model and read the
server engine's live rows. Failure modes (a server down, a server answering 503, a server that
returns no logprobs) use a real stub server, also over loopback.

Tolerance of the self-evaluation comparison: the server scores from scratch (one forward pass
without a KV cache over the same token ids) while the transformers engine scores on its live KV
cache, so the two differ only by float32 rounding; measured differences are about 2e-6. The
tests allow 1e-4 for other BLAS builds and thread counts. In text mode the server re-tokenizes
the text; for these prompts the chat-template text round-trips to the same ids, so the same bound
holds (a response whose text re-tokenizes differently could differ more: token ids are the default).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

pytest.importorskip("fastapi")

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from langchain_capeval.chat_models import ChatCapEval
from langchain_capeval.config import CapEvalConfig
from langchain_capeval.engines.base import Engine
from langchain_capeval.engines.openai_client import REQUEST_ID_HEADER, OpenAICompatibleEngine, OpenAIEngineConfig
from langchain_capeval.engines.transformers import TransformersEngine
from langchain_capeval.errors import (
    PromptTooLongError,
    ServerConnectionError,
    ServerError,
    ServerFeatureError,
    ServerRequestError,
    UnknownRowError,
)
from langchain_capeval.sampling import SamplingParams
from langchain_capeval.server import BackgroundServer, create_app

TOL = 1e-4  # see the module docstring
QUESTION = [{"role": "user", "content": "What is 2 + 3?"}]
COUNTING = [{"role": "user", "content": "Count from 1 to 100, separated by commas."}]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def server(engine: TransformersEngine) -> Iterator[BackgroundServer]:
    with BackgroundServer(create_app(engine)) as srv:
        yield srv
    assert engine.live_rows == 0


def remote_engine(server: BackgroundServer, engine: TransformersEngine, **settings: Any) -> OpenAICompatibleEngine:
    config = OpenAIEngineConfig(base_url=f"{server.url}/v1", model=engine.model_name, **settings)
    remote = OpenAICompatibleEngine(config, engine.chat_format)
    remote.check_server()
    return remote


def server_health(server: BackgroundServer) -> dict[str, Any]:
    return dict(httpx.get(f"{server.url}/health", timeout=10).json())


def run_to_checkpoint(e: Engine, prompt: list[int], params: list[SamplingParams], k: int) -> dict[str, Any]:
    """Submit, generate to token k, self-evaluate, resume to the end, self-evaluate again, close."""
    rows = e.submit(prompt, params)
    at_k = e.generate(rows, until=k)
    mid = e.self_evaluate(rows)
    end = e.generate(rows)
    final = e.self_evaluate(rows)
    usage = e.close_request(at_k[0].request_id)
    return {"at_k": at_k, "mid": mid, "end": end, "final": final, "usage": usage}


@pytest.fixture(scope="module")
def greedy_reference(engine: TransformersEngine) -> dict[str, Any]:
    prompt = engine.chat_format.encode(QUESTION)
    return run_to_checkpoint(engine, prompt, [SamplingParams(temperature=0, max_new_tokens=12)], 5)


@pytest.mark.parametrize("prompt_format", ["token_ids", "text"])
def test_generation_and_self_evaluation_match_transformers(
    server: BackgroundServer, engine: TransformersEngine, greedy_reference: dict[str, Any], prompt_format: str
) -> None:
    with remote_engine(server, engine, prompt_format=prompt_format) as remote:
        prompt = engine.chat_format.encode(QUESTION)
        got = run_to_checkpoint(remote, prompt, [SamplingParams(temperature=0, max_new_tokens=12)], 5)
        ref = greedy_reference
        assert got["at_k"][0].num_tokens == 5 and not got["at_k"][0].finished  # paused at the checkpoint
        assert got["at_k"][0].token_ids == ref["at_k"][0].token_ids
        for name in ("end",):
            g, r = got[name][0], ref[name][0]
            assert (g.token_ids, g.text, g.finish_reason) == (r.token_ids, r.text, r.finish_reason)
        for name in ("mid", "final"):
            g, r = got[name][0], ref[name][0]
            assert g.num_tokens == r.num_tokens
            assert abs(g.p_win_or_tie - r.p_win_or_tie) < TOL
            assert abs(g.p_no - r.p_no) < TOL and abs(g.p_yes - r.p_yes) < TOL
        u, v = got["usage"], ref["usage"]
        assert (u.prompt_tokens, u.generated_tokens, u.self_eval_tokens) == (
            v.prompt_tokens,
            v.generated_tokens,
            v.self_eval_tokens,
        )
        assert remote.live_rows == 0


def test_seeded_sampling_and_stop_strings_match_transformers(
    server: BackgroundServer, engine: TransformersEngine
) -> None:
    prompt = engine.chat_format.encode(QUESTION)
    params = [
        SamplingParams(temperature=0.9, top_p=0.95, max_new_tokens=8, seed=7),
        SamplingParams(temperature=1.2, max_new_tokens=8, seed=8),
        SamplingParams(temperature=0, max_new_tokens=8, stop=(" =",)),
    ]
    with remote_engine(server, engine) as remote:
        rows = remote.submit(prompt, params)
        got = remote.generate(rows)
        remote.close_request(got[0].request_id)
    rows = engine.submit(prompt, params)
    want = engine.generate(rows)
    engine.close_request(want[0].request_id)
    for g, w in zip(got, want, strict=True):
        assert (g.token_ids, g.text, g.finish_reason) == (w.token_ids, w.text, w.finish_reason)
    assert got[2].finish_reason == "stop" and " =" not in got[2].text


def test_an_answer_outside_the_top_k_reads_as_zero_and_is_counted(
    server: BackgroundServer, engine: TransformersEngine, caplog: pytest.LogCaptureFixture
) -> None:
    """With the top 2 logprobs only, some self-evaluations see one answer and not the other."""
    prompt = engine.chat_format.encode(QUESTION)
    params = [SamplingParams(temperature=1.0, max_new_tokens=12, seed=s) for s in range(8)]
    with remote_engine(server, engine, top_logprobs=2) as remote, caplog.at_level("WARNING"):
        rows = remote.submit(prompt, params)
        got = remote.generate(rows)
        remote_evals = remote.self_evaluate(rows)
        outside = remote.answers_outside_top_k
    rows = engine.submit(prompt, params)
    want = engine.generate(rows)
    exact = engine.self_evaluate(rows)
    engine.close_request(want[0].request_id)
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
    one_missing = 0
    for r, x in zip(remote_evals, exact, strict=True):
        for read, true in ((r.p_no, x.p_no), (r.p_yes, x.p_yes)):
            assert read == 0.0 or abs(read - true) < TOL, "an answer is read exactly, or not at all"
        if (r.p_no == 0.0) != (r.p_yes == 0.0):
            one_missing += 1
            assert r.p_win_or_tie in (0.0, 1.0) and 0 < x.p_win_or_tie < 1
    assert outside == one_missing > 0
    warnings = [m for m in caplog.messages if "not in the server's top 2 logprobs" in m]
    assert len(warnings) == 1, "the first answer outside the top k is logged, once per engine"


def test_release_closes_the_stream_and_the_server_frees_the_row(
    server: BackgroundServer, engine: TransformersEngine
) -> None:
    cancelled = server_health(server)["cancelled"]
    with remote_engine(server, engine) as remote:
        rows = remote.submit(engine.chat_format.encode(COUNTING), [SamplingParams(temperature=0, max_new_tokens=64)])
        sample = remote.generate(rows, until=4)[0]
        assert sample.num_tokens == 4 and not sample.finished
        remote.release(rows)
        assert remote.live_rows == 0
        with pytest.raises(UnknownRowError):
            remote.sample(rows[0])
        deadline = time.monotonic() + 20
        # the cancel frees the rows at once; the HTTP request ends (in_flight) when its handler has cleaned up
        while ((h := server_health(server))["live_rows"] or h["in_flight"]) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert h["live_rows"] == 0 and h["in_flight"] == 0
        assert h["cancelled"] == cancelled + 1  # aborted mid-generation, not finished
        remote.close_request(sample.request_id)


def test_chat_capeval_over_the_client_engine_matches_the_local_engine(
    server: BackgroundServer, engine: TransformersEngine
) -> None:
    policy = {"strategy": "best_of_n", "num_samples": 2, "max_new_tokens": 8, "seed": 3}
    with remote_engine(server, engine) as remote:
        remote_answer = ChatCapEval(engine=remote, **policy).invoke("What is the capital of France?")
    local_answer = ChatCapEval(engine=engine, **policy).invoke("What is the capital of France?")
    assert remote_answer.content and remote_answer.content == local_answer.content
    assert remote_answer.usage_metadata == local_answer.usage_metadata
    got, want = remote_answer.response_metadata, local_answer.response_metadata
    assert got["model_name"] == engine.model_name and got["samples_used"] == 2
    for g, w in zip(got["samples"], want["samples"], strict=True):
        assert abs(g["p_win_or_tie"] - w["p_win_or_tie"]) < TOL and g["tokens"] == w["tokens"]


def test_capeval_serve_over_the_client_engine(server: BackgroundServer, engine: TransformersEngine) -> None:
    """create_app serves ChatCapEval over any engine: here over a client engine of the first server."""
    policy = CapEvalConfig(max_new_tokens=8, max_samples=1, seed=2)
    with remote_engine(server, engine) as remote, BackgroundServer(create_app(remote, policy)) as front:
        chat = {"model": engine.model_name, "messages": QUESTION}
        answer = httpx.post(f"{front.url}/v1/chat/completions", json=chat, timeout=300)
        assert answer.status_code == 200 and answer.json()["capeval"]["samples_used"] == 1
        plain = {"model": engine.model_name, "prompt": "Hi", "max_tokens": 2}
        completed = httpx.post(f"{front.url}/v1/completions", json=plain, timeout=300)
        assert completed.status_code == 200 and completed.json()["usage"]["completion_tokens"] == 2
        no_logprobs = httpx.post(f"{front.url}/v1/completions", json={**plain, "logprobs": 1}, timeout=300)
        assert no_logprobs.status_code == 400 and no_logprobs.json()["error"]["param"] == "logprobs"
        assert remote.live_rows == 0
    local = ChatCapEval(engine=engine, policy=policy).invoke("What is 2 + 3?")
    assert answer.json()["choices"][0]["message"]["content"] == local.content


def test_from_config_and_request_errors(server: BackgroundServer, engine: TransformersEngine) -> None:
    base = f"{server.url}/v1"
    with OpenAICompatibleEngine.from_config(OpenAIEngineConfig(base_url=base, model=engine.model_name)) as remote:
        assert remote.context_length == engine.context_length  # the server's max_model_len
        assert remote.chat_format.encode(QUESTION) == engine.chat_format.encode(QUESTION)
        with pytest.raises(PromptTooLongError):  # checked here, before any request
            remote.submit([1] * 9000, [SamplingParams(max_new_tokens=8)])
    with pytest.raises(ServerRequestError, match="does not serve model 'nope'") as missing:
        OpenAICompatibleEngine.from_config(OpenAIEngineConfig(base_url=base, model="nope"))
    assert missing.value.code == "model_not_found"
    # A client that believes in a longer context than the server's: the server's 400 comes back typed.
    with remote_engine(server, engine, context_length=100_000) as remote, pytest.raises(ServerRequestError) as e:
        remote.submit([1] * 9000, [SamplingParams(max_new_tokens=8)])
    assert e.value.status_code == 400 and e.value.code == "context_length_exceeded"
    assert remote.live_rows == 0


def test_unreachable_server_fails_after_bounded_retries(engine: TransformersEngine) -> None:
    config = OpenAIEngineConfig(base_url="http://127.0.0.1:9/v1", model="m", max_retries=2, backoff_s=0.01)
    with (
        OpenAICompatibleEngine(config, engine.chat_format) as remote,
        pytest.raises(ServerConnectionError, match="after 3 attempt"),
    ):
        remote.check_server()


@pytest.fixture(scope="module")
def stub() -> Iterator[tuple[BackgroundServer, dict[str, int]]]:
    """A real server that streams text without token ids, answers 503 twice, then returns no logprobs."""
    calls = {"scores": 0, "tagged": 0}
    app = FastAPI()

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": "stub", "object": "model"}]}

    @app.post("/v1/completions", response_model=None)
    async def completions(request: Request) -> Any:
        body = await request.json()
        calls["tagged"] += bool(request.headers.get(REQUEST_ID_HEADER))
        if body.get("stream"):
            chunks = [{"text": "Hello", "finish_reason": None}, {"text": " there", "finish_reason": "stop"}]
            lines = [f"data: {json.dumps({'choices': [{'index': 0, **c}]})}\n\n" for c in chunks]
            return StreamingResponse(iter([*lines, "data: [DONE]\n\n"]), media_type="text/event-stream")
        calls["scores"] += 1
        if calls["scores"] % 3:
            return JSONResponse({"error": {"message": "overloaded", "type": "server_error"}}, status_code=503)
        return {"choices": [{"index": 0, "text": "No", "logprobs": None, "finish_reason": "length"}]}

    with BackgroundServer(app) as srv:
        yield srv, calls


def test_a_server_without_logprobs_raises_a_feature_error(
    stub: tuple[BackgroundServer, dict[str, int]], engine: TransformersEngine
) -> None:
    srv, calls = stub
    prompt = engine.chat_format.encode(QUESTION)
    config = OpenAIEngineConfig(base_url=f"{srv.url}/v1", model="stub", backoff_s=0.01, max_retries=3)
    with OpenAICompatibleEngine(config, engine.chat_format) as remote:
        rows = remote.submit(prompt, [SamplingParams(max_new_tokens=8)])
        sample = remote.generate(rows)[0]
        # No token ids from this server: they are re-tokenized locally, and the end of turn appended.
        eos = engine.chat_format.self_evaluation_suffix[0]
        assert sample.text == "Hello there" and sample.finish_reason == "eos"
        assert sample.token_ids == [*engine.chat_format.tokenizer("Hello there")["input_ids"], eos]
        with pytest.raises(ServerFeatureError, match="logprobs") as e:  # after two 503s, retried
            remote.self_evaluate(rows)
        assert e.value.feature.startswith("top-k logprobs") and calls["scores"] == 3
        assert calls["tagged"] == 4  # every completion request names its engine request, for sticky routing
    config = OpenAIEngineConfig(base_url=f"{srv.url}/v1", model="stub", backoff_s=0.01, max_retries=1)
    with OpenAICompatibleEngine(config, engine.chat_format) as remote:
        rows = remote.submit(prompt, [SamplingParams(max_new_tokens=8)])
        with pytest.raises(ServerError, match="HTTP 503"):  # 2 attempts, both 503
            remote.self_evaluate(rows)
