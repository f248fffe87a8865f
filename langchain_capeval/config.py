"""The adaptive-compute policy, as one validated config object.

:class:`CapEvalConfig` says how ChatCapEval spends inference-time compute: which
strategy, the batch schedule of adaptive sampling, the accept threshold on
P(win or tie), the temperature annealing, the pruning checkpoints, and the
budget. It is separate from the engine that carries it out, immutable, and
validated at construction: a bad value fails with an error naming the field.

Example:
    >>> from langchain_capeval.config import CapEvalConfig
    >>> cfg = CapEvalConfig(accept_threshold=0.8, max_samples=8)
    >>> cfg.batch_schedule
    (1, 1, 2, 4, 8)
    >>> cfg.merged({"strategy": "best_of_n"}).strategy
    'best_of_n'
    >>> CapEvalConfig(accept_threshold=1.5)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    pydantic_core._pydantic_core.ValidationError: 1 validation error for CapEvalConfig
    accept_threshold
    ...

"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Strategy = Literal["adaptive", "best_of_n", "prune", "adaptive_prune"]


class CapEvalConfig(BaseModel):
    """How ChatCapEval spends compute on one request. Every field can be overridden per call."""

    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)

    strategy: Strategy = "adaptive"
    """``adaptive``: sample in growing batches, stop once the best self-evaluation clears
    ``accept_threshold``. ``best_of_n``: draw ``num_samples``, return the best-scored.
    ``prune``: start ``num_samples``, self-evaluate at ``prune_checkpoints``, keep the top
    ``keep_ratio``, finish the rest, return the best. ``adaptive_prune``: adaptive batches,
    each of more than one sample pruned as in ``prune``."""

    batch_schedule: tuple[int, ...] = (1, 1, 2, 4, 8)
    """Batch sizes of adaptive sampling, in order (the default draws at most 16 samples)."""

    accept_threshold: float = Field(default=0.8, ge=0.0, le=1.0)
    """Accept as soon as the best sample's P(win or tie) reaches this. 0.8 was the benchmark's best point
    for the first shipped adapter (docs/bench.md, "Defaults"); it depends on the adapter's calibration, so
    an adapter's folder may record its own (both shipped adapters: 0.7; ``adapters.adapter_policy``)."""

    initial_temperature: float = Field(default=0.4, ge=0.0, le=2.0)
    """Temperature of the first sample."""

    temperature: float = Field(default=0.8, ge=0.0, le=2.0)
    """Temperature reached by annealing (and of every sample of ``best_of_n`` and ``prune``)."""

    anneal_samples: int = Field(default=4, ge=0)
    """Samples over which the temperature rises linearly from ``initial_temperature`` to
    ``temperature``; 0 uses ``temperature`` throughout (no annealing)."""

    top_p: float = Field(default=0.95, gt=0.0, le=1.0)
    """Nucleus sampling mass."""

    max_new_tokens: int = Field(default=256, ge=1)
    """Most tokens of one sample."""

    num_samples: int = Field(default=8, ge=1)
    """Samples drawn by ``best_of_n`` and started by ``prune``."""

    prune_checkpoints: tuple[int, ...] = (8,)
    """Generated-token counts at which ``prune`` strategies self-evaluate and prune (measured on answers of up to
    48 tokens; for long answers a later checkpoint, such as the paper's 64 or 128, is the safer choice)."""

    keep_ratio: float = Field(default=0.25, gt=0.0, le=1.0)
    """Share of samples kept at each pruning checkpoint (at least one is kept)."""

    max_samples: int = Field(default=16, ge=1)
    """Budget: most samples drawn for one request."""

    max_total_tokens: int | None = Field(default=None, ge=1)
    """Budget: most tokens generated plus self-evaluation tokens for one request; ``None``: no limit."""

    deadline_s: float | None = Field(default=None, gt=0.0, allow_inf_nan=False)
    """Budget: seconds after which sampling stops and the best sample so far is returned; ``None``: no deadline
    (a finite number: an infinite one cannot be reported back as JSON)."""

    seed: int | None = Field(default=None, ge=0)
    """Seed of the request's samples; ``None`` draws a fresh one per request."""

    @field_validator("batch_schedule", "prune_checkpoints")
    @classmethod
    def _positive_nonempty(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if len(v) == 0:
            raise ValueError("must not be empty")
        if any(x < 1 for x in v):
            raise ValueError(f"every entry must be >= 1, got {v}")
        return v

    @field_validator("prune_checkpoints")
    @classmethod
    def _increasing(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if list(v) != sorted(set(v)):
            raise ValueError(f"must be strictly increasing, got {v}")
        return v

    @model_validator(mode="after")
    def _checkpoints_fit(self) -> CapEvalConfig:
        if self.strategy in ("prune", "adaptive_prune") and self.prune_checkpoints[0] >= self.max_new_tokens:
            raise ValueError(
                f"prune_checkpoints: the first checkpoint ({self.prune_checkpoints[0]}) must be below "
                f"max_new_tokens ({self.max_new_tokens}), or nothing is ever pruned"
            )
        return self

    def merged(self, overrides: Mapping[str, Any] | None) -> CapEvalConfig:
        """A new config with ``overrides`` applied and validated (this one is not changed)."""
        if not overrides:
            return self
        return CapEvalConfig.model_validate({**self.model_dump(), **dict(overrides)})

    @classmethod
    def field_names(cls) -> frozenset[str]:
        """Names of the fields, the keys accepted as per-call overrides."""
        return frozenset(cls.model_fields)
