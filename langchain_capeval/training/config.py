"""The three configs of the self-evaluation training pipeline: data, training, evaluation.

Each stage has one frozen, validated pydantic config; every field carries a docstring
that is also the help of its ``capeval`` flag (see :mod:`langchain_capeval.training.cli`).

- :class:`PreferenceDataConfig`: on-policy samples, rewards, win-or-tie targets, prefixes
  (``capeval build-data``, :class:`~langchain_capeval.training.dataset.PreferenceDataBuilder`).
- :class:`SelfEvalTrainingConfig`: the LoRA and its loss
  (``capeval train``, :class:`~langchain_capeval.training.trainer.SelfEvalTrainer`).
- :class:`SelfEvalEvalConfig`: held-out discrimination, calibration, best-of-N
  (``capeval eval-selfeval``, :func:`~langchain_capeval.training.evaluate.evaluate_self_evaluation`).

Example:
    >>> from langchain_capeval.training.config import PreferenceDataConfig, SelfEvalTrainingConfig
    >>> PreferenceDataConfig().num_samples, PreferenceDataConfig().temperature
    (16, 0.8)
    >>> SelfEvalTrainingConfig(lora_r=8).lora_alpha
    32
    >>> PreferenceDataConfig(families=("add1", "nope"))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    pydantic_core._pydantic_core.ValidationError: 1 validation error for PreferenceDataConfig
    families
      Value error, unknown task family 'nope'; valid families: ...

"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from langchain_capeval.adapters import AdapterScope
from langchain_capeval.tasks.answers import PARTIAL_CREDIT_MAX
from langchain_capeval.tasks.synthetic import FAMILIES

HELDOUT_FAMILY = "colors"
"""The synthetic family left out of training entirely, to measure generalisation."""

TRAIN_FAMILIES: tuple[str, ...] = ("add1", "sub1", "capitals", "opposites", "animal_legs", "compare")
"""The synthetic families the shipped adapter is trained on, and evaluated on by default.

The other families of the suite are opt in (``families=``): two-digit addition and the next
number are out of the embedded model's reach (docs/training.md section 22), and the four added
later are measured in section 23.
"""

LLAMA_LORA_MODULES: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""Attention and MLP projections of a Llama-style model: the LoRA targets vLLM accepts."""

Split = Literal["train", "dev", "test"]
RewardName = Literal["verifiable", "partial_credit"]


def _known_families(families: tuple[str, ...]) -> tuple[str, ...]:
    """Validate family names against the synthetic registry."""
    from langchain_capeval.errors import UnknownTaskFamilyError

    for name in families:
        if name not in FAMILIES:
            raise UnknownTaskFamilyError(name, list(FAMILIES))
    if len(set(families)) != len(families):
        raise ValueError(f"families must be distinct, got {families}")
    return families


def _lengths(values: tuple[int, ...]) -> tuple[int, ...]:
    """Validate a tuple of token counts: positive, strictly increasing."""
    if any(v < 1 for v in values) or list(values) != sorted(set(values)):
        raise ValueError(f"token lengths must be positive and strictly increasing, got {values}")
    return values


class _Config(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)


class PreferenceDataConfig(_Config):
    """How on-policy preference data is built: which prompts, how they are sampled and labelled."""

    output_dir: str = "results/training/data"
    """Folder of ``preferences.jsonl`` (one line per prompt; an existing file is resumed) and the data card."""

    model: str | None = None
    """Local model folder or ``.gguf`` file; ``None`` is the embedded default, SmolLM2-135M-Instruct."""

    families: tuple[str, ...] = TRAIN_FAMILIES
    """Synthetic task families to draw prompts from (the held-out family is left out by default)."""

    split: Split = "train"
    """Split of the synthetic suite to draw prompts from."""

    n_per_family: int = Field(default=60, ge=6)
    """Tasks per family in the suite draw (fixes the train/dev/test split; see ``build_suite``)."""

    max_prompts_per_family: int | None = Field(default=None, ge=1)
    """Most prompts taken per family from the split; ``None`` takes all."""

    seed: int = Field(default=0, ge=0)
    """Seed of the suite draw and of every sample's random stream."""

    num_samples: int = Field(default=16, ge=2)
    """On-policy samples per prompt (the paper uses 16)."""

    temperature: float = Field(default=0.8, ge=0.0, le=2.0)
    """Sampling temperature: the one used at inference (``CapEvalConfig.temperature``)."""

    top_p: float = Field(default=0.95, gt=0.0, le=1.0)
    """Nucleus sampling mass, as at inference."""

    max_new_tokens: int = Field(default=48, ge=1)
    """Most tokens per sample."""

    epsilon: float = Field(default=0.0, ge=0.0)
    """Largest reward gap that counts as a tie."""

    reward: RewardName = "verifiable"
    """How samples are scored: verifiable (the answer checker, 1 or 0) or partial_credit (1 if right, else below
    0.5 the nearer the answer); a reward source passed to the builder in Python overrides it."""

    prefix_lengths: tuple[int, ...] = (8, 16, 32, 64)
    """Truncation lengths (tokens) for mid-generation examples; a length is used only if the response is longer."""

    prefixes_per_sample: int = Field(default=2, ge=0)
    """Truncated prefixes kept per sample, drawn (seeded) from the eligible ``prefix_lengths``."""

    prompts_per_batch: int = Field(default=4, ge=1)
    """Prompts decoded together (``num_samples`` rows each) for throughput."""

    num_threads: int | None = Field(default=None, ge=1)
    """Torch CPU threads; ``None`` leaves torch's default."""

    _check_families = field_validator("families")(classmethod(lambda cls, v: _known_families(v)))
    _check_prefixes = field_validator("prefix_lengths")(classmethod(lambda cls, v: _lengths(v)))

    @model_validator(mode="after")
    def _tie_margin_below_partial_credit(self) -> PreferenceDataConfig:
        if self.reward == "partial_credit" and self.epsilon >= 1.0 - PARTIAL_CREDIT_MAX:
            raise ValueError(
                f"epsilon={self.epsilon} would tie near misses (partial credit up to {PARTIAL_CREDIT_MAX}) with "
                f"right answers (1.0); use epsilon < {1.0 - PARTIAL_CREDIT_MAX} with reward='partial_credit'"
            )
        return self


class SelfEvalTrainingConfig(_Config):
    """How the self-evaluation LoRA is trained: the adapter, the loss, the optimiser."""

    data: str = "results/training/data/preferences.jsonl"
    """The ``preferences.jsonl`` written by ``capeval build-data``."""

    output_dir: str = "results/training/adapter"
    """Folder to save the PEFT adapter (``adapter_config.json`` + ``adapter_model.safetensors``) and its log."""

    model: str | None = None
    """Local model folder or ``.gguf`` file; ``None`` is the embedded default (must be the model that sampled the
    data)."""

    exclude_families: tuple[str, ...] = ()
    """Task families to drop from the data before training (to hold one out)."""

    samples_per_prompt: int | None = Field(default=None, ge=1)
    """Train on the first this many samples of each prompt (targets still come from all of them: 16 samples
    give finer win-or-tie targets than 8, at half the training cost); ``None`` takes all."""

    seed: int = Field(default=0, ge=0)
    """Seed of the LoRA initialisation and the batch order."""

    lora_r: int = Field(default=16, ge=1)
    """LoRA rank."""

    lora_alpha: int = Field(default=32, ge=1)
    """LoRA scaling numerator (the update is scaled by ``lora_alpha / lora_r``)."""

    lora_dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    """Dropout on the LoRA input."""

    target_modules: tuple[str, ...] = LLAMA_LORA_MODULES
    """Module names the LoRA wraps; the default is every attention and MLP projection (valid for vLLM)."""

    layers_to_transform: tuple[int, ...] | None = None
    """Decoder layers that get a LoRA; ``None`` is every layer. Fewer, top layers train faster (backward stops
    at the lowest adapted layer), at some cost in quality."""

    answer_loss: Literal["full_vocab", "two_way"] = "full_vocab"
    """Soft cross-entropy on the answer token: ``full_vocab`` is -(p log P(No) + (1-p) log P(Yes)) under the
    full softmax (it also moves mass onto the two answers); ``two_way`` renormalises over "No" and "Yes" first."""

    scope: AdapterScope = "every_token"
    """Which tokens the adapter runs on (recorded in the adapter's ``capeval_adapter.json``): ``every_token`` is
    merged into the weights and serves generation too (vLLM serves it as a ``LoRARequest``); ``self_evaluation``
    runs on the self-evaluation chunk only, over the cache the base weights wrote, so generation stays the base
    model's exactly (transformers engine only; no regularizer needed)."""

    regularizer: Literal["sft", "kl", "none"] | None = None
    """What keeps generation as good as the base model's: ``sft`` adds the NLL of the on-policy response tokens
    (same forward pass, no extra cost); ``kl`` adds KL(base || adapted) on them (one extra no-grad forward);
    ``None``: ``sft`` for ``scope="every_token"``, ``none`` for ``scope="self_evaluation"`` (which leaves
    generation alone)."""

    regularizer_weight: float = Field(default=0.5, ge=0.0)
    """Weight of the regularizer relative to the answer loss."""

    learning_rate: float = Field(default=3e-4, gt=0.0)
    """Peak AdamW learning rate (linear warm-up, then cosine decay to 10%)."""

    weight_decay: float = Field(default=0.0, ge=0.0)
    """AdamW weight decay on the LoRA weights."""

    warmup_steps: int = Field(default=10, ge=0)
    """Linear warm-up steps."""

    epochs: float = Field(default=1.0, gt=0.0)
    """Passes over the data (fractions allowed)."""

    max_steps: int | None = Field(default=None, ge=1)
    """Stop after this many optimiser steps, whatever ``epochs`` says."""

    batch_tokens: int = Field(default=2048, ge=64)
    """Most tokens (padded) per optimiser step; sequences of similar length are batched together."""

    batch_order: Literal["length", "shuffled"] | None = None
    """``length``: sequences of similar length batched together (least padding); ``shuffled``: batches in a
    random order, mixing lengths and so task families (more padding); ``None``: ``length`` for
    ``scope="every_token"`` (the default adapter's recipe), ``shuffled`` for ``scope="self_evaluation"``
    (measured: pooled AUROC 0.741 against 0.658 with ``length``; docs/training.md section 13)."""

    max_grad_norm: float = Field(default=1.0, gt=0.0)
    """Gradient clipping norm."""

    train_prefixes: bool = True
    """Also train on the truncated prefixes the data holds (each inherits its completion's target); ``False``
    trains on full responses only."""

    pack_prefixes: bool = True
    """Pack the full response and its truncated prefixes into one sequence with a tree attention mask: the shared
    prompt and response are computed once, each (prefix, self-evaluation turn) branch sees only its prefix."""

    save_every: int | None = Field(default=None, ge=1)
    """Also save the adapter to ``output_dir`` every this many steps (a run cut short keeps its last save)."""

    keep_checkpoints: bool = False
    """With ``save_every``, also keep each of those saves in ``output_dir/checkpoint-{step}`` (a full adapter
    folder each; ``output_dir`` itself holds the latest), so that a step can be chosen afterwards by
    ``capeval eval-selfeval --adapter OUTPUT_DIR/checkpoint-STEP`` on held-out prompts."""

    log_every: int = Field(default=10, ge=1)
    """Log the running losses every this many steps."""

    num_threads: int | None = Field(default=None, ge=1)
    """Torch CPU threads; ``None`` leaves torch's default."""

    @model_validator(mode="after")
    def _modules(self) -> SelfEvalTrainingConfig:
        if not self.target_modules:
            raise ValueError("target_modules: give at least one module name")
        if self.keep_checkpoints and not self.save_every:
            raise ValueError("keep_checkpoints: give save_every too (the steps at which checkpoints are kept)")
        return self

    @model_validator(mode="before")
    @classmethod
    def _defaults_for_scope(cls, values: Any) -> Any:
        """Resolve ``regularizer`` and ``batch_order`` left unset from the scope; refuse a regularizer it can't use."""
        if not isinstance(values, dict):
            return values
        scoped = values.get("scope") == "self_evaluation"
        if values.get("batch_order") is None:
            values = {**values, "batch_order": "shuffled" if scoped else "length"}
        regularizer = values.get("regularizer")
        if regularizer is None:
            return {**values, "regularizer": "none" if scoped else "sft"}
        if scoped and regularizer != "none":
            raise ValueError(
                f"regularizer={regularizer!r} keeps generation close to the base model's, but an adapter with "
                "scope='self_evaluation' never runs on generated tokens; use regularizer='none' (or leave it unset)"
            )
        return values


class SelfEvalEvalConfig(_Config):
    """How a self-evaluation adapter is evaluated against the zero-shot base model, on held-out prompts."""

    adapter: str | None = "default"
    """Adapter folder to evaluate; ``"default"`` is the shipped one; ``None`` evaluates the base model alone."""

    model: str | None = None
    """Local model folder or ``.gguf`` file; ``None`` is the embedded default."""

    output_dir: str = "results/training"
    """Folder for ``selfeval_eval.json`` and ``reliability.png``."""

    families: tuple[str, ...] = TRAIN_FAMILIES
    """Trained task families, evaluated on ``split``."""

    heldout_family: str | None = HELDOUT_FAMILY
    """A family left out of training, evaluated on ``heldout_splits`` and reported apart; ``None`` skips it."""

    heldout_splits: tuple[Split, ...] = ("dev", "test")
    """Splits of the held-out family to evaluate (none of it was trained on, so more splits mean less noise)."""

    split: Split = "test"
    """Split of the trained families to evaluate."""

    n_per_family: int = Field(default=60, ge=6)
    """Tasks per family in the suite draw (must match the data's, so the splits match)."""

    suite_seed: int = Field(default=0, ge=0)
    """Seed of the suite draw (must match the data's)."""

    max_prompts_per_family: int | None = Field(default=None, ge=1)
    """Most prompts per family; ``None`` takes the whole split."""

    num_samples: int = Field(default=8, ge=1)
    """Samples per prompt (the N of best-of-N)."""

    temperature: float = Field(default=0.8, ge=0.0, le=2.0)
    """Sampling temperature, as at inference."""

    top_p: float = Field(default=0.95, gt=0.0, le=1.0)
    """Nucleus sampling mass, as at inference."""

    max_new_tokens: int = Field(default=48, ge=1)
    """Most tokens per sample."""

    checkpoints: tuple[int, ...] = (8, 16, 32, 64)
    """Prefix lengths (tokens) at which samples are self-evaluated mid-generation."""

    epsilon: float = Field(default=0.0, ge=0.0)
    """Tie threshold of the win-or-tie targets that calibration is measured against."""

    seed: int = Field(default=1234, ge=0)
    """Seed of the samples' random streams (different from the data's)."""

    bins: int = Field(default=10, ge=2)
    """Bins of the calibration error and the reliability diagram."""

    prompts_per_batch: int = Field(default=4, ge=1)
    """Prompts decoded together (``num_samples`` rows each)."""

    num_threads: int | None = Field(default=None, ge=1)
    """Torch CPU threads; ``None`` leaves torch's default."""

    _check_families = field_validator("families")(classmethod(lambda cls, v: _known_families(v)))
    _check_checkpoints = field_validator("checkpoints")(classmethod(lambda cls, v: _lengths(v)))

    @model_validator(mode="after")
    def _heldout(self) -> SelfEvalEvalConfig:
        if self.heldout_family is not None:
            _known_families((self.heldout_family,))
            if self.heldout_family in self.families:
                raise ValueError(f"heldout_family {self.heldout_family!r} is also in families; drop it from one")
        return self
