"""The vLLM engine: rows as requests to one in-process vLLM engine, with prefix caching.

The engine implements the :class:`~langchain_capeval.engines.base.Engine` protocol on a
vLLM ``LLMEngine`` that it steps itself (no server, no HTTP). It knows token ids and rows;
chat templates stay in :class:`~langchain_capeval.chat_format.ChatFormat`.

* **A row is a chain of vLLM requests** (``n=1`` each, so one sample can be aborted alone).
  ``generate(rows, until=k)`` adds, for every row, one request over prompt + the row's tokens
  so far with ``max_tokens = min(k, max_new_tokens) - len(tokens)``, then calls
  ``LLMEngine.step()`` until those requests finish: the checkpoint. Calling again adds the
  continuation. The prefix cache holds the prompt and every full block of the response, so a
  continuation recomputes at most the last partial block.
* **Seeds per chunk.** The first request of a row uses the row's seed; a continuation from
  token ``t`` uses :func:`chunk_seed` ``(seed, t)``. A row's tokens therefore depend on its
  seed, its settings and *where its checkpoints were*, never on self-evaluations, on the rows
  beside it or on timing. (The transformers engine keeps one random stream per row, so there
  the checkpoints do not matter either; greedy rows are the same in both.)
* **Self-evaluation** is one request per row over prompt + response + the self-evaluation
  turn (:func:`self_evaluation_prompt`), ``max_tokens=1``, ``temperature=0``, with the same
  LoRA adapter as generation, so it hits the prefix cache of the response and computes only
  the turn. P("No") and P("Yes") come from ``logprob_token_ids`` where the installed vLLM has
  it (vLLM's generative-scoring change, 2026), else from the top-``k`` logprobs (an answer
  outside them counts as 0). ``prompt_logprobs`` are never used: they bypass the cache.
* **Finishing** follows the transformers engine exactly (:func:`apply_new_tokens`): an
  end-of-turn token ends the row with ``"eos"`` (and stays in its tokens), a stop string in
  the row's whole text ends it with ``"stop"`` (the text is cut before it), ``max_new_tokens``
  with ``"length"``. Stop strings are matched here, across checkpoints, not by vLLM.
* ``release`` aborts the rows' requests in flight; ``close_request`` frees a whole request.

Usage is counted as the protocol defines it: the prompt once per request, every kept
token, and 1 + the self-evaluation turn per self-evaluation
(:func:`self_evaluation_cost`); what the prefix cache actually saved is in
:meth:`VLLMEngine.prefix_cache_stats`. Public methods are thread-safe: one lock guards the
engine, and it is released between engine steps, so the rows of concurrent requests
(other threads) are stepped together in the same vLLM batches.

Importing this module never imports vLLM; :meth:`VLLMEngine.from_config` does, and without
it raises :class:`~langchain_capeval.errors.MissingExtraError` naming
``pip install 'langchain-capeval[vllm]'``.

Example:
    >>> from langchain_capeval.engines.vllm import VLLMEngine, VLLMEngineConfig
    >>> engine = VLLMEngine.from_config(VLLMEngineConfig(model="/models/llama-3.1-8b-instruct",
    ...                                                  adapter="/models/llama-3.1-8b-selfeval"))  # doctest: +SKIP
    >>> prompt = engine.chat_format.encode([{"role": "user", "content": "What is 2 + 3?"}])  # doctest: +SKIP
    >>> rows = engine.submit(prompt, [SamplingParams(temperature=0.8, seed=s) for s in range(8)])  # doctest: +SKIP
    >>> engine.generate(rows, until=64)  # the checkpoint  # doctest: +SKIP
    >>> [e.p_win_or_tie for e in engine.self_evaluate(rows)]  # doctest: +SKIP
    >>> engine.release(rows[4:])  # prune: their requests are aborted  # doctest: +SKIP
    >>> samples = engine.generate(rows[:4])  # continue the survivors to the end  # doctest: +SKIP

"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import itertools
import json
import math
import os
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from langchain_capeval.chat_format import ChatFormat
from langchain_capeval.engines.base import (
    CancelledRequests,
    FinishReason,
    RowId,
    Sample,
    SelfEvaluation,
    Usage,
    check_until,
    checked_submission,
)
from langchain_capeval.engines.decoding import win_or_tie_probability
from langchain_capeval.errors import (
    CapEvalInputError,
    EngineClosedError,
    InvalidSamplingError,
    MissingExtraError,
    ModelNotInstalledError,
    UnknownRowError,
    UnsupportedFeatureError,
)
from langchain_capeval.sampling import SamplingParams

VLLM_INSTALL = "pip install 'langchain-capeval[vllm]'"
"""The command that installs the vLLM extra (vLLM needs a CUDA GPU)."""

MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""The values vLLM accepts for ``max_lora_rank`` (``vllm.config.lora.MaxLoRARanks``)."""

LORA_NAME = "capeval-selfeval"
"""Name of the self-evaluation adapter's ``LoRARequest``."""

NAMED_ENGINE_ARGS = frozenset(
    {
        "model",
        "tokenizer",
        "dtype",
        "seed",
        "tensor_parallel_size",
        "gpu_memory_utilization",
        "enforce_eager",
        "enable_prefix_caching",
        "max_logprobs",
        "max_model_len",
        "max_num_seqs",
        "enable_lora",
        "max_lora_rank",
        "max_loras",
    }
)
"""``vllm.EngineArgs`` settings that :class:`VLLMEngineConfig` sets itself (``extra_engine_args`` may not)."""

SelfEvalLogprobs = Literal["auto", "token_ids", "top_k"]


class VLLMEngineConfig(BaseModel):
    """How to build a :class:`VLLMEngine`: the model, its adapter, and vLLM's engine settings."""

    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)

    model: str | None = None
    """Local Hugging Face model folder or ``.gguf`` file (converted once to a cached folder); ``None`` is the
    embedded default, SmolLM2-135M-Instruct. Models are never downloaded at run time."""
    adapter: str | None = "default"
    """LoRA self-evaluation adapter folder (PEFT format), served through one ``LoRARequest`` for generation and
    self-evaluation alike; ``"default"`` is the one shipped for the default model (if any, and only for that
    model); ``None`` runs the base model."""
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = "auto"
    """vLLM's ``dtype`` (``"auto"``: the checkpoint's, with float32 checkpoints run in half precision)."""
    tensor_parallel_size: int = Field(default=1, ge=1)
    """GPUs one model is split across (vLLM's ``tensor_parallel_size``)."""
    gpu_memory_utilization: float = Field(default=0.9, gt=0.0, le=1.0)
    """Share of the GPU memory vLLM may take for weights and KV cache."""
    max_model_len: int | None = Field(default=None, ge=64)
    """Most tokens per sequence (prompt + response + self-evaluation turn); ``None``: the model's."""
    max_lora_rank: int | None = None
    """vLLM's ``max_lora_rank`` (one of 1, 8, 16, 32, 64, 128, 256, 320, 512); ``None``: the adapter's rank
    ``r`` rounded up to the next of those."""
    max_num_seqs: int | None = Field(default=None, ge=1)
    """Most sequences vLLM runs in one step; ``None``: vLLM's default."""
    seed: int = Field(default=0, ge=0)
    """vLLM's engine seed. Each row is sampled with its own seed (:func:`chunk_seed`)."""
    enforce_eager: bool = False
    """Run without CUDA graphs (faster start, slower decoding)."""
    enable_prefix_caching: bool = True
    """Automatic prefix caching: a request's rows share the prompt, continuations and self-evaluations reuse
    the response. Turn off only to measure what it saves."""
    multiprocessing: bool = True
    """Run vLLM's engine core in its own process (vLLM's default). ``False`` sets
    ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` for this process: the core runs in-process and steps only when the
    engine asks, which makes scheduling deterministic (vLLM's reproducibility advice)."""
    self_eval_logprobs: SelfEvalLogprobs = "auto"
    """How P("No") and P("Yes") are read: ``"token_ids"`` through ``SamplingParams.logprob_token_ids`` (exact;
    recent vLLM), ``"top_k"`` from the top ``top_logprobs`` (an answer outside them counts as 0), ``"auto"``
    the first where the installed vLLM has it."""
    top_logprobs: int = Field(default=20, ge=2)
    """Alternatives asked for with ``self_eval_logprobs="top_k"`` (vLLM's ``max_logprobs`` is raised to it)."""
    extra_engine_args: dict[str, Any] = Field(default_factory=dict)
    """Further ``vllm.EngineArgs`` settings that this config does not name (for example ``max_num_batched_tokens``,
    ``kv_cache_dtype``, ``quantization``)."""

    @field_validator("max_lora_rank")
    @classmethod
    def _check_lora_rank(cls, v: int | None) -> int | None:
        if v is not None and v not in MAX_LORA_RANKS:
            raise ValueError(f"max_lora_rank must be one of {', '.join(map(str, MAX_LORA_RANKS))}, got {v}")
        return v

    @model_validator(mode="after")
    def _check_extra_engine_args(self) -> VLLMEngineConfig:
        clash = sorted(set(self.extra_engine_args) & NAMED_ENGINE_ARGS)
        if clash:
            raise ValueError(
                f"extra_engine_args: {', '.join(clash)} are set from this config's own fields or from the adapter; "
                "use those"
            )
        return self


# -- pure functions (no vLLM needed) -----------------------------------------------------------


def engine_args_kwargs(config: VLLMEngineConfig, model_path: str, *, lora_rank: int | None) -> dict[str, Any]:
    """The keyword arguments of ``vllm.EngineArgs`` for ``config``; LoRA is enabled iff ``lora_rank`` is given.

    Example:
        >>> kw = engine_args_kwargs(VLLMEngineConfig(adapter=None), "/m", lora_rank=None)
        >>> kw["enable_prefix_caching"], "enable_lora" in kw
        (True, False)
        >>> engine_args_kwargs(VLLMEngineConfig(), "/m", lora_rank=16)["max_lora_rank"]
        16

    """
    kwargs: dict[str, Any] = {
        "model": model_path,
        "tokenizer": model_path,
        "dtype": config.dtype,
        "seed": config.seed,
        "tensor_parallel_size": config.tensor_parallel_size,
        "gpu_memory_utilization": config.gpu_memory_utilization,
        "enforce_eager": config.enforce_eager,
        "enable_prefix_caching": config.enable_prefix_caching,
        "max_logprobs": max(20, config.top_logprobs),
        "disable_log_stats": True,
    }
    if config.max_model_len is not None:
        kwargs["max_model_len"] = config.max_model_len
    if config.max_num_seqs is not None:
        kwargs["max_num_seqs"] = config.max_num_seqs
    if lora_rank is not None:
        kwargs.update(enable_lora=True, max_lora_rank=lora_rank, max_loras=1)
    kwargs.update(config.extra_engine_args)
    return kwargs


def lora_rank_slot(rank: int) -> int:
    """The smallest ``max_lora_rank`` vLLM accepts that holds an adapter of rank ``rank``.

    Raises:
        CapEvalInputError: ``rank`` is above vLLM's largest (512) or below 1.

    Example:
        >>> lora_rank_slot(16), lora_rank_slot(12), lora_rank_slot(1)
        (16, 16, 1)

    """
    for slot in MAX_LORA_RANKS:
        if rank >= 1 and slot >= rank:
            return slot
    raise CapEvalInputError(f"LoRA rank {rank} is outside what vLLM serves (1..{MAX_LORA_RANKS[-1]})")


def adapter_rank(adapter: str | os.PathLike[str]) -> int:
    """The largest LoRA rank of a PEFT adapter folder: ``r`` and any ``rank_pattern`` override.

    Raises:
        ModelNotInstalledError: ``adapter`` is not a folder holding ``adapter_config.json``.

    """
    path = Path(adapter).expanduser() / "adapter_config.json"
    if not path.is_file():
        raise ModelNotInstalledError(f"adapter {str(adapter)!r} is not a folder holding adapter_config.json")
    cfg = json.loads(path.read_text())
    ranks = [int(cfg.get("r", 8)), *(int(v) for v in (cfg.get("rank_pattern") or {}).values())]
    return max(ranks)


def resolve_model_folder(model: str | None) -> tuple[Path, str]:
    """The Hugging Face folder vLLM loads for ``model``, and the model's display name.

    A ``.gguf`` file (the embedded default is one) is dequantised once into the cached folder
    that the transformers engine also uses.

    Raises:
        ModelNotInstalledError: The model is not on this machine.

    """
    from langchain_capeval.models import DEFAULT_MODEL, ensure_model_folder

    folder, _ = ensure_model_folder(model)
    name = DEFAULT_MODEL if model in (None, DEFAULT_MODEL) else Path(str(model)).name
    return folder, name


def chunk_seed(seed: int, start: int) -> int:
    """The seed of the vLLM request that generates a row's tokens from its ``start``-th on.

    The first request (``start=0``) uses the row's own seed, so an uninterrupted row is vLLM's
    plain seeded sample; a continuation gets a seed derived from (seed, start), in [0, 2**31).

    Example:
        >>> chunk_seed(7, 0)
        7
        >>> chunk_seed(7, 64) == chunk_seed(7, 64) != chunk_seed(7, 65)
        True

    """
    if start == 0:
        return seed
    digest = hashlib.blake2b(f"capeval-chunk:{seed}:{start}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % 2**31


def chunk_max_tokens(generated: int, max_new_tokens: int, until: int | None) -> int:
    """``max_tokens`` of a row's next request: up to the checkpoint ``until``, never past ``max_new_tokens``.

    Example:
        >>> chunk_max_tokens(0, 256, 64), chunk_max_tokens(64, 256, None), chunk_max_tokens(60, 62, 64)
        (64, 192, 2)

    """
    target = max_new_tokens if until is None else min(until, max_new_tokens)
    return max(target - generated, 0)


def find_stop(text: str, stop: Sequence[str]) -> int | None:
    """Character offset where the first stop string found in ``text`` starts, or ``None``.

    Example:
        >>> find_stop("Once upon a time", ("time", "upon")), find_stop("abc", ("x",))
        (5, None)

    """
    hits = [text.find(s) for s in stop if s in text]
    return min(hits) if hits else None


@dataclass(frozen=True)
class TokenUpdate:
    """A row after new tokens arrived.

    Attributes:
        token_ids: The row's tokens, with the new ones it keeps.
        accepted: How many of the new tokens it keeps (the rest came after it finished).
        finish_reason: ``"eos"``, ``"stop"`` or ``"length"`` if the row finished.
        stop_at: Character offset of the matched stop string (``"stop"`` only).

    """

    token_ids: list[int]
    accepted: int
    finish_reason: FinishReason | None
    stop_at: int | None


def apply_new_tokens(
    token_ids: Sequence[int],
    new_tokens: Sequence[int],
    *,
    eos_token_ids: frozenset[int] | set[int],
    max_new_tokens: int,
    stop: Sequence[str],
    decode: Callable[[Sequence[int]], str],
) -> TokenUpdate:
    """Append tokens one by one, finishing the row exactly as the transformers engine does.

    After each token: an end-of-turn token finishes with ``"eos"`` (kept in the tokens); else a
    stop string anywhere in the decoded text finishes with ``"stop"``; else reaching
    ``max_new_tokens`` finishes with ``"length"``. Tokens after the finishing one are dropped.

    Example:
        >>> decode = lambda ids: "".join(chr(96 + i) for i in ids if i)  # 1 -> "a", 0 is EOS
        >>> u = apply_new_tokens([1], [2, 3, 4], eos_token_ids={0}, max_new_tokens=9, stop=("bc",), decode=decode)
        >>> u.token_ids, u.accepted, u.finish_reason, u.stop_at
        ([1, 2, 3], 2, 'stop', 1)
        >>> apply_new_tokens([], [5, 0, 6], eos_token_ids={0}, max_new_tokens=9, stop=(), decode=decode).token_ids
        [5, 0]

    """
    ids = list(token_ids)
    for k, t in enumerate(new_tokens):
        ids.append(int(t))
        if t in eos_token_ids:
            return TokenUpdate(ids, k + 1, "eos", None)
        if stop:
            at = find_stop(decode(ids), stop)
            if at is not None:
                return TokenUpdate(ids, k + 1, "stop", at)
        if len(ids) >= max_new_tokens:
            return TokenUpdate(ids, k + 1, "length", None)
    return TokenUpdate(ids, len(new_tokens), None, None)


def finish_from_vllm(
    finish_reason: str | None, stop_reason: int | str | None, token_ids: Sequence[int]
) -> tuple[FinishReason | None, int | None]:
    """How a row ends when vLLM finished its request before :func:`apply_new_tokens` ended the row.

    vLLM's ``"stop"`` with no stop string is one of the model's own end tokens (its generation
    config may list more than the chat format knows): the row ends with ``"eos"``, and a stop
    token vLLM left out of the tokens is returned to append. ``"length"`` (the chunk reached its
    checkpoint) and ``"abort"`` leave the row open.

    Returns:
        The finish reason (``None``: the row may continue) and a token to append, if any.

    Example:
        >>> finish_from_vllm("stop", None, [5, 9]), finish_from_vllm("stop", 2, [5])
        (('eos', None), ('eos', 2))
        >>> finish_from_vllm("length", None, [5]), finish_from_vllm("stop", "###", [5])
        ((None, None), ('stop', None))

    """
    if finish_reason != "stop":
        return None, None
    if isinstance(stop_reason, str):
        return "stop", None
    if isinstance(stop_reason, int) and (not token_ids or token_ids[-1] != stop_reason):
        return "eos", stop_reason
    return "eos", None


def self_evaluation_prompt(prompt_ids: Sequence[int], token_ids: Sequence[int], chat_format: ChatFormat) -> list[int]:
    """Prompt + response + the self-evaluation turn: the sequence whose next token is read as No/Yes.

    Its prefix (prompt + response) is what generation left in vLLM's prefix cache, so only the
    last partial block and the turn are computed.
    """
    return [*prompt_ids, *token_ids, *chat_format.suffix_after(token_ids)]


def self_evaluation_cost(token_ids: Sequence[int], chat_format: ChatFormat) -> int:
    """Self-evaluation tokens charged to a row, as the transformers engine counts them.

    The pending last token plus the self-evaluation turn (a row with no tokens yet has no pending token).
    """
    return len(chat_format.suffix_after(token_ids)) + (1 if token_ids else 0)


def read_answer_logprobs(
    position: Mapping[int, Any] | None, no_id: int, yes_id: int, *, exact: bool
) -> tuple[float, float]:
    """Raw P("No") and P("Yes") from vLLM's logprobs of the one generated position.

    ``position`` maps token ids to ``vllm.logprobs.Logprob`` (or to plain log-probabilities).
    With ``exact`` (the answers were asked for through ``logprob_token_ids``) a missing answer
    is an error; from top-k logprobs it counts as probability 0.

    Raises:
        UnsupportedFeatureError: No logprobs came back, or an answer asked for exactly is missing.

    Example:
        >>> read_answer_logprobs({17: -0.5, 42: -1.5, 3: -2.0}, 17, 42, exact=True)
        (0.6065306597126334, 0.22313016014842982)
        >>> read_answer_logprobs({17: -0.5}, 17, 42, exact=False)
        (0.6065306597126334, 0.0)

    """
    if not position:
        raise UnsupportedFeatureError(
            "vLLM returned no logprobs for the self-evaluation token; it needs SamplingParams.logprobs "
            "(or logprob_token_ids) support in the installed vLLM"
        )

    def probability(token_id: int) -> float:
        entry = position.get(token_id)
        if entry is None:
            if exact:
                raise UnsupportedFeatureError(
                    f"vLLM returned no logprob for answer token {token_id} although it was asked for through "
                    "logprob_token_ids; set VLLMEngineConfig(self_eval_logprobs='top_k') to read top-k logprobs"
                )
            return 0.0
        value = float(getattr(entry, "logprob", entry))
        return math.exp(value) if value > -math.inf else 0.0

    return probability(no_id), probability(yes_id)


def supports_logprob_token_ids(sampling_params_cls: type) -> bool:
    """Whether a vLLM ``SamplingParams`` class has the ``logprob_token_ids`` field (recent vLLM only)."""
    fields = getattr(sampling_params_cls, "__struct_fields__", None)  # a msgspec Struct
    if fields is not None:
        return "logprob_token_ids" in fields
    try:
        return "logprob_token_ids" in inspect.signature(sampling_params_cls).parameters
    except (TypeError, ValueError):
        return False


def generation_sampling_kwargs(
    params: SamplingParams, *, seed: int, max_tokens: int, eos_token_ids: frozenset[int]
) -> dict[str, Any]:
    """``vllm.SamplingParams`` keyword arguments of one chunk of a row.

    Stop strings are not passed (the engine matches them on the row's whole text, across
    chunks), nor is detokenization asked for; the chat format's end-of-turn tokens are
    ``stop_token_ids`` so vLLM ends the request where the engine ends the row.

    Example:
        >>> kw = generation_sampling_kwargs(SamplingParams(temperature=0.5, stop=("x",), seed=3), seed=3,
        ...                                 max_tokens=64, eos_token_ids=frozenset({2, 0}))
        >>> kw["n"], kw["seed"], kw["max_tokens"], kw["stop_token_ids"], "stop" in kw
        (1, 3, 64, [0, 2], False)

    """
    return {
        "n": 1,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "seed": seed,
        "max_tokens": max_tokens,
        "stop_token_ids": sorted(eos_token_ids),
        "detokenize": False,
    }


def self_evaluation_sampling_kwargs(
    no_id: int, yes_id: int, *, use_token_ids: bool, top_logprobs: int
) -> dict[str, Any]:
    """``vllm.SamplingParams`` keyword arguments of a self-evaluation: one greedy token and its logprobs.

    With ``use_token_ids`` the two answers are asked for by id (``logprobs`` is set to their
    count too, as vLLM requires when both are given); else the top ``top_logprobs``.

    Example:
        >>> self_evaluation_sampling_kwargs(9, 4, use_token_ids=True, top_logprobs=20)["logprob_token_ids"]
        [9, 4]

    """
    base: dict[str, Any] = {"n": 1, "max_tokens": 1, "temperature": 0.0, "detokenize": False}
    if use_token_ids:
        return {**base, "logprobs": 2, "logprob_token_ids": [no_id, yes_id]}
    return {**base, "logprobs": top_logprobs}


@dataclass
class PrefixCacheStats:
    """Prompt tokens sent to vLLM for one request, and how many the prefix cache served.

    Attributes:
        generation_prompt_tokens: Prompt tokens of the generation requests (first chunks and continuations).
        generation_cached_tokens: Of those, tokens found in the prefix cache.
        self_eval_prompt_tokens: Prompt tokens of the self-evaluation requests.
        self_eval_cached_tokens: Of those, tokens found in the prefix cache.

    """

    generation_prompt_tokens: int = 0
    generation_cached_tokens: int = 0
    self_eval_prompt_tokens: int = 0
    self_eval_cached_tokens: int = 0

    @property
    def self_eval_computed_tokens(self) -> int:
        """Self-evaluation tokens the model actually computed."""
        return self.self_eval_prompt_tokens - self.self_eval_cached_tokens


# -- the engine --------------------------------------------------------------------------------


@dataclass(eq=False)
class _Chunk:
    """One vLLM request generating a row's next tokens, up to ``target`` tokens in all."""

    vllm_id: str
    row: RowId
    target: int
    seen: int = 0  # tokens of the request's output already applied
    cache_counted: bool = False  # whether its prefix-cache hit is in the request's stats
    done: bool = False


@dataclass(eq=False)
class _Evaluation:
    """One vLLM request reading P("No") and P("Yes") after a row's response."""

    vllm_id: str
    row: RowId
    num_tokens: int
    cost: int
    position: Mapping[int, Any] | None = None
    done: bool = False


_Job = _Chunk | _Evaluation


@dataclass
class _Row:
    id: RowId
    request_id: str
    params: SamplingParams
    token_ids: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    stop_at: int | None = None
    chunk: _Chunk | None = None
    usage: Usage = field(default_factory=Usage)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class _Request:
    prompt_ids: list[int]
    rows: list[RowId] = field(default_factory=list)
    usage: Usage = field(default_factory=Usage)
    cache: PrefixCacheStats = field(default_factory=PrefixCacheStats)


class VLLMEngine:
    """An :class:`~langchain_capeval.engines.base.Engine` over an in-process vLLM ``LLMEngine`` on GPU.

    Build it with :meth:`from_config` (loads vLLM and the model), or from a ready ``LLMEngine``.
    Public methods are thread-safe.

    Args:
        llm: A ``vllm.LLMEngine`` (prefix caching on; LoRA enabled if ``lora_request`` is given).
        chat_format: The chat format of the same model's tokenizer.
        context_length: Most tokens per sequence (vLLM's ``max_model_len``).
        vocab_size: The model's vocabulary size.
        name: Display name of the model.
        lora_request: The ``vllm.lora.request.LoRARequest`` of the self-evaluation adapter, sent with
            every generation and self-evaluation request (so they share the prefix cache).
        self_eval_logprobs: How P("No") and P("Yes") are read (see :class:`VLLMEngineConfig`).
        top_logprobs: Alternatives asked for when reading top-k logprobs.

    Raises:
        UnsupportedFeatureError: ``self_eval_logprobs="token_ids"`` but the installed vLLM lacks
            ``SamplingParams.logprob_token_ids``.

    """

    def __init__(
        self,
        llm: Any,
        chat_format: ChatFormat,
        *,
        context_length: int,
        vocab_size: int,
        name: str = "model",
        lora_request: Any | None = None,
        self_eval_logprobs: SelfEvalLogprobs = "auto",
        top_logprobs: int = 20,
    ) -> None:
        from vllm import SamplingParams as VLLMSamplingParams

        self._llm = llm
        self._format = chat_format
        self._context_length = int(context_length)
        self._vocab_size = int(vocab_size)
        self._name = name
        self._lora = lora_request
        self._vllm_params = VLLMSamplingParams
        has_ids = supports_logprob_token_ids(VLLMSamplingParams)
        if self_eval_logprobs == "token_ids" and not has_ids:
            raise UnsupportedFeatureError(
                "self_eval_logprobs='token_ids' needs SamplingParams.logprob_token_ids, which this vLLM lacks; "
                "upgrade vLLM or use self_eval_logprobs='top_k'"
            )
        self.uses_logprob_token_ids = has_ids and self_eval_logprobs != "top_k"
        """Whether self-evaluation reads the answers through ``logprob_token_ids`` (else top-k logprobs)."""
        self._top_logprobs = top_logprobs
        self._no_id, self._yes_id = chat_format.answer_token_ids
        self._eos = chat_format.eos_token_ids
        self._suffix_room = len(chat_format.self_evaluation_suffix) + 1  # pending token + the turn
        self._rows: dict[RowId, _Row] = {}
        self._requests: dict[str, _Request] = {}
        self._jobs: dict[str, _Job] = {}  # vLLM request id -> what it is doing
        self._ids = itertools.count()
        self._lock = threading.RLock()
        self._cancelled = CancelledRequests()
        self._closed = False
        self.model_path: str | None = None
        """The model folder vLLM loaded (set by :meth:`from_config`)."""

    @classmethod
    def from_config(cls, config: VLLMEngineConfig | None = None) -> VLLMEngine:
        """Import vLLM, load the model (and adapter) into an ``LLMEngine``, and build the engine.

        Raises:
            MissingExtraError: vLLM is not installed; the message gives the install command.
            ModelNotInstalledError: The model or adapter is not on this machine.
            CapEvalInputError: ``max_lora_rank`` is below the adapter's rank.
            UnsupportedFeatureError: The adapter is scoped to the self-evaluation chunk
                (:func:`~langchain_capeval.adapters.adapter_scope`), which a ``LoRARequest`` cannot serve.

        """
        from langchain_capeval.adapters import adapter_scope, resolve_adapter

        config = config or VLLMEngineConfig()
        adapter = resolve_adapter(config.model, config.adapter)
        if adapter is not None and adapter_scope(adapter) == "self_evaluation":
            raise UnsupportedFeatureError(
                f"adapter {str(adapter)!r} is scoped to the self-evaluation chunk (capeval_adapter.json): it needs "
                "the response's KV cache written by the base weights, and a vLLM LoRARequest adapts every token; "
                "serve it with the transformers engine, or use an every-token adapter (adapter='default')"
            )
        try:
            import vllm
            from vllm.lora.request import LoRARequest
        except ImportError as e:
            raise MissingExtraError(
                f"the vLLM engine needs vLLM, which runs on a CUDA GPU: {VLLM_INSTALL} (import failed: {e})"
            ) from e
        from transformers import AutoTokenizer

        folder, name = resolve_model_folder(config.model)
        lora_rank: int | None = None
        lora_request = None
        if adapter is not None:
            rank = adapter_rank(adapter)
            lora_rank = config.max_lora_rank or lora_rank_slot(rank)
            if lora_rank < rank:
                raise CapEvalInputError(
                    f"max_lora_rank={lora_rank} is below the rank r={rank} of adapter {str(adapter)!r}; "
                    f"set max_lora_rank to {lora_rank_slot(rank)} or more"
                )
            lora_request = LoRARequest(LORA_NAME, 1, str(adapter))
        if not config.multiprocessing:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        args = vllm.EngineArgs(**engine_args_kwargs(config, str(folder), lora_rank=lora_rank))
        llm = vllm.LLMEngine.from_engine_args(args)
        model_config = llm.model_config
        engine = cls(
            llm,
            ChatFormat(AutoTokenizer.from_pretrained(folder)),
            context_length=int(model_config.max_model_len),
            vocab_size=int(model_config.get_vocab_size()),
            name=name + ("+selfeval" if adapter is not None else ""),
            lora_request=lora_request,
            self_eval_logprobs=config.self_eval_logprobs,
            top_logprobs=config.top_logprobs,
        )
        engine.model_path = str(folder)
        return engine

    # -- protocol properties -------------------------------------------------------------------

    @property
    def model_name(self) -> str:
        """Display name of the model (``+selfeval`` with the adapter)."""
        return self._name

    @property
    def chat_format(self) -> ChatFormat:
        """Renders messages and the self-evaluation turn into token ids."""
        return self._format

    @property
    def context_length(self) -> int:
        """Most tokens per sequence: vLLM's ``max_model_len``."""
        return self._context_length

    @property
    def lora_request(self) -> Any | None:
        """The self-evaluation adapter's ``LoRARequest``, sent with every request (``None``: the base model)."""
        return self._lora

    # -- rows ----------------------------------------------------------------------------------

    def submit(
        self, prompt_ids: Sequence[int], params: Sequence[SamplingParams], *, request_id: str | None = None
    ) -> list[RowId]:
        """Register one row per ``params``; rows start empty.

        Their first tokens come with the first :meth:`generate`, which adds one vLLM request
        per row; the rows of a request share the prompt through the prefix cache.
        """
        prompt, _ = checked_submission(
            prompt_ids, params, vocab_size=self._vocab_size, max_tokens=self.context_length - self._suffix_room
        )
        with self._lock:
            self._check_open()
            request_id = request_id or uuid.uuid4().hex
            self._cancelled.check(request_id)
            req = self._requests.get(request_id)
            if req is None:
                req = self._requests[request_id] = _Request(prompt)
                req.usage.prompt_tokens = len(prompt)
            elif req.prompt_ids != prompt:
                raise InvalidSamplingError(f"request {request_id!r} already has a different prompt")
            ids = [next(self._ids) for _ in params]
            for rid, p in zip(ids, params, strict=True):
                self._rows[rid] = _Row(rid, request_id, p)
            req.rows.extend(ids)
            return ids

    def generate(
        self, rows: Sequence[RowId], *, until: int | None = None, deadline: float | None = None
    ) -> list[Sample]:
        """Generate ``rows`` until each is finished or has ``until`` tokens; return snapshots.

        Adds one vLLM request per unfinished row (a continuation if it has tokens), then steps
        the engine until they are done. ``deadline`` (a :func:`time.monotonic` value) stops after
        the engine step that passes it and aborts the requests still running; the rows keep
        their tokens and resume from there. If the rows' request is cancelled meanwhile
        (:meth:`cancel`, from another thread), raises
        :class:`~langchain_capeval.errors.RequestCancelledError`.
        """
        check_until(until)
        with self._lock:
            self._check_open()
            live = self._lookup(rows)
            owners = {r.request_id for r in live}
            todo = [r for r in live if not r.finished and (until is None or len(r.token_ids) < until)]
            jobs: list[_Job] = []
            try:
                for r in todo:
                    jobs.append(r.chunk or self._start_chunk(r, until))
            except BaseException:
                self._retire_all([j for j in jobs if not j.done], abort=True)
                raise
        if jobs and not self._wait(jobs, deadline):
            with self._lock:
                self._retire_all([j for j in jobs if not j.done], abort=True)
        with self._lock:
            self._raise_if_cancelled(owners)
            return [self._snapshot(r) for r in self._lookup(rows)]

    def self_evaluate(self, rows: Sequence[RowId]) -> list[SelfEvaluation]:
        """Ask each row "Would you do better if you started over?" as a one-token request.

        One request per row over prompt + response + the self-evaluation turn, with the
        adapter's ``LoRARequest``: the response is in the prefix cache, only the turn is computed.
        """
        with self._lock:
            self._check_open()
            live = self._lookup(rows)
            if not live:
                return []
            owners = {r.request_id for r in live}
            jobs: list[_Job] = []
            try:
                for r in live:
                    jobs.append(self._start_evaluation(r))
            except BaseException:
                self._retire_all(jobs, abort=True)
                raise
        self._wait(jobs, None)
        with self._lock:
            self._raise_if_cancelled(owners)
            result = []
            for job in jobs:
                assert isinstance(job, _Evaluation)
                row = self._lookup([job.row])[0]
                p_no, p_yes = read_answer_logprobs(
                    job.position, self._no_id, self._yes_id, exact=self.uses_logprob_token_ids
                )
                row.usage.self_eval_tokens += job.cost
                self._requests[row.request_id].usage.self_eval_tokens += job.cost
                result.append(SelfEvaluation(row.id, win_or_tie_probability(p_no, p_yes), p_no, p_yes, job.num_tokens))
            return result

    def sample(self, row: RowId) -> Sample:
        """A snapshot of one row."""
        with self._lock:
            return self._snapshot(self._lookup([row])[0])

    def release(self, rows: Sequence[RowId]) -> None:
        """Drop rows and abort their vLLM requests in flight; unknown ids are ignored."""
        with self._lock:
            gone = {r for r in rows if r in self._rows}
            self._retire_all([j for j in self._jobs.values() if j.row in gone], abort=True)
            for r in gone:
                row = self._rows.pop(r)
                req = self._requests.get(row.request_id)
                if req is not None:
                    req.rows.remove(r)

    def usage(self, request_id: str) -> Usage:
        """Compute spent on a request so far."""
        with self._lock:
            if request_id not in self._requests:
                raise UnknownRowError(f"unknown request {request_id!r}")
            return self._requests[request_id].usage.copy()

    def close_request(self, request_id: str) -> Usage:
        """Release every row of a request; return its usage."""
        with self._lock:
            usage = self.usage(request_id)
            self.release(list(self._requests[request_id].rows))
            del self._requests[request_id]
            return usage

    def cancel(self, request_id: str) -> None:
        """Stop a request from any thread: abort its vLLM requests and free its rows at once.

        A ``generate`` or ``self_evaluate`` waiting on its rows, and any later ``submit`` for it,
        raise :class:`~langchain_capeval.errors.RequestCancelledError`. Cancelling a request that
        is unknown (not started yet, or already closed) is allowed and makes its later submits fail.
        """
        with self._lock:
            self._cancelled.add(request_id)
            if request_id in self._requests:
                self.close_request(request_id)

    def prefix_cache_stats(self, request_id: str) -> PrefixCacheStats:
        """Prompt tokens this request sent to vLLM and how many the prefix cache served."""
        with self._lock:
            if request_id not in self._requests:
                raise UnknownRowError(f"unknown request {request_id!r}")
            c = self._requests[request_id].cache
            return dataclasses.replace(c)

    @property
    def live_rows(self) -> int:
        """Rows the engine holds."""
        with self._lock:
            return len(self._rows)

    @property
    def live_requests(self) -> int:
        """Requests the engine holds."""
        with self._lock:
            return len(self._requests)

    @property
    def requests_in_flight(self) -> int:
        """Requests (generation chunks and self-evaluations) running in vLLM now."""
        with self._lock:
            return len(self._jobs)

    def close(self) -> None:
        """Abort every request in flight and shut vLLM's engine core down; the engine accepts no more work."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._retire_all(list(self._jobs.values()), abort=True)
            shutdown = getattr(getattr(self._llm, "engine_core", None), "shutdown", None)
            if callable(shutdown):
                shutdown()

    def __enter__(self) -> VLLMEngine:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- vLLM requests --------------------------------------------------------------------------

    def _add(self, vllm_id: str, prompt: list[int], params_kwargs: dict[str, Any], what: str) -> None:
        try:
            params = self._vllm_params(**params_kwargs)
            self._llm.add_request(vllm_id, {"prompt_token_ids": prompt}, params, lora_request=self._lora)
        except ValueError as e:  # vLLM's validation errors are ValueErrors
            raise InvalidSamplingError(f"vLLM rejected the {what}: {e}") from e

    def _start_chunk(self, row: _Row, until: int | None) -> _Chunk:
        """Add the vLLM request that takes ``row`` to its next checkpoint (or to its end)."""
        req = self._requests[row.request_id]
        done = len(row.token_ids)
        n = chunk_max_tokens(done, row.params.max_new_tokens, until)
        vllm_id = f"capeval-{row.id}-{done}-{uuid.uuid4().hex[:8]}"
        prompt = [*req.prompt_ids, *row.token_ids]
        kwargs = generation_sampling_kwargs(
            row.params, seed=chunk_seed(row.params.seed, done), max_tokens=n, eos_token_ids=self._eos
        )
        self._add(vllm_id, prompt, kwargs, f"sampling settings of row {row.id}")
        job = _Chunk(vllm_id, row.id, target=done + n)
        self._jobs[vllm_id] = row.chunk = job
        req.cache.generation_prompt_tokens += len(prompt)
        return job

    def _start_evaluation(self, row: _Row) -> _Evaluation:
        """Add the one-token request that reads P("No") and P("Yes") after ``row``'s response."""
        req = self._requests[row.request_id]
        prompt = self_evaluation_prompt(req.prompt_ids, row.token_ids, self._format)
        vllm_id = f"capeval-eval-{row.id}-{len(row.token_ids)}-{uuid.uuid4().hex[:8]}"
        kwargs = self_evaluation_sampling_kwargs(
            self._no_id, self._yes_id, use_token_ids=self.uses_logprob_token_ids, top_logprobs=self._top_logprobs
        )
        self._add(vllm_id, prompt, kwargs, f"self-evaluation of row {row.id}")
        job = _Evaluation(vllm_id, row.id, len(row.token_ids), self_evaluation_cost(row.token_ids, self._format))
        self._jobs[vllm_id] = job
        req.cache.self_eval_prompt_tokens += len(prompt)
        return job

    def _wait(self, jobs: Sequence[_Job], deadline: float | None) -> bool:
        """Step the engine until ``jobs`` are done (``True``) or ``deadline`` passed (``False``).

        The lock is released between steps, so other threads add their requests to the same batches;
        whichever thread steps routes every output to its row.
        """
        while True:
            with self._lock:
                if all(j.done for j in jobs):
                    return True
                if not self._llm.has_unfinished_requests():  # vLLM forgot them (it never should)
                    self._retire_all([j for j in jobs if not j.done], abort=False)
                    continue
                self._step()
                if all(j.done for j in jobs):
                    return True
                if deadline is not None and time.monotonic() >= deadline:
                    return False

    def _step(self) -> None:
        """One vLLM engine step: route its outputs, charge its time to the rows it worked for."""
        busy = [self._rows[j.row] for j in self._jobs.values() if j.row in self._rows]
        start = time.perf_counter()
        outputs = self._llm.step()
        self._charge(busy, time.perf_counter() - start)
        for out in outputs:
            job = self._jobs.get(out.request_id)
            if isinstance(job, _Chunk):
                self._on_chunk_output(job, out)
            elif isinstance(job, _Evaluation):
                self._on_evaluation_output(job, out)

    def _on_chunk_output(self, job: _Chunk, out: Any) -> None:
        row = self._rows.get(job.row)
        finished = bool(out.finished)
        if row is None:
            self._retire(job, abort=not finished)
            return
        req = self._requests[row.request_id]
        cached = getattr(out, "num_cached_tokens", None)
        if cached is not None and not job.cache_counted:
            req.cache.generation_cached_tokens += int(cached)
            job.cache_counted = True
        completion = out.outputs[0] if out.outputs else None
        ids = list(completion.token_ids) if completion is not None else []
        new, job.seen = ids[job.seen :], len(ids)
        if new and not row.finished:
            update = apply_new_tokens(
                row.token_ids,
                new,
                eos_token_ids=self._eos,
                max_new_tokens=row.params.max_new_tokens,
                stop=row.params.stop,
                decode=self._format.decode,
            )
            row.token_ids = update.token_ids
            self._count(row, update.accepted)
            if update.finish_reason is not None:
                row.finish_reason, row.stop_at = update.finish_reason, update.stop_at
        over = row.finished or len(row.token_ids) >= job.target
        if finished and not over and completion is not None:
            reason, extra = finish_from_vllm(completion.finish_reason, completion.stop_reason, row.token_ids)
            if extra is not None:
                row.token_ids.append(extra)
                self._count(row, 1)
            row.finish_reason = reason
        if over or finished:
            self._retire(job, abort=not finished)

    def _on_evaluation_output(self, job: _Evaluation, out: Any) -> None:
        if not out.finished:
            return
        completion = out.outputs[0] if out.outputs else None
        logprobs = completion.logprobs if completion is not None else None
        job.position = logprobs[0] if logprobs else None
        row = self._rows.get(job.row)
        cached = getattr(out, "num_cached_tokens", None)
        if row is not None and cached:
            self._requests[row.request_id].cache.self_eval_cached_tokens += int(cached)
        self._retire(job, abort=False)

    def _retire(self, job: _Job, *, abort: bool) -> None:
        """Forget a job (aborting its vLLM request if it is still running)."""
        job.done = True
        self._jobs.pop(job.vllm_id, None)
        row = self._rows.get(job.row)
        if row is not None and row.chunk is job:
            row.chunk = None
        if abort:
            self._llm.abort_request([job.vllm_id])

    def _retire_all(self, jobs: Sequence[_Job], *, abort: bool) -> None:
        running = [j.vllm_id for j in jobs if not j.done]
        for j in jobs:
            self._retire(j, abort=False)
        if abort and running:
            self._llm.abort_request(running)

    # -- bookkeeping ---------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise EngineClosedError("the vLLM engine was closed; it accepts no more work")

    def _raise_if_cancelled(self, request_ids: set[str]) -> None:
        for request_id in request_ids:
            self._cancelled.check(request_id)

    def _lookup(self, rows: Sequence[RowId]) -> list[_Row]:
        out = []
        for r in rows:
            row = self._rows.get(r)
            if row is None:
                raise UnknownRowError(f"row {r!r} is not live in this engine (released, or never submitted)")
            out.append(row)
        return out

    def _count(self, row: _Row, n: int) -> None:
        row.usage.generated_tokens += n
        self._requests[row.request_id].usage.generated_tokens += n

    def _charge(self, rows: list[_Row], seconds: float) -> None:
        """Split ``seconds`` of wall time evenly over ``rows``; each request is charged its rows' shares."""
        share = seconds / max(len(rows), 1)
        for r in rows:
            r.usage.wall_time_s += share
            req = self._requests.get(r.request_id)
            if req is not None:
                req.usage.wall_time_s += share

    def _snapshot(self, r: _Row) -> Sample:
        ids = list(r.token_ids)
        text = self._format.decode(ids)
        if r.stop_at is not None:
            text = text[: r.stop_at]
        u = r.usage
        return Sample(
            row=r.id,
            request_id=r.request_id,
            token_ids=ids,
            text=text,
            finished=r.finished,
            finish_reason=r.finish_reason,
            temperature=r.params.temperature,
            usage=Usage(0, u.generated_tokens, u.self_eval_tokens, u.wall_time_s),
        )
