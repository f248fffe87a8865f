"""Shared fixtures: the embedded default model, loaded once per test session.

The engine runs the base model (``adapter=None``) so that tests do not depend on a
trained self-evaluation adapter. It is the process-wide engine that ``ChatCapEval(adapter=None)``
also uses (the LangChain standard suites build their models that way), so the model is
loaded once. A test that submits rows should close its requests (``engine.close_request``)
so that later tests start from a clean engine.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from langchain_capeval.chat_format import ChatFormat
from langchain_capeval.chat_models import shared_engine
from langchain_capeval.engines.transformers import TransformersEngine


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
