"""Capability-aware self-evaluation training: on-policy data, a LoRA trainer, and its evaluation.

The pipeline, one module per stage, each with its config in :mod:`.config`:

1. :mod:`.dataset`: :class:`PreferenceDataBuilder` samples the model on prompts with checkable
   answers, labels each sample with its win-or-tie target and picks truncated prefixes
   (``capeval build-data``).
2. :mod:`.examples`: those samples tokenized exactly as the engine self-evaluates them,
   tree-packed (one sequence per sample, one branch per evaluated length).
3. :mod:`.trainer`: :class:`SelfEvalTrainer` fits a LoRA with soft cross-entropy on the answer
   token plus a regularizer that keeps generation unchanged (``capeval train``).
4. :mod:`.evaluate` and :mod:`.metrics`: AUROC, Brier, ECE, reliability diagram, best-of-N, base
   vs adapted on held-out prompts (``capeval eval-selfeval``).

Heavy modules (torch, transformers, peft) load only when their names are used.

Example:
    >>> from langchain_capeval.training import PreferenceDataConfig
    >>> PreferenceDataConfig(max_prompts_per_family=4).num_samples
    16

"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from langchain_capeval.training.config import (
    HELDOUT_FAMILY,
    TRAIN_FAMILIES,
    PreferenceDataConfig,
    SelfEvalEvalConfig,
    SelfEvalTrainingConfig,
)

if TYPE_CHECKING:
    from langchain_capeval.training.dataset import PreferenceDataBuilder, PromptRecord, read_records
    from langchain_capeval.training.evaluate import evaluate_self_evaluation
    from langchain_capeval.training.trainer import SelfEvalTrainer

_LAZY = {
    "PreferenceDataBuilder": "langchain_capeval.training.dataset",
    "PromptRecord": "langchain_capeval.training.dataset",
    "read_records": "langchain_capeval.training.dataset",
    "SelfEvalTrainer": "langchain_capeval.training.trainer",
    "evaluate_self_evaluation": "langchain_capeval.training.evaluate",
}


def __getattr__(name: str) -> Any:
    """Import heavy modules only when their names are used."""
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'langchain_capeval.training' has no attribute {name!r}")


__all__ = [
    "HELDOUT_FAMILY",
    "TRAIN_FAMILIES",
    "PreferenceDataBuilder",
    "PreferenceDataConfig",
    "PromptRecord",
    "SelfEvalEvalConfig",
    "SelfEvalTrainer",
    "SelfEvalTrainingConfig",
    "evaluate_self_evaluation",
    "read_records",
]
