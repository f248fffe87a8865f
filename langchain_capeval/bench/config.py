"""The benchmark's settings, as one validated config object.

:class:`BenchConfig` says which prompts to benchmark (the synthetic suite or GSM8K), how the
on-policy sample pools are drawn (pool size, temperature, annealing, checkpoints), which
strategies are replayed over them (thresholds, keep ratios, batch schedule), how many prompts
also run live through the real graph, and which engine draws the samples (the transformers
engine, or an OpenAI-compatible server such as vLLM). Every field carries a docstring that is
also the help of its ``capeval bench`` flag (see :mod:`langchain_capeval.bench.cli`).

Example:
    >>> from langchain_capeval.bench.config import BenchConfig
    >>> cfg = BenchConfig(families=("add1",), max_prompts=2)
    >>> cfg.output_dir, cfg.max_new_tokens, cfg.pool_size
    ('results/bench/synthetic-test', 48, 16)
    >>> BenchConfig(task="gsm8k").max_new_tokens  # a longer default for chains of thought
    384
    >>> BenchConfig(keep_ratios=(0.0,))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    pydantic_core._pydantic_core.ValidationError: 1 validation error for BenchConfig
    keep_ratios
      Value error, every keep ratio must be in (0, 1], got (0.0,) ...

"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from langchain_capeval.tasks.synthetic import FAMILIES

LiveStrategy = Literal["single_sample", "best_of_n", "adaptive", "prune", "adaptive_prune"]
"""Strategies that can be run live, end to end, to measure wall time."""

DEFAULT_MAX_NEW_TOKENS = {"synthetic": 48, "gsm8k": 384}
"""``max_new_tokens`` when not given: short answers for the synthetic suite, room for a chain of thought on GSM8K."""

COLLECTION_FIELDS = (
    "task",
    "families",
    "split",
    "n_per_family",
    "suite_seed",
    "pool_size",
    "temperature",
    "initial_temperature",
    "anneal_samples",
    "top_p",
    "max_new_tokens",
    "checkpoints",
    "seed",
    "judge",
    "judge_max_new_tokens",
    "self_certainty",
)
"""Fields that change the recorded sample pools: a resumed run must keep them (``max_prompts`` may grow)."""


class BenchConfig(BaseModel):
    """What ``capeval bench`` measures: the prompts, the sample pools, the strategies replayed, the engine."""

    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)

    # -- prompts --------------------------------------------------------------------------------

    task: Literal["synthetic", "gsm8k"] = "synthetic"
    """Prompt source: the seeded synthetic suite (``families``, ``split``) or GSM8K (``split`` train or test)."""

    families: tuple[str, ...] = tuple(FAMILIES)
    """Synthetic task families to benchmark (all of them by default, the one held out of training included)."""

    split: Literal["train", "dev", "test"] = "test"
    """Split to benchmark: of the synthetic suite, or of GSM8K (``train`` or ``test``)."""

    n_per_family: int = Field(default=60, ge=6)
    """Tasks per family in the synthetic suite draw (fixes the split; must match training's to keep them apart)."""

    suite_seed: int = Field(default=0, ge=0)
    """Seed of the synthetic suite draw, or of the GSM8K shuffle before ``max_prompts`` is applied."""

    max_prompts: int | None = Field(default=None, ge=1)
    """Benchmark the first this many prompts of the split; ``None`` takes all. Raising it later resumes."""

    # -- sample pools ---------------------------------------------------------------------------

    pool_size: int = Field(default=16, ge=2, le=256)
    """Samples per pool: the largest N of best-of-N, and the most samples adaptive sampling may draw."""

    temperature: float = Field(default=0.8, gt=0.0, le=2.0)
    """Temperature T of the fixed-temperature pool (best-of-N, pruning, single sample at T), reached by annealing."""

    initial_temperature: float = Field(default=0.4, ge=0.0, le=2.0)
    """Temperature of the annealed pool's first sample (``CapEvalConfig.initial_temperature``)."""

    anneal_samples: int = Field(default=4, ge=0)
    """Samples over which the annealed pool's temperature rises to T (``CapEvalConfig.anneal_samples``)."""

    top_p: float = Field(default=0.95, gt=0.0, le=1.0)
    """Nucleus sampling mass of every sample."""

    max_new_tokens: int = Field(default=48, ge=2)
    """Most tokens per sample (default 48 for the synthetic suite, 384 for GSM8K)."""

    checkpoints: tuple[int, ...] = (8, 16, 32, 64, 128)
    """Token counts at which unfinished samples are self-evaluated mid-generation; those at or above
    ``max_new_tokens`` are skipped. Pruning is replayed at each of them."""

    seed: int = Field(default=0, ge=0)
    """Seed of every sample's random stream (per prompt and sample number, as the graph seeds them)."""

    judge: bool = True
    """Also ask the same model, in a new chat, to rate each sample 0-10 (the LLM-as-judge baseline)."""

    judge_max_new_tokens: int = Field(default=8, ge=1)
    """Most tokens of a judge's rating (greedy)."""

    self_certainty: bool = True
    """Also score each sample's self-certainty (needs the transformers engine's full next-token distributions)."""

    # -- replayed strategies --------------------------------------------------------------------

    thresholds: tuple[float, ...] = (0.0, 0.2, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 0.99, 1.0)
    """Accept thresholds on P(win or tie) swept by adaptive sampling (with and without annealing, and with pruning)."""

    keep_ratios: tuple[float, ...] = (0.25, 0.5)
    """Shares of the unfinished samples kept at a pruning checkpoint, each replayed at each checkpoint."""

    batch_schedule: tuple[int, ...] = (1, 1, 2, 4, 8)
    """Batch sizes of adaptive sampling, in order (capped at ``pool_size`` samples in all)."""

    bootstrap_iterations: int = Field(default=1000, ge=10)
    """Resamples of the prompts for the 95% bootstrap intervals (seeded by ``seed``)."""

    focus_prune_checkpoint: int | None = Field(default=None, ge=1)
    """Pruning checkpoint of adaptive+pruning in the Markdown table and plots, and of the live pruning runs (every
    setting is in results.json); ``None``: the largest checkpoint at most half of ``max_new_tokens``, else the
    first."""

    focus_keep_ratio: float = Field(default=0.5, gt=0.0, le=1.0)
    """Keep ratio that goes with ``focus_prune_checkpoint``."""

    # -- live runs ------------------------------------------------------------------------------

    live_prompts: int = Field(default=8, ge=0)
    """Prompts (the first of the split) also run end to end through the real graph, to measure wall time beside
    the replayed figures; 0 skips the live runs."""

    live_strategies: tuple[LiveStrategy, ...] = ("single_sample", "best_of_n", "adaptive", "prune")
    """Strategies run live: a single sample at T, best-of-``pool_size``, adaptive at ``live_accept_threshold``,
    pruning (and adaptive+pruning) at the focus setting."""

    live_accept_threshold: float = Field(default=0.5, ge=0.0, le=1.0)
    """Accept threshold of the live adaptive runs."""

    # -- output ---------------------------------------------------------------------------------

    name: str | None = None
    """Name of the run; ``None``: ``<task>-<split>``."""

    output_dir: str | None = None
    """Folder of pools.jsonl (resumed), live.jsonl, results.json, results.md and the plots; ``None``:
    ``results/bench/<name>``."""

    progress: bool = True
    """Show progress bars."""

    prompts_per_batch: int = Field(default=1, ge=1)
    """Prompts whose pools are decoded together (throughput on a GPU or a server; pool seconds are then shared)."""

    # -- engine ---------------------------------------------------------------------------------

    model: str | None = None
    """Transformers engine: local model folder or ``.gguf`` file; ``None`` is the embedded default."""

    adapter: str | None = "default"
    """Transformers engine: self-evaluation adapter folder or shipped name; ``"default"`` is the shipped default
    (default model only); ``None`` runs the base model."""

    device: str = "cpu"
    """Transformers engine: torch device."""

    dtype: str = "float32"
    """Transformers engine: torch dtype name."""

    num_threads: int | None = Field(default=None, ge=1)
    """Transformers engine: torch CPU threads; ``None`` leaves torch's default."""

    base_url: str | None = None
    """An OpenAI-compatible server's API root with ``/v1`` (for example vLLM's ``http://localhost:8000/v1``);
    when given, samples come from it instead of the transformers engine."""

    served_model: str | None = None
    """The server's model name (vLLM's ``--served-model-name``, or the LoRA module's name); needed with
    ``base_url``."""

    tokenizer: str | None = None
    """Local folder of the served model's Hugging Face tokenizer (chat template); ``None``: the embedded
    default's."""

    api_key_env: str | None = None
    """Name of an environment variable holding the server's bearer token, if it wants one."""

    # -- validation -----------------------------------------------------------------------------

    @model_validator(mode="before")
    @classmethod
    def _fill_defaults(cls, data: Any) -> Any:
        """Fill the task-dependent defaults: ``max_new_tokens``, ``name`` and ``output_dir``."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        task = data.get("task", "synthetic")
        if data.get("max_new_tokens") is None and task in DEFAULT_MAX_NEW_TOKENS:
            data["max_new_tokens"] = DEFAULT_MAX_NEW_TOKENS[task]
        if data.get("name") is None:
            data["name"] = f"{task}-{data.get('split', 'test')}"
        if data.get("output_dir") is None:
            data["output_dir"] = str(Path("results") / "bench" / str(data["name"]))
        return data

    @field_validator("families")
    @classmethod
    def _known_families(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        from langchain_capeval.errors import UnknownTaskFamilyError

        if not v:
            raise ValueError("give at least one family")
        for name in v:
            if name not in FAMILIES:
                raise UnknownTaskFamilyError(name, list(FAMILIES))
        if len(set(v)) != len(v):
            raise ValueError(f"families must be distinct, got {v}")
        return v

    @field_validator("checkpoints")
    @classmethod
    def _increasing(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if not v or any(c < 1 for c in v) or list(v) != sorted(set(v)):
            raise ValueError(f"checkpoints must be positive and strictly increasing, got {v}")
        return v

    @field_validator("batch_schedule")
    @classmethod
    def _schedule(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if not v or any(b < 1 for b in v):
            raise ValueError(f"batch_schedule must be non-empty with every batch >= 1, got {v}")
        return v

    @field_validator("thresholds")
    @classmethod
    def _thresholds(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if not v or any(not 0.0 <= t <= 1.0 for t in v) or len(set(v)) != len(v):
            raise ValueError(f"thresholds must be distinct values in [0, 1], got {v}")
        return v

    @field_validator("keep_ratios")
    @classmethod
    def _keep_ratios(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if not v or any(not 0.0 < k <= 1.0 for k in v) or len(set(v)) != len(v):
            raise ValueError(f"every keep ratio must be in (0, 1], got {v} (and distinct)")
        return v

    @field_validator("live_strategies")
    @classmethod
    def _live_strategies(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(v)) != len(v):
            raise ValueError(f"live_strategies must be distinct, got {v}")
        return v

    @field_validator("name")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", v):
            raise ValueError(f"name must be letters, digits, '.', '_' or '-', got {v!r}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> BenchConfig:
        if self.task == "gsm8k" and self.split == "dev":
            raise ValueError("split: GSM8K has only 'train' and 'test'")
        if not self.collected_checkpoints:
            raise ValueError(
                f"checkpoints: none of {self.checkpoints} is below max_new_tokens ({self.max_new_tokens}); "
                "pruning needs at least one"
            )
        c = self.focus_prune_checkpoint
        if c is not None and c not in self.collected_checkpoints:
            raise ValueError(
                f"focus_prune_checkpoint: {c} is not one of the checkpoints below max_new_tokens "
                f"{self.collected_checkpoints}"
            )
        if self.base_url is not None and not self.served_model:
            raise ValueError("served_model: give the server's model name with base_url (see GET /v1/models)")
        return self

    # -- derived values -------------------------------------------------------------------------

    @property
    def collected_checkpoints(self) -> tuple[int, ...]:
        """The checkpoints samples are self-evaluated at: those below ``max_new_tokens``."""
        return tuple(c for c in self.checkpoints if c < self.max_new_tokens)

    @property
    def prune_checkpoint(self) -> int:
        """The focus pruning checkpoint, resolved (see ``focus_prune_checkpoint``).

        Example:
            >>> BenchConfig().prune_checkpoint, BenchConfig(max_new_tokens=12, checkpoints=(4, 8)).prune_checkpoint
            (16, 4)

        """
        if self.focus_prune_checkpoint is not None:
            return self.focus_prune_checkpoint
        fits = [c for c in self.collected_checkpoints if 2 * c <= self.max_new_tokens]
        return fits[-1] if fits else self.collected_checkpoints[0]

    @property
    def path(self) -> Path:
        """The output folder."""
        assert self.output_dir is not None  # filled by the before-validator
        return Path(self.output_dir)

    def collection_settings(self) -> dict[str, Any]:
        """The settings that change the recorded pools (see :data:`COLLECTION_FIELDS`)."""
        dumped = self.model_dump(mode="json")
        unused = {"families", "n_per_family"} if self.task == "gsm8k" else set()
        return {k: dumped[k] for k in COLLECTION_FIELDS if k not in unused}
