"""Shared fixtures: the embedded default model, loaded once per test session.

The engine runs the base model (``adapter=None``) so that tests do not depend on a
trained self-evaluation adapter. It is the process-wide engine that ``ChatCapEval(adapter=None)``
also uses (the LangChain standard suites build their models that way), so the model is
loaded once. A test that submits rows should close its requests (``engine.close_request``)
so that later tests start from a clean engine.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from langchain_core.messages import AIMessageChunk

from langchain_capeval.chat_format import ChatFormat
from langchain_capeval.chat_models import shared_engine
from langchain_capeval.engines.transformers import TransformersEngine


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (``make test`` runs a worker per core), each worker and its subprocesses use one thread.

    Two workers on two threads each would oversubscribe the cores. On 2 cores the suite takes about
    two thirds of its one-process time this way (the README's CI figures).
    """
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ["OMP_NUM_THREADS"] = "1"  # servers, CLIs and scripts the tests start
        torch.set_num_threads(1)


@pytest.fixture(scope="session")
def engine() -> TransformersEngine:
    """The transformers engine on the embedded default SmolLM2-135M-Instruct, base weights, CPU."""
    engine = shared_engine(None, None, "cpu")
    assert isinstance(engine, TransformersEngine)
    return engine


@pytest.fixture(scope="session")
def chat_format(engine: TransformersEngine) -> ChatFormat:
    """The engine's chat format (the model's own chat template)."""
    return engine.chat_format


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Decode on one CPU thread in a module (``pytestmark = pytest.mark.usefixtures("one_torch_thread")``).

    Modules that run a server or many short decodes use it: on a shared, oversubscribed CPU two OpenMP
    threads run many times slower than one.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def built_data_folder(tmp_path: Path) -> Callable[[int], Path]:
    """A factory: a preference-data folder holding the first ``n`` prompts of the committed v2 data."""
    v2 = Path(__file__).resolve().parents[1] / "results/training/v2/data"

    def make(n: int) -> Path:
        folder = tmp_path / f"built-{n}"
        folder.mkdir()
        lines = v2.joinpath("preferences.jsonl").read_text().splitlines()[:n]
        folder.joinpath("preferences.jsonl").write_text("\n".join(lines) + "\n")
        folder.joinpath("build_config.json").write_text(v2.joinpath("build_config.json").read_text())
        return folder

    return make


@pytest.fixture
def stream_graph() -> Callable[..., tuple[str, list[dict[str, Any]], dict[str, Any]]]:
    """A function: stream a compiled LangGraph app with the ``messages``, ``custom`` and ``values`` modes.

    ``stream_graph(app, inputs, config=None)`` returns the text of every ``AIMessageChunk`` the
    ``messages`` mode streamed, joined; the ``custom`` events (``capeval_progress``), in order; and the
    final state.
    """

    def stream(app: Any, inputs: Any, config: Any = None) -> tuple[str, list[dict[str, Any]], dict[str, Any]]:
        streamed, progress, final = [], [], None
        for mode, chunk in app.stream(inputs, stream_mode=["messages", "custom", "values"], config=config):
            if mode == "messages":
                if isinstance(chunk[0], AIMessageChunk):
                    streamed.append(str(chunk[0].content))
            elif mode == "custom":
                progress.append(chunk)
            else:
                final = chunk
        assert final is not None, "the graph streamed no state"
        return "".join(streamed), progress, final

    return stream
