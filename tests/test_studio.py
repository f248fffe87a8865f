"""LangGraph Studio support: `langgraph dev` serves graphs/langgraph.json offline, on loopback, with no API key."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

GRAPHS = Path(__file__).resolve().parent.parent / "graphs"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    cli = Path(sys.executable).parent / "langgraph"
    port = _free_port()
    log = tmp_path_factory.mktemp("langgraph") / "server.log"
    env = {
        **os.environ,
        "LANGSMITH_TRACING": "false",
        "LANGGRAPH_CLI_NO_ANALYTICS": "1",
        "CAPEVAL_ADAPTER": "none",
    }
    env.pop("LANGSMITH_API_KEY", None)
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(cli), "dev", "--host", "127.0.0.1", "--port", str(port), "--no-browser", "--no-reload"],
            cwd=GRAPHS,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"langgraph dev exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{base}/ok", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"langgraph dev did not answer /ok in 120 s:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield base
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        shutil.rmtree(GRAPHS / ".langgraph_api", ignore_errors=True)


def test_server_lists_the_graph_and_its_structure(server: str) -> None:
    found = httpx.post(f"{server}/assistants/search", json={"graph_id": "capeval"}, timeout=30).json()
    assert [a["graph_id"] for a in found] == ["capeval"]
    graph = httpx.get(f"{server}/assistants/capeval/graph", params={"xray": "true"}, timeout=30).json()
    nodes = {n["id"] for n in graph["nodes"]}
    assert {"start", "generate", "self_evaluate", "prune", "accept"} <= nodes
    edges = {(e["source"], e["target"], bool(e.get("conditional"))) for e in graph["edges"]}
    assert ("self_evaluate", "prune", True) in edges
    assert ("self_evaluate", "generate", True) in edges
    assert ("prune", "generate", False) in edges
    schemas = httpx.get(f"{server}/assistants/{found[0]['assistant_id']}/schemas", timeout=30).json()
    assert "accept_threshold" in json.dumps(schemas["context_schema"])


def test_server_runs_the_graph_with_a_per_run_policy(server: str) -> None:
    body = {
        "assistant_id": "capeval",
        "input": {"messages": [{"role": "user", "content": "What is 2 + 2?"}]},
        "context": {"max_new_tokens": 16, "max_samples": 2, "accept_threshold": 1.0, "seed": 3},
    }
    out = httpx.post(f"{server}/runs/wait", json=body, timeout=300).json()
    assert out["answer"], out
    assert len(out["samples"]) == 2 and out["stop_reason"] == "max_samples"
    assert all(s["num_tokens"] <= 16 for s in out["samples"])
    assert out["trace"][-1]["event"] == "accepted"


def test_server_streams_progress_events(server: str) -> None:
    body = {
        "assistant_id": "capeval",
        "input": {"messages": [{"role": "user", "content": "Say hi."}]},
        "context": {"max_new_tokens": 8, "max_samples": 1, "seed": 1},
        "stream_mode": ["custom"],
    }
    events = []
    with httpx.stream("POST", f"{server}/runs/stream", json=body, timeout=300) as r:
        for line in r.iter_lines():
            if line.startswith("data:") and '"event"' in line:
                events.append(json.loads(line[5:])["event"])
    assert events == ["sampling", "scored", "accepted"]
