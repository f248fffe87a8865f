"""The langchain-tests standard suites (pinned: langchain-tests==1.1.9) on the embedded model.

Skipped by the suites themselves, honestly unsupported here: tool calling (``bind_tools``
raises ``UnsupportedFeatureError``), structured output and JSON mode (they build on tool
calling or a JSON mode the model lacks), and multimodal inputs (text only).
"""

from __future__ import annotations

from typing import Any

from langchain_tests.integration_tests import ChatModelIntegrationTests
from langchain_tests.unit_tests import ChatModelUnitTests

from langchain_capeval.chat_models import ChatCapEval

# Small budgets keep the suites quick on 2 CPU cores; the model and engine are shared per process.
PARAMS: dict[str, Any] = {"adapter": None, "max_new_tokens": 24, "max_samples": 2, "seed": 0}


class CapEvalSuiteParams:
    """What both standard suites need to know about ChatCapEval."""

    @property
    def chat_model_class(self) -> type[ChatCapEval]:
        return ChatCapEval

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return PARAMS

    @property
    def has_tool_calling(self) -> bool:
        return False

    @property
    def has_structured_output(self) -> bool:
        return False

    @property
    def returns_usage_metadata(self) -> bool:
        return True


class TestChatCapEvalUnit(CapEvalSuiteParams, ChatModelUnitTests):
    pass


class TestChatCapEvalIntegration(CapEvalSuiteParams, ChatModelIntegrationTests):
    pass
