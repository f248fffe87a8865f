"""Self-evaluation LoRA adapters: where the shipped one lives, and applying one to a model.

An adapter trained by :mod:`langchain_capeval.training` makes a model
capability-aware. It is a plain PEFT LoRA adapter (``adapter_config.json`` +
``adapter_model.safetensors``), so vLLM serves it as a ``LoRARequest`` too.

Example:
    >>> from langchain_capeval.adapters import default_adapter_path
    >>> default_adapter_path().name  # the adapter shipped for SmolLM2-135M-Instruct
    'smollm2-135m-selfeval'

"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from langchain_capeval.errors import MissingExtraError, ModelNotInstalledError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

_SHIPPED = Path(__file__).parent / "data" / "adapters" / "smollm2-135m-selfeval"


def default_adapter_path() -> Path | None:
    """The adapter shipped for the embedded default model, or ``None`` if none ships."""
    return _SHIPPED if (_SHIPPED / "adapter_config.json").is_file() else None


def resolve_adapter(model: str | None, adapter: str | None) -> Path | None:
    """The adapter folder an engine applies: ``"default"`` is the shipped one, for the embedded default model only.

    Raises:
        ModelNotInstalledError: ``adapter`` names a folder without ``adapter_config.json``.

    Example:
        >>> resolve_adapter("/models/llama", "default") is None  # no shipped adapter for other models
        True

    """
    from langchain_capeval.models import DEFAULT_MODEL

    if adapter is None:
        return None
    if adapter == "default":
        shipped = default_adapter_path()
        return shipped if model in (None, DEFAULT_MODEL) and shipped is not None else None
    return check_adapter(adapter)


def check_adapter(adapter: str | os.PathLike[str]) -> Path:
    """The adapter's folder, after checking that it holds ``adapter_config.json``.

    Raises:
        ModelNotInstalledError: It does not.

    """
    path = Path(adapter).expanduser()
    if not (path / "adapter_config.json").is_file():
        raise ModelNotInstalledError(f"adapter {str(adapter)!r} is not a folder holding adapter_config.json")
    return path


def apply_adapter(model: PreTrainedModel, adapter: str | os.PathLike[str]) -> PreTrainedModel:
    """Apply a PEFT LoRA adapter from a local folder, merged into the weights for speed.

    Raises:
        ModelNotInstalledError: ``adapter`` is not a folder with ``adapter_config.json``.
        MissingExtraError: ``peft`` is not installed.

    """
    path = check_adapter(adapter)
    try:
        from peft import PeftModel
    except ImportError as e:  # pragma: no cover - peft is a core dependency
        raise MissingExtraError("LoRA adapters need peft: pip install peft") from e
    peft_model = PeftModel.from_pretrained(model, str(path))
    merged: PreTrainedModel = peft_model.merge_and_unload()
    return merged
