"""`capeval serve`: the OpenAI-compatible server, over real HTTP on loopback (no mocked transport).

The server runs in-process (uvicorn in a background thread) over the session's engine, so the
tests can read the engine's live rows; `test_cli_serve_starts` starts `capeval serve` once as a
subprocess. Clients: the official `openai` package, `langchain_openai.ChatOpenAI`, raw httpx.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
langchain_openai = pytest.importorskip("langchain_openai")

from langchain_capeval.config import CapEvalConfig  # noqa: E402
from langchain_capeval.engines.transformers import TransformersEngine  # noqa: E402
from langchain_capeval.server import BackgroundServer, ServerConfig, create_app  # noqa: E402

POLICY = CapEvalConfig(max_new_tokens=8, max_samples=2, seed=0)
MAX_BODY = 64 * 1024
COUNTING = "Count from 1 to 100, separated by commas."  # greedy SmolLM2 keeps counting well past 64 tokens


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def server(engine: TransformersEngine) -> Iterator[BackgroundServer]:
    app = create_app(engine, POLICY, ServerConfig(max_body_bytes=MAX_BODY))
    with BackgroundServer(app) as srv:
        yield srv
    assert engine.live_rows == 0


@pytest.fixture(scope="module")
def client(server: BackgroundServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=300)


def health(server: BackgroundServer) -> dict[str, Any]:
    return dict(httpx.get(f"{server.url}/health", timeout=10).json())


def wait_for(server: BackgroundServer, check: Any, timeout: float = 20.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        h = health(server)
        if check(h) or time.monotonic() > deadline:
            return h
        time.sleep(0.05)


def idle(h: dict[str, Any]) -> bool:
    return bool(h["live_rows"] == 0 and h["in_flight"] == 0)


def test_models_lists_the_served_model(client: openai.OpenAI, engine: TransformersEngine) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == [engine.model_name]
    assert models[0].model_extra is not None and models[0].model_extra["max_model_len"] == engine.context_length
    assert client.models.retrieve(engine.model_name).id == engine.model_name


def test_chat_completion_with_the_openai_client(client: openai.OpenAI, engine: TransformersEngine) -> None:
    request: dict[str, Any] = {
        "model": engine.model_name,
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"}],
        "max_tokens": 8,
        "seed": 5,
        "extra_body": {"capeval": {"strategy": "best_of_n", "num_samples": 2}},
    }
    response = client.chat.completions.create(**request)
    answer = response.choices[0].message.content
    assert answer and response.choices[0].finish_reason in ("stop", "length")
    ext = response.model_extra["capeval"]  # type: ignore[index]
    assert ext["samples_used"] == 2 and ext["stop_reason"] == "max_samples" and ext["policy"]["seed"] == 5
    assert [e["event"] for e in ext["trace"]][-1] == "accepted"
    assert all(0 <= s["p_win_or_tie"] <= 1 for s in ext["samples"])
    usage = response.usage
    assert usage is not None and usage.completion_tokens_details is not None
    accepted = next(s for s in ext["samples"] if s["index"] == ext["accepted_sample"])
    assert usage.completion_tokens == sum(s["tokens"] for s in ext["samples"])
    assert usage.completion_tokens_details.reasoning_tokens == usage.completion_tokens - accepted["tokens"]
    compute = ext["compute"]
    assert usage.prompt_tokens == compute["prompt_tokens"] + compute["self_eval_tokens"]
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens

    # The same request streamed: the same answer (same seed), only the accepted sample's tokens, usage last.
    chunks = list(client.chat.completions.create(**request, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(pieces) == answer and len(pieces) > 1
    finishing = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finishing) == 1 and finishing[0].model_extra["capeval"]["samples_used"] == 2  # type: ignore[index]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    streamed_usage, first_usage = chunks[-1].usage.model_dump(), usage.model_dump()
    # the prompt is cached now: all of it but its last token comes from the prefix cache
    cached = streamed_usage.pop("prompt_tokens_details")["cached_tokens"]
    assert cached >= first_usage.pop("prompt_tokens_details")["cached_tokens"]
    assert cached == compute["prompt_tokens"] - 1
    assert streamed_usage == first_usage


def test_chat_openai_from_langchain(server: BackgroundServer, engine: TransformersEngine) -> None:
    llm = langchain_openai.ChatOpenAI(
        model=engine.model_name,
        base_url=f"{server.url}/v1",
        api_key="x",
        max_tokens=8,
        seed=11,
        max_retries=0,
        timeout=300,
        stream_usage=True,
        extra_body={"capeval": {"max_samples": 1}},
    )
    message = llm.invoke("What is the capital of France?")
    assert isinstance(message.content, str) and message.content
    assert message.usage_metadata is not None and message.usage_metadata["output_tokens"] > 0
    assert message.response_metadata["model_name"] == engine.model_name
    streamed = None
    for chunk in llm.stream("What is the capital of France?"):
        streamed = chunk if streamed is None else streamed + chunk
    assert streamed is not None and streamed.content == message.content
    assert streamed.usage_metadata is not None and message.usage_metadata is not None
    # the same usage, but for the prompt tokens the second request found in the prefix cache
    later = streamed.usage_metadata.pop("input_token_details", {}).get("cache_read", 0)
    assert later >= message.usage_metadata.pop("input_token_details", {}).get("cache_read", 0)
    assert streamed.usage_metadata == message.usage_metadata


def test_completions_with_logprobs_and_token_ids(client: openai.OpenAI, engine: TransformersEngine) -> None:
    request: dict[str, Any] = {
        "model": engine.model_name,
        "prompt": "The capital of France is",
        "max_tokens": 4,
        "temperature": 0,
        "logprobs": 5,
        "extra_body": {"return_token_ids": True},
    }
    response = client.completions.create(**request)
    choice = response.choices[0]
    assert choice.finish_reason == "length" and response.usage is not None and response.usage.completion_tokens == 4
    lp = choice.logprobs
    assert lp is not None and lp.tokens is not None and lp.token_logprobs is not None and lp.top_logprobs is not None
    assert "".join(lp.tokens) == choice.text and len(lp.tokens) == 4
    for logprob, top in zip(lp.token_logprobs, lp.top_logprobs, strict=True):
        assert len(top) >= 5 and logprob == pytest.approx(max(top.values()))  # greedy: the most likely token
    token_ids = choice.model_extra["token_ids"]  # type: ignore[index]
    assert engine.chat_format.decode(token_ids) == choice.text

    chunks = list(client.completions.create(**request, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == choice.text
    assert [t for c in chunks for t in c.choices[0].model_extra["token_ids"]] == token_ids  # type: ignore[index]
    assert chunks[-1].choices[0].finish_reason == "length"


HI = [{"role": "user", "content": "hi"}]
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": "M", "messages": HI, **fields}


def completion(**fields: Any) -> dict[str, Any]:
    return {"model": "M", "prompt": "hi", **fields}


BAD_INPUTS = [  # path, body (a dict, bytes, or an iterator for a chunked body), status, error param, error code
    pytest.param(CHAT, b'{"model": ', 400, None, None, id="invalid json"),
    pytest.param(CHAT, {"model": "M"}, 400, "messages", None, id="no messages"),
    pytest.param(CHAT, chat(messages=[]), 400, "messages", None, id="empty messages"),
    pytest.param(CHAT, chat(messages="hi"), 400, "messages", None, id="messages not a list"),
    pytest.param(CHAT, chat(messages=[{"role": "robot", "content": "hi"}]), 400, "messages", None, id="unknown role"),
    pytest.param(CHAT, chat(messages=[{"role": "assistant", "content": ""}]), 400, "messages", None, id="ends on ai"),
    pytest.param(CHAT, chat(model="gpt-9"), 404, "model", "model_not_found", id="unknown model"),
    pytest.param(CHAT, chat(n=2), 400, "n", "unsupported_parameter", id="n > 1"),
    pytest.param(CHAT, chat(tools=[{"type": "function"}]), 400, "tools", "unsupported_parameter", id="tools"),
    pytest.param(CHAT, chat(temperature=5), 400, "temperature", None, id="bad temperature"),
    pytest.param(CHAT, chat(capeval={"bogus": 1}), 400, "capeval.bogus", None, id="unknown policy field"),
    pytest.param(CHAT, chat(capeval={"accept_threshold": 3}), 400, "capeval.accept_threshold", None, id="bad policy"),
    pytest.param(CHAT, chat(max_tokens=8, capeval={"strategy": "prune"}), 400, "capeval", None, id="policy conflict"),
    pytest.param(
        CHAT, chat(messages=[{"role": "user", "content": "hi " * 9000}]), 400, None, "context_length_exceeded",
        id="context overflow",
    ),
    pytest.param(CHAT, chat(messages="x" * MAX_BODY), 413, None, "request_too_large", id="body too large"),
    pytest.param(CHAT, iter([b'{"messages": "', b"x" * MAX_BODY, b'"}']), 413, None, "request_too_large", id="chunked"),
    pytest.param(COMPLETIONS, completion(logprobs=21), 400, "logprobs", None, id="too many logprobs"),
    pytest.param(COMPLETIONS, completion(echo=True), 400, "echo", "unsupported_parameter", id="echo"),
    pytest.param(COMPLETIONS, completion(prompt=["a", "b"]), 400, "prompt", "unsupported_parameter", id="two prompts"),
    pytest.param(COMPLETIONS, completion(prompt=[10**9]), 400, None, None, id="token id out of range"),
    pytest.param(
        COMPLETIONS, completion(prompt=[1] * 9000), 400, None, "context_length_exceeded", id="prompt overflow"
    ),
    pytest.param("/v1/nothing", {}, 404, None, None, id="unknown path"),
]  # fmt: skip


@pytest.mark.parametrize(("path", "body", "status", "param", "code"), BAD_INPUTS)
def test_bad_input_gets_an_openai_error(
    server: BackgroundServer,
    engine: TransformersEngine,
    path: str,
    body: Any,
    status: int,
    param: str | None,
    code: str | None,
) -> None:
    headers = {"content-type": "application/json"}
    if isinstance(body, dict):
        body = json.dumps({k: engine.model_name if v == "M" else v for k, v in body.items()}).encode()
    response = httpx.post(f"{server.url}{path}", content=body, headers=headers, timeout=60)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param and error["code"] == code
    assert idle(health(server))


def test_method_not_allowed_and_the_server_keeps_serving(server: BackgroundServer, client: openai.OpenAI) -> None:
    response = httpx.delete(f"{server.url}/v1/models", timeout=10)
    assert response.status_code == 405 and "message" in response.json()["error"]
    assert client.models.list().data


def test_dropped_connections_free_the_engine_rows(server: BackgroundServer, engine: TransformersEngine) -> None:
    counting = [{"role": "user", "content": COUNTING}]
    cancelled = health(server)["cancelled"]
    with httpx.Client(base_url=server.url, timeout=300) as http:
        # A streamed chat completion, dropped once its samples are generating.
        body = {"model": engine.model_name, "messages": counting, "max_tokens": 64, "temperature": 0, "stream": True}
        with http.stream("POST", "/v1/chat/completions", json=body) as response:
            assert response.status_code == 200
            assert json.loads(next(response.iter_lines())[len("data: ") :])["choices"][0]["delta"]["role"]
            time.sleep(1.0)  # the graph is now generating 64 tokens (several seconds here)
        h = wait_for(server, idle)
        assert idle(h) and h["cancelled"] == cancelled + 1

        # A streamed plain completion, dropped after two tokens.
        prompt = engine.chat_format.encode(counting)
        body = {"model": engine.model_name, "prompt": prompt, "max_tokens": 64, "temperature": 0, "stream": True}
        with http.stream("POST", "/v1/completions", json=body) as response:
            lines = response.iter_lines()
            data = [next(x for x in lines if x.startswith("data: ")) for _ in range(2)]
            assert all(json.loads(d[6:])["choices"][0]["finish_reason"] is None for d in data)
        h = wait_for(server, idle)
        assert idle(h) and h["cancelled"] == cancelled + 2

        # A non-streamed request whose client gives up (a read timeout closes the connection).
        body = {"model": engine.model_name, "prompt": prompt, "max_tokens": 64, "temperature": 0}
        with pytest.raises(httpx.ReadTimeout):
            http.post("/v1/completions", json=body, timeout=httpx.Timeout(60, read=1.0))
        h = wait_for(server, idle)
        assert idle(h) and h["cancelled"] == cancelled + 3

        # The next request is served normally.
        ok = http.post("/v1/completions", json={"model": engine.model_name, "prompt": "Hi", "max_tokens": 2})
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_cli_serve_starts(tmp_path: Any) -> None:
    port = _free_port()
    log = tmp_path / "serve.log"
    cmd = [sys.executable, "-m", "langchain_capeval.cli", "serve", "--no-adapter", "--port", str(port)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [*cmd, "--log-level", "warning", "--max-samples", "1"], stdout=out, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, f"capeval serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
            try:
                response = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2)
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline, f"capeval serve did not start:\n{log.read_text()[-3000:]}"
                time.sleep(0.5)
        assert response.status_code == 200 and response.json()["data"][0]["id"] == "SmolLM2-135M-Instruct"
        assert f"http://127.0.0.1:{port}/v1" in log.read_text()
    finally:
        proc.send_signal(signal.SIGINT if os.name == "posix" else signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_a_bug_answers_500_and_the_server_keeps_serving(
    engine: TransformersEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An exception from the engine is a 500 with OpenAI's error shape, not a dropped connection.

    Found by the HTTP fuzz test: Starlette's catch-all re-raises after its 500 and uvicorn then
    closed the connection, so the client read ``Connection reset by peer``.
    """
    app = create_app(engine, CapEvalConfig(max_new_tokens=3, max_samples=1))
    body = {"model": engine.model_name, "messages": [{"role": "user", "content": "Hi"}]}

    def broken_self_evaluate(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a bug in the engine")

    with BackgroundServer(app) as srv, httpx.Client(base_url=srv.url, timeout=120) as http:
        with monkeypatch.context() as patch:
            patch.setattr(engine, "self_evaluate", broken_self_evaluate)
            response = http.post("/v1/chat/completions", json=body)
        assert response.status_code == 500, response.text
        error = response.json()["error"]
        assert error["type"] == "internal_error" and "RuntimeError: a bug in the engine" in error["message"]
        again = http.post("/v1/chat/completions", json=body)
        assert again.status_code == 200, again.text
        assert again.json()["choices"][0]["message"]["content"]
    assert engine.live_rows == 0, "the failed request's rows were freed"
