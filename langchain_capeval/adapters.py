"""Self-evaluation LoRA adapters: where the shipped one lives, and applying one to a model.

An adapter trained by :mod:`langchain_capeval.training` makes a model
capability-aware. It is a plain PEFT LoRA adapter (``adapter_config.json`` +
``adapter_model.safetensors``), so vLLM serves it as a ``LoRARequest`` too.

An adapter has a **scope** (:func:`adapter_scope`, from an optional ``capeval_adapter.json``
in its folder):

- ``"every_token"`` (the default without such a file): trained to run for every token, generation included
  (``capeval train``, with a regulariser that keeps generation the base model's). Engines merge
  it into the weights; generation and self-evaluation share one KV cache.
- ``"self_evaluation"``: trained on the self-evaluation chunk only (the pending last token and
  the self-evaluation turn), over a KV cache the *base* weights wrote for the prompt and the
  response (``capeval train --scope self_evaluation``, or ``bench/suffix_lora.py``; docs/training.md
  sections 8-13). Generation is then the base model's exactly; the transformers engine decodes with
  the base weights and adds the adapter's low-rank updates during the self-evaluation forward only,
  over the base cache (:mod:`langchain_capeval.engines.lora`). vLLM has no such mode (a
  ``LoRARequest`` adapts every token of the prompt), so its engine refuses these adapters.

The same file may record the **policy** fields the adapter was measured with
(:func:`adapter_policy`, e.g. ``{"accept_threshold": 0.7}``): each adapter's P(win or tie) has its
own calibration, so the threshold that spends compute well is the adapter's. ``ChatCapEval``,
``capeval serve`` and the Studio graph start from them; fields the caller sets win
(:func:`policy_for_adapter`).

Two adapters ship for the embedded default, by name: :data:`DEFAULT_ADAPTER` (``adapter="default"``,
scope ``every_token``, trained on partial-credit targets with a KL regulariser; docs/training.md
sections 15, 16 and 24: the recipe, its loss, the run that ships) and :data:`PARTIAL_CREDIT_ADAPTER`
(scope ``self_evaluation``, trained on partial-credit targets; docs/training.md section 11).

Example:
    >>> from langchain_capeval.adapters import adapter_scope, default_adapter_path, shipped_adapter_path
    >>> default_adapter_path().name  # the adapter shipped for SmolLM2-135M-Instruct
    'smollm2-135m-selfeval'
    >>> adapter_scope(shipped_adapter_path("smollm2-135m-selfeval-partial-credit"))
    'self_evaluation'

"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

from langchain_capeval.errors import CapEvalInputError, MissingExtraError, ModelNotInstalledError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from langchain_capeval.config import CapEvalConfig

AdapterScope = Literal["every_token", "self_evaluation"]
"""Which tokens an adapter was trained to run on (see the module docstring)."""

SCOPE_FILE = "capeval_adapter.json"
"""The file in an adapter folder that records its scope and the policy it was measured with:
``{"scope": "self_evaluation", "policy": {"accept_threshold": 0.7}}``."""

DEFAULT_ADAPTER = "smollm2-135m-selfeval"
"""The adapter ``ChatCapEval()`` loads for the embedded default (``adapter="default"``)."""

PARTIAL_CREDIT_ADAPTER = "smollm2-135m-selfeval-partial-credit"
"""The self-evaluation-scoped adapter shipped for the embedded default (opt in: ``adapter=`` this name)."""

_SHIPPED_DIR = Path(__file__).parent / "data" / "adapters"


def shipped_adapter_path(name: str) -> Path | None:
    """The folder of the adapter shipped under ``name`` (for the embedded default model), or ``None``."""
    path = _SHIPPED_DIR / name
    return path if name and "/" not in name and (path / "adapter_config.json").is_file() else None


def default_adapter_path() -> Path | None:
    """The adapter shipped for the embedded default model, or ``None`` if none ships."""
    return shipped_adapter_path(DEFAULT_ADAPTER)


def _adapter_file(adapter: str | os.PathLike[str]) -> dict[str, Any]:
    """The adapter folder's ``capeval_adapter.json`` as a dict (``{}`` without one)."""
    path = check_adapter(adapter) / SCOPE_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CapEvalInputError(f'{path}: expected a JSON object like {{"scope": "self_evaluation"}}') from e
    if not isinstance(data, dict):
        raise CapEvalInputError(f'{path}: expected a JSON object like {{"scope": "self_evaluation"}}')
    return data


def adapter_scope(adapter: str | os.PathLike[str]) -> AdapterScope:
    """The scope an adapter folder records in ``capeval_adapter.json`` (``"every_token"`` without one).

    Raises:
        ModelNotInstalledError: ``adapter`` is not a folder holding ``adapter_config.json``.
        CapEvalInputError: ``capeval_adapter.json`` is not JSON or names an unknown scope.

    """
    scope = _adapter_file(adapter).get("scope", "every_token")
    if scope not in get_args(AdapterScope):
        path = Path(adapter) / SCOPE_FILE
        raise CapEvalInputError(f"{path}: scope {scope!r} is not one of {', '.join(get_args(AdapterScope))}")
    return scope


def adapter_policy(adapter: str | os.PathLike[str]) -> dict[str, Any]:
    """The policy fields an adapter was measured with: ``"policy"`` in ``capeval_adapter.json`` (``{}`` without).

    An adapter's P(win or tie) has its own calibration, so the accept threshold that spends compute
    well differs between adapters (both shipped adapters record 0.7; ``CapEvalConfig``'s default is 0.8).
    ``ChatCapEval``, ``capeval serve`` and the Studio graph start from these fields; what the caller
    sets wins (:func:`policy_for_adapter`).

    Raises:
        ModelNotInstalledError: ``adapter`` is not a folder holding ``adapter_config.json``.
        CapEvalInputError: ``"policy"`` is not an object of valid ``CapEvalConfig`` fields; the message names
            the file and the field.

    Example:
        >>> adapter_policy(shipped_adapter_path("smollm2-135m-selfeval-partial-credit"))
        {'accept_threshold': 0.7}
        >>> adapter_policy(default_adapter_path())
        {'accept_threshold': 0.7}

    """
    from pydantic import ValidationError

    from langchain_capeval.config import CapEvalConfig

    policy = _adapter_file(adapter).get("policy", {})
    path = Path(adapter) / SCOPE_FILE
    if not isinstance(policy, dict):
        raise CapEvalInputError(f'{path}: "policy" must be an object of CapEvalConfig fields, got {policy!r}')
    try:
        CapEvalConfig.model_validate(policy)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        raise CapEvalInputError(f'{path}: "policy": {problems}') from e
    return dict(policy)


def write_adapter_scope(
    adapter: str | os.PathLike[str], scope: AdapterScope, policy: Mapping[str, Any] | None = None
) -> None:
    """Record ``scope`` (and the ``policy`` fields it was measured with) in an adapter folder.

    ``"every_token"`` with no policy removes the file: it is the default.
    """
    path = Path(adapter) / SCOPE_FILE
    if scope == "every_token" and not policy:
        path.unlink(missing_ok=True)
        return
    data: dict[str, Any] = {"scope": scope}
    if policy:
        data["policy"] = dict(policy)
    path.write_text(json.dumps(data) + "\n")


def policy_for_adapter(model: str | None, adapter: str | None, given: Mapping[str, Any]) -> CapEvalConfig:
    """The policy of a model running ``adapter``: ``given`` fields over the adapter's (:func:`adapter_policy`).

    Fields nobody gives keep :class:`~langchain_capeval.config.CapEvalConfig`'s defaults.

    Raises:
        ModelNotInstalledError: ``adapter`` names no adapter folder.
        CapEvalInputError: a shipped adapter named for another model, or a malformed ``capeval_adapter.json``.
        pydantic.ValidationError: a ``given`` field is invalid.

    Example:
        >>> policy_for_adapter(None, "smollm2-135m-selfeval-partial-credit", {"max_samples": 4}).accept_threshold
        0.7
        >>> policy_for_adapter(None, "smollm2-135m-selfeval-partial-credit", {"accept_threshold": 0.9}).accept_threshold
        0.9

    """
    from langchain_capeval.config import CapEvalConfig

    path = resolve_adapter(model, adapter)
    measured = adapter_policy(path) if path is not None else {}
    return CapEvalConfig.model_validate({**measured, **dict(given)})


def resolve_adapter(model: str | None, adapter: str | None) -> Path | None:
    """The adapter folder an engine applies.

    ``"default"`` is the shipped default adapter for the embedded default model, and nothing for
    another model; a shipped adapter's name (``PARTIAL_CREDIT_ADAPTER``) is that adapter, for the
    embedded default only; anything else is a local folder (which wins over a shipped name).

    Raises:
        ModelNotInstalledError: ``adapter`` names a folder without ``adapter_config.json``.
        CapEvalInputError: a shipped adapter is named for a model other than the embedded default.

    Example:
        >>> resolve_adapter("/models/llama", "default") is None  # no shipped adapter for other models
        True

    """
    from langchain_capeval.models import DEFAULT_MODEL

    if adapter is None:
        return None
    default_model = model in (None, DEFAULT_MODEL)
    if adapter == "default":
        shipped = default_adapter_path()
        return shipped if default_model and shipped is not None else None
    shipped = shipped_adapter_path(adapter)
    if shipped is not None and not Path(adapter).expanduser().is_dir():
        if not default_model:
            raise CapEvalInputError(
                f"adapter {adapter!r} is shipped for the embedded default {DEFAULT_MODEL}, not for model {model!r}"
            )
        return shipped
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
