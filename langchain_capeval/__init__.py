"""langchain-capeval: adaptive inference-time compute for LangChain.

``ChatCapEval()`` samples a response, asks the same model (one extra forward pass on
top of its KV cache) whether it would do better by starting over, and only then
spends more compute. The method is Manvi, Singh and Ermon, "Adaptive
Inference-Time Compute: LLMs Can Predict if They Can Do Better, Even
Mid-Generation" (2024).

Example:
    >>> from langchain_capeval import ChatCapEval  # doctest: +SKIP
    >>> ChatCapEval().invoke("What is 3 + 4?").content  # doctest: +SKIP

"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from langchain_capeval.sampling import SamplingParams

if TYPE_CHECKING:
    from langchain_capeval.chat_models import ChatCapEval
    from langchain_capeval.config import CapEvalConfig
    from langchain_capeval.engines import Engine, TransformersEngine, VLLMEngine, VLLMEngineConfig, load_engine
    from langchain_capeval.graph import build_graph

__version__ = "0.1.0"

_LAZY = {
    "ChatCapEval": "langchain_capeval.chat_models",
    "CapEvalConfig": "langchain_capeval.config",
    "build_graph": "langchain_capeval.graph",
    "Engine": "langchain_capeval.engines",
    "TransformersEngine": "langchain_capeval.engines",
    "VLLMEngine": "langchain_capeval.engines",
    "VLLMEngineConfig": "langchain_capeval.engines",
    "load_engine": "langchain_capeval.engines",
}


def __getattr__(name: str) -> Any:
    """Import heavy modules (torch, transformers) only when their names are used."""
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'langchain_capeval' has no attribute {name!r}")


__all__ = [
    "CapEvalConfig",
    "ChatCapEval",
    "Engine",
    "SamplingParams",
    "TransformersEngine",
    "VLLMEngine",
    "VLLMEngineConfig",
    "__version__",
    "build_graph",
    "load_engine",
]
