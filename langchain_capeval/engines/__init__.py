"""Engines: one protocol, several back ends.

* :class:`~langchain_capeval.engines.transformers.TransformersEngine`: any Hugging Face
  causal LM on CPU or GPU; the embedded default.
* :class:`~langchain_capeval.engines.openai_client.OpenAICompatibleEngine`: a remote
  OpenAI-compatible server (vLLM, SGLang, llama.cpp, ``capeval serve``) over ``/v1/completions``.

Example:
    >>> from langchain_capeval.engines import load_engine
    >>> engine = load_engine()  # SmolLM2-135M-Instruct, with the shipped adapter if any  # doctest: +SKIP

"""

from __future__ import annotations

from langchain_capeval.engines.base import Engine, FinishReason, RowId, Sample, SelfEvaluation, Usage
from langchain_capeval.engines.openai_client import OpenAICompatibleEngine, OpenAIEngineConfig
from langchain_capeval.engines.transformers import TransformersEngine, TransformersEngineConfig


def load_engine(model: str | None = None, *, adapter: str | None = "default", device: str = "cpu") -> Engine:
    """Build the transformers engine for a local model (``None``: the embedded default)."""
    return TransformersEngine.from_config(TransformersEngineConfig(model=model, adapter=adapter, device=device))


__all__ = [
    "Engine",
    "FinishReason",
    "OpenAICompatibleEngine",
    "OpenAIEngineConfig",
    "RowId",
    "Sample",
    "SelfEvaluation",
    "TransformersEngine",
    "TransformersEngineConfig",
    "Usage",
    "load_engine",
]
