"""Engines: one protocol, several back ends.

* :class:`~langchain_capeval.engines.transformers.TransformersEngine`: any Hugging Face
  causal LM on CPU or GPU; the embedded default.
* :class:`~langchain_capeval.engines.openai_client.OpenAICompatibleEngine`: a remote
  OpenAI-compatible server (vLLM, SGLang, llama.cpp, ``capeval serve``) over ``/v1/completions``.
* :class:`~langchain_capeval.engines.vllm.VLLMEngine`: an in-process vLLM engine on a CUDA GPU,
  with prefix caching and the self-evaluation adapter as a ``LoRARequest`` (the ``vllm`` extra;
  vLLM is imported only when the engine is built).

On CPU the transformers engine should be the only thread of the process that runs parallel
torch ops: :func:`~langchain_capeval.engines.cpu.run_in_own_thread` runs other heavy torch
work (embedding a corpus, say) where it cannot slow the engine down (see
:mod:`langchain_capeval.engines.cpu`).

Example:
    >>> from langchain_capeval.engines import load_engine
    >>> engine = load_engine()  # SmolLM2-135M-Instruct, with the shipped adapter if any  # doctest: +SKIP
    >>> gpu = load_engine("/models/llama-3.1-8b-instruct", adapter="/models/selfeval", backend="vllm")  # doctest: +SKIP

"""

from __future__ import annotations

from typing import Literal

from langchain_capeval.engines.base import Engine, FinishReason, RowId, Sample, SelfEvaluation, Usage
from langchain_capeval.engines.cpu import run_in_own_thread
from langchain_capeval.engines.openai_client import OpenAICompatibleEngine, OpenAIEngineConfig
from langchain_capeval.engines.transformers import TransformersEngine, TransformersEngineConfig
from langchain_capeval.engines.vllm import VLLMEngine, VLLMEngineConfig  # imports vLLM only in from_config


def load_engine(
    model: str | None = None,
    *,
    adapter: str | None = "default",
    device: str = "cpu",
    backend: Literal["transformers", "vllm"] = "transformers",
) -> Engine:
    """Build an engine for a local model (``None``: the embedded default).

    ``backend="transformers"`` runs on ``device``; ``backend="vllm"`` builds a
    :class:`VLLMEngine` with default settings (on the GPU; ``device`` is not used). For other
    vLLM settings build ``VLLMEngine.from_config(VLLMEngineConfig(...))`` yourself.

    Raises:
        MissingExtraError: ``backend="vllm"`` without vLLM installed.

    """
    if backend == "vllm":
        return VLLMEngine.from_config(VLLMEngineConfig(model=model, adapter=adapter))
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
    "VLLMEngine",
    "VLLMEngineConfig",
    "load_engine",
    "run_in_own_thread",
]
