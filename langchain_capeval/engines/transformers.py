"""The transformers engine: batched sampling with self-evaluation on the live KV cache.

The engine knows token ids and rows, not messages (those are
:class:`~langchain_capeval.chat_format.ChatFormat`'s). Each request's prompt is
prefilled once, on top of the longest prefix it shares with a live or recently
closed prompt (:mod:`~langchain_capeval.engines.prefix_cache`); its rows start from
copies of that cache. Rows decode together
in a left-padded :class:`~langchain_capeval.engines.kv_batch.KVBatch`, each with
its own temperature, top-p and seeded random stream. The last sampled token of a
row is *pending*: sampled, but not yet in the cache. A decode step pushes the
pending tokens; a self-evaluation pushes the pending token plus the
self-evaluation turn, reads P("No") and P("Yes"), and rolls the cache back, so
generation resumes exactly as if nothing had happened.

Concurrent requests share the model through a
:class:`~langchain_capeval.engines.scheduler.StepScheduler`: one worker thread runs
every model call; the ``generate`` calls pending at a step are decoded together in
one batch, whichever requests their rows belong to; submits, self-evaluations,
releases and cancels run between steps.

Example:
    >>> from langchain_capeval.engines.transformers import TransformersEngine
    >>> from langchain_capeval.sampling import SamplingParams
    >>> engine = TransformersEngine.from_config()  # the embedded default  # doctest: +SKIP
    >>> prompt = engine.chat_format.encode([{"role": "user", "content": "What is 2 + 3?"}])  # doctest: +SKIP
    >>> rows = engine.submit(prompt, [SamplingParams(temperature=0.8, seed=s) for s in range(4)])  # doctest: +SKIP
    >>> engine.generate(rows, until=16)  # pause at a checkpoint  # doctest: +SKIP
    >>> [e.p_win_or_tie for e in engine.self_evaluate(rows)]  # mid-generation  # doctest: +SKIP
    >>> engine.release(rows[2:])  # prune  # doctest: +SKIP
    >>> samples = engine.generate(rows[:2])  # resume to the end  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import itertools
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from pydantic import BaseModel, ConfigDict, Field

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
from langchain_capeval.engines.cpu import pack_decoder_linears, pack_output_projection, run_in_own_thread
from langchain_capeval.engines.decoding import answer_probabilities, sample_next_tokens, win_or_tie_probability
from langchain_capeval.engines.kv_batch import KVBatch, left_padded_chunk
from langchain_capeval.engines.lora import SelfEvaluationLoRA
from langchain_capeval.engines.prefix_cache import DEFAULT_PREFIX_CACHE_BYTES, PrefixCache
from langchain_capeval.engines.scheduler import DecodeCall, StepScheduler
from langchain_capeval.errors import (
    CapEvalError,
    InvalidSamplingError,
    RequestCancelledError,
    UnknownRowError,
)
from langchain_capeval.sampling import SamplingParams

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from langchain_capeval.models import LoadedModel, LoadReport


class TransformersEngineConfig(BaseModel):
    """How to build a :class:`TransformersEngine`."""

    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)

    model: str | None = None
    """Local model folder or ``.gguf`` file; ``None`` is the embedded default, SmolLM2-135M-Instruct."""
    adapter: str | None = "default"
    """LoRA self-evaluation adapter folder or shipped adapter name; ``"default"`` is the one shipped for the
    default model (if any, and only for that model); ``None`` runs the base model. An adapter scoped to the
    self-evaluation chunk (:mod:`langchain_capeval.adapters`) leaves decoding to the base weights."""
    device: str = "cpu"
    """Torch device."""
    dtype: str = "float32"
    """Torch dtype name."""
    num_threads: int | None = Field(default=None, ge=1)
    """Torch CPU threads; ``None`` leaves torch's default."""
    cache_merged: bool = True
    """Save the model with the adapter merged in once (in the cache folder) and load that copy, instead of
    merging in memory at every load: faster loads and less memory (see :mod:`langchain_capeval.models`)."""
    pack_output_projection: bool = True
    """On CPU in float32, keep a copy of the output projection in oneDNN's blocked layout: decode steps of
    4-12 rows (concurrent requests) run 10-15% faster, for one more copy of that matrix in memory (113 MB for
    the default model); see :mod:`langchain_capeval.engines.cpu`. Ignored elsewhere."""
    prefix_caching: bool = True
    """Start each prompt from the cached keys and values of the longest prefix it shares with a recent or live
    prompt (a shared system prompt, the previous turn of a conversation); see
    :mod:`langchain_capeval.engines.prefix_cache`."""
    prefix_cache_bytes: int = Field(default=DEFAULT_PREFIX_CACHE_BYTES, ge=0)
    """Budget for the prompt caches kept after their requests end (least recently used first out)."""
    pack_linear_layers: bool = True
    """On CPU in float32, keep a copy of the decoder's other linear layers packed for MKL's GEMM: decode steps of
    4-8 rows run ~15% faster, for one more copy of those weights (406 MB for the default model; nothing is
    packed when the copies would exceed 2 GiB); see :mod:`langchain_capeval.engines.cpu`. Ignored elsewhere."""


@dataclass
class _Row:
    id: RowId
    request_id: str
    params: SamplingParams
    generator: torch.Generator
    token_ids: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    stop_at: int | None = None  # character offset of a matched stop string
    usage: Usage = field(default_factory=Usage)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class _Request:
    prompt_ids: list[int]
    prompt: KVBatch  # one-row cache of the prompt
    last_logits: torch.Tensor  # [1, V] logits after the prompt
    rows: list[RowId] = field(default_factory=list)
    usage: Usage = field(default_factory=Usage)


class TransformersEngine:
    """An :class:`~langchain_capeval.engines.base.Engine` over a Hugging Face causal LM, on CPU or GPU.

    Build it with :meth:`from_config` (loads the model) or from a ready model and
    tokenizer. Public methods are thread-safe: they run on the engine's scheduler
    thread, and concurrent ``generate`` calls share decode steps.

    Args:
        model: A causal LM (an ``every_token`` adapter already merged in): it decodes, and self-evaluates
            with ``selfeval_lora`` added there if given.
        tokenizer: Its tokenizer, with a chat template.
        name: Display name of the model.
        prefix_cache: Where ended requests' prompt caches are kept for prefix reuse;
            ``None`` turns prefix caching off.
        selfeval_lora: A ``self_evaluation``-scoped adapter (:mod:`langchain_capeval.adapters`) for
            ``model``, held beside its weights (:class:`~langchain_capeval.engines.lora.SelfEvaluationLoRA`):
            active only in the self-evaluation forward, over the KV cache ``model`` wrote, so
            generation stays ``model``'s exactly.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        name: str = "model",
        prefix_cache: PrefixCache | None = None,
        selfeval_lora: SelfEvaluationLoRA | None = None,
    ) -> None:
        self.model = model
        self.selfeval_lora = selfeval_lora
        self.tokenizer = tokenizer
        self._name = name
        self._format = ChatFormat(tokenizer)
        self._device = next(model.parameters()).device
        self._no_id, self._yes_id = self._format.answer_token_ids
        self._eos = self._format.eos_token_ids
        self._suffix_room = len(self._format.self_evaluation_suffix) + 1  # pending token + the turn
        self._rows: dict[RowId, _Row] = {}
        self._requests: dict[str, _Request] = {}
        self._batches: list[KVBatch] = []  # every live row's cache is in exactly one batch
        self._ids = itertools.count()
        self._cancelled = CancelledRequests()
        self.prefix_cache = prefix_cache
        self.scheduler = StepScheduler(self._decode_step, name=f"capeval-engine-{name}")
        self.load_report: LoadReport | None = None

    @classmethod
    def from_config(cls, config: TransformersEngineConfig | None = None) -> TransformersEngine:
        """Load the model the config names and build the engine."""
        from langchain_capeval.adapters import adapter_scope, resolve_adapter
        from langchain_capeval.models import load_model

        config = config or TransformersEngineConfig()
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        adapter = resolve_adapter(config.model, config.adapter)
        # A self-evaluation-scoped adapter: decode with the base weights, add the adapter for the chunk only.
        chunk_only = adapter is not None and adapter_scope(adapter) == "self_evaluation"

        def load() -> LoadedModel:
            loaded = load_model(
                config.model,
                adapter=None if chunk_only else adapter,
                cache_merged=config.cache_merged,
                device=config.device,
                dtype=config.dtype,
            )
            if config.pack_output_projection:
                pack_output_projection(loaded.model)
            if config.pack_linear_layers:
                pack_decoder_linears(loaded.model)
            return loaded

        # Loading runs parallel ops; on a thread of its own, no OpenMP team outlives it (see engines.cpu).
        loaded = run_in_own_thread(load)
        lora = SelfEvaluationLoRA.load(loaded.model, adapter) if chunk_only and adapter is not None else None
        name = loaded.name + ("+selfeval" if adapter else "")
        prefix_cache = PrefixCache(config.prefix_cache_bytes) if config.prefix_caching else None
        engine = cls(loaded.model, loaded.tokenizer, name=name, prefix_cache=prefix_cache, selfeval_lora=lora)
        engine.load_report = loaded.report
        return engine

    # -- protocol properties -------------------------------------------------------------------

    @property
    def model_name(self) -> str:
        """Display name of the model."""
        return self._name

    @property
    def chat_format(self) -> ChatFormat:
        """Renders messages and the self-evaluation turn into token ids."""
        return self._format

    @property
    def context_length(self) -> int:
        """The model's maximum positions."""
        cfg = self.model.config.get_text_config(decoder=True)
        return int(getattr(cfg, "max_position_embeddings", 2048))

    # -- rows ----------------------------------------------------------------------------------

    def submit(
        self, prompt_ids: Sequence[int], params: Sequence[SamplingParams], *, request_id: str | None = None
    ) -> list[RowId]:
        """Start one row per ``params``; rows of one request share one prefill of the prompt.

        Each row's first token is sampled at once from the prompt's logits.
        """
        prompt, longest = checked_submission(
            prompt_ids,
            params,
            vocab_size=self.model.config.get_text_config(decoder=True).vocab_size,
            max_tokens=self.context_length - self._suffix_room,
        )
        item = (prompt, list(params), longest, request_id or uuid.uuid4().hex)
        result: list[RowId] = self.scheduler.run_batched(self._submit_batch, item)
        return result

    def _submit_batch(self, items: list[tuple[list[int], list[SamplingParams], int, str]]) -> list[Any]:
        """Submit several requests' rows at once: the new prompts are prefilled together in one padded batch."""
        new = {rid: prompt for prompt, _, _, rid in items if rid not in self._requests and rid not in self._cancelled}
        if len(new) > 1:
            self._prefill_many(new)
        results: list[Any] = []
        for prompt, params, longest, rid in items:
            try:
                results.append(self._submit(prompt, params, longest, rid))
            except CapEvalError as e:
                results.append(e)
        return results

    def _submit(
        self, prompt: list[int], params: Sequence[SamplingParams], longest: int, request_id: str
    ) -> list[RowId]:
        self._cancelled.check(request_id)
        start = time.perf_counter()
        req = self._requests.get(request_id)
        if req is None:
            req = self._prefill(request_id, prompt)
        elif req.prompt_ids != prompt:
            raise InvalidSamplingError(f"request {request_id!r} already has a different prompt")
        ids = [next(self._ids) for _ in params]
        for rid, p in zip(ids, params, strict=True):
            gen = torch.Generator().manual_seed(p.seed)
            self._rows[rid] = _Row(rid, request_id, p, gen)
        req.rows.extend(ids)
        batch = req.prompt.expand(ids, extra_capacity=longest + self._suffix_room)
        self._batches.append(batch)
        rows = [self._rows[r] for r in ids]
        first = self._sample(rows, req.last_logits.expand(len(rows), -1))
        self._append(rows, first)
        self._charge(rows, time.perf_counter() - start)
        return ids

    def _prefill_many(self, prompts: dict[str, list[int]]) -> None:
        """Prefill several requests' prompts in one left-padded forward pass; each keeps a one-row cache."""
        start = time.perf_counter()
        starts = {rid: self._cached_prefix(prompt) for rid, prompt in prompts.items()}
        parts = [cache if cache is not None else KVBatch.empty(self.model, [-1], 0) for cache, _ in starts.values()]
        ids, mask = left_padded_chunk([prompt[starts[rid][1] :] for rid, prompt in prompts.items()])
        batch = KVBatch.concat(parts, extra_capacity=ids.shape[1])
        logits = batch.forward(self.model, ids.to(self._device), mask.to(self._device))
        share = (time.perf_counter() - start) / len(prompts)
        for i, (request_id, prompt) in enumerate(prompts.items()):
            req = _Request(prompt, batch.select([i]), logits[i : i + 1])
            req.usage.prompt_tokens = len(prompt)
            req.usage.cached_prompt_tokens = starts[request_id][1]
            req.usage.wall_time_s += share
            self._requests[request_id] = req

    def _prefill(self, request_id: str, prompt: list[int]) -> _Request:
        """Prefill the prompt once into a one-row cache, on top of the longest cached prefix."""
        batch, cached = self._cached_prefix(prompt)
        if batch is None:
            batch = KVBatch.empty(self.model, rows=[-1], capacity=len(prompt))
        logits = batch.forward(self.model, torch.tensor([prompt[cached:]], device=self._device))
        req = _Request(prompt, batch, logits)
        req.usage.prompt_tokens = len(prompt)
        req.usage.cached_prompt_tokens = cached
        self._requests[request_id] = req
        return req

    def _cached_prefix(self, prompt: list[int]) -> tuple[KVBatch | None, int]:
        """A new one-row cache of the longest prefix of ``prompt`` cached or live, and its length (``(None, 0)``)."""
        if self.prefix_cache is None:
            return None, 0
        live = ((r.prompt_ids, r.prompt) for r in self._requests.values())
        return self.prefix_cache.longest_prefix(prompt, live)

    def generate(
        self, rows: Sequence[RowId], *, until: int | None = None, deadline: float | None = None
    ) -> list[Sample]:
        """Decode ``rows`` until each is finished or has ``until`` generated tokens; return snapshots.

        Rows that reach the checkpoint stay live: call again to resume. ``deadline``
        (a :func:`time.monotonic` value) stops decoding after the step that passes it.
        """
        check_until(until)
        result: list[Sample] = self.scheduler.decode(DecodeCall(list(rows), until, deadline))
        return result

    def _decode_step(self, calls: list[DecodeCall]) -> None:
        """One scheduler step: decode the rows of every pending call together, then complete the done calls.

        A call is done when each of its rows is finished or has ``until`` tokens, or
        after the step that passes its deadline. Rows leave the decode batch as soon as
        they stop (their cache parks in a batch of its own), so they cost nothing further.
        """
        todo: dict[RowId, _Row] = {}
        waiting: list[tuple[DecodeCall, list[_Row]]] = []
        for call in calls:
            try:
                live = self._lookup(call.rows)
            except UnknownRowError as e:  # released (pruned, cancelled) while the call was queued
                call.fail(e)
                continue
            rows = [r for r in live if not r.finished and (call.until is None or len(r.token_ids) < call.until)]
            if not rows:
                call.finish([self._snapshot(r) for r in live])
                continue
            todo.update((r.id, r) for r in rows)
            waiting.append((call, live))
        if not todo:
            return
        start = time.perf_counter()
        room = max(r.params.max_new_tokens - len(r.token_ids) for r in todo.values()) + self._suffix_room
        batch = self._assemble(list(todo), extra=room)
        rows = [self._rows[i] for i in batch.rows]
        pending = torch.tensor([[r.token_ids[-1]] for r in rows], device=self._device)
        logits = batch.forward(self.model, pending)
        self._append(rows, self._sample(rows, logits))
        self._charge(rows, time.perf_counter() - start)
        now = time.monotonic()
        for call, live in waiting:
            call.steps += 1
            busy = [r for r in live if not r.finished and (call.until is None or len(r.token_ids) < call.until)]
            if not busy or (call.deadline is not None and now >= call.deadline):
                call.finish([self._snapshot(r) for r in live])

    def self_evaluate(self, rows: Sequence[RowId]) -> list[SelfEvaluation]:
        """Ask each row "Would you do better if you started over?" on top of its live cache.

        One forward pass over the pending token plus the self-evaluation turn; the
        cache is rolled back afterwards.
        """
        result: list[SelfEvaluation] = self.scheduler.run_batched(self._self_evaluate_batch, list(rows))
        return result

    def _self_evaluate_batch(self, items: list[list[RowId]]) -> list[Any]:
        """Self-evaluate several callers' rows in one forward pass; a caller with an unknown row gets the error."""
        results: list[Any] = []
        rows: dict[RowId, None] = {}
        for item in items:
            try:
                self._lookup(item)
            except UnknownRowError as e:
                results.append(e)
                continue
            rows.update(dict.fromkeys(item))
            results.append(None)
        scores = {e.row: e for e in self._self_evaluate(list(rows))} if rows else {}
        return [r if r is not None else [scores[row] for row in item] for r, item in zip(results, items, strict=True)]

    def _self_evaluate(self, rows: Sequence[RowId]) -> list[SelfEvaluation]:
        live = self._lookup(rows)
        if not live:
            return []
        start = time.perf_counter()
        batch = self._gather([r.id for r in live], extra=self._suffix_room)
        order = [self._rows[i] for i in batch.rows]
        chunks = [[r.token_ids[-1], *self._format.suffix_after(r.token_ids)] for r in order]
        ids, mask = left_padded_chunk(chunks)
        length, next_pos = batch.length, batch.next_pos
        with self.selfeval_lora.active() if self.selfeval_lora is not None else contextlib.nullcontext():
            logits = batch.forward(self.model, ids.to(self._device), mask.to(self._device))
        batch.truncate(length, next_pos)
        p_no, p_yes = answer_probabilities(logits, self._no_id, self._yes_id)
        elapsed = time.perf_counter() - start
        result: dict[RowId, SelfEvaluation] = {}
        for i, r in enumerate(order):
            r.usage.self_eval_tokens += len(chunks[i])
            self._requests[r.request_id].usage.self_eval_tokens += len(chunks[i])
            no, yes = float(p_no[i]), float(p_yes[i])
            result[r.id] = SelfEvaluation(r.id, win_or_tie_probability(no, yes), no, yes, len(r.token_ids))
        self._charge(order, elapsed)
        return [result[r.id] for r in live]

    def sample(self, row: RowId) -> Sample:
        """A snapshot of one row."""
        return self.scheduler.run(lambda: self._snapshot(self._lookup([row])[0]))

    def release(self, rows: Sequence[RowId]) -> None:
        """Drop rows: their cache leaves its batch before the next decode step; unknown ids are ignored."""
        self.scheduler.run(lambda: self._release(rows))

    def _release(self, rows: Sequence[RowId]) -> None:
        gone = {r for r in rows if r in self._rows}
        for batch in list(self._batches):
            keep = [i for i, r in enumerate(batch.rows) if r not in gone]
            if len(keep) < len(batch):
                self._replace(batch, [batch.select(keep)] if keep else [])
        for r in gone:
            row = self._rows.pop(r)
            req = self._requests.get(row.request_id)
            if req is not None:
                req.rows.remove(r)

    def usage(self, request_id: str) -> Usage:
        """Compute spent on a request so far."""
        return self.scheduler.run(lambda: self._usage(request_id))

    def _usage(self, request_id: str) -> Usage:
        if request_id not in self._requests:
            raise UnknownRowError(f"unknown request {request_id!r}")
        return self._requests[request_id].usage.copy()

    def close_request(self, request_id: str) -> Usage:
        """Release every row of a request; return its usage. Its prompt cache moves to the prefix cache."""
        return self.scheduler.run(lambda: self._close_request(request_id, keep_prompt=True))

    def _close_request(self, request_id: str, keep_prompt: bool = False) -> Usage:
        usage = self._usage(request_id)
        self._release(list(self._requests[request_id].rows))
        req = self._requests.pop(request_id)
        if keep_prompt and self.prefix_cache is not None:
            self.prefix_cache.add(req.prompt_ids, req.prompt)
        return usage

    def cancel(self, request_id: str) -> None:
        """Stop a request from any thread: its rows and prompt cache are freed before the next decode step.

        Its pending ``generate`` calls and any later ``submit`` for it raise
        :class:`~langchain_capeval.errors.RequestCancelledError`. Cancelling a request
        that is unknown (not started yet, or already closed) is allowed and makes its
        later submits fail.
        """
        self.scheduler.run(lambda: self._cancel(request_id))

    def _cancel(self, request_id: str) -> None:
        self._cancelled.add(request_id)
        req = self._requests.get(request_id)
        if req is None:
            return
        rows = set(req.rows)
        error = RequestCancelledError(f"request {request_id!r} was cancelled")
        for call in self.scheduler.pending_calls():
            if rows.intersection(call.rows):
                call.fail(error)
        self._close_request(request_id)

    @property
    def live_rows(self) -> int:
        """Rows whose cache the engine holds."""
        return self.scheduler.run(lambda: sum(len(b) for b in self._batches))

    @property
    def live_requests(self) -> int:
        """Requests whose prompt cache the engine holds."""
        return self.scheduler.run(lambda: len(self._requests))

    @property
    def kv_cache_bytes(self) -> int:
        """Bytes of every KV buffer the engine holds (rows, prompt caches, and the prefix cache)."""

        def count() -> int:
            kept = self.prefix_cache.nbytes if self.prefix_cache is not None else 0
            return sum(b.nbytes for b in self._batches) + sum(r.prompt.nbytes for r in self._requests.values()) + kept

        return self.scheduler.run(count)

    def close(self) -> None:
        """Finish queued work and stop the scheduler thread; the engine accepts no more work."""
        self.scheduler.close()

    # -- internals ------------------------------------------------------------------------------

    def _lookup(self, rows: Sequence[RowId]) -> list[_Row]:
        out = []
        for r in rows:
            row = self._rows.get(r)
            if row is None:
                raise UnknownRowError(f"row {r!r} is not live in this engine (released, or never submitted)")
            out.append(row)
        return out

    def _replace(self, old: KVBatch, new: list[KVBatch]) -> None:
        self._batches.remove(old)
        self._batches.extend(b for b in new if len(b))

    def _assemble(self, ids: list[RowId], extra: int) -> KVBatch:
        """Move exactly the rows ``ids`` into one batch (copying only if they are spread out)."""
        wanted = set(ids)
        for b in self._batches:
            if set(b.rows) == wanted:
                b.reserve(extra)
                return b
        parts: list[KVBatch] = []
        for b in list(self._batches):
            take = [i for i, r in enumerate(b.rows) if r in wanted]
            if not take:
                continue
            rest = [i for i in range(len(b)) if i not in set(take)]
            parts.append(b if not rest else b.select(take))
            self._replace(b, [b.select(rest)] if rest else [])
        merged = KVBatch.concat(parts, extra_capacity=extra)
        merged.reserve(extra)
        self._batches.append(merged)
        return merged

    def _gather(self, ids: list[RowId], extra: int) -> KVBatch:
        """A batch holding exactly the rows ``ids``, for a forward pass that is rolled back afterwards.

        A batch that already holds exactly these rows is used in place; otherwise the
        rows are copied out of their batches, which stay as they are (a shared decode
        batch is not split for a self-evaluation of a few of its rows).
        """
        wanted = set(ids)
        parts: list[KVBatch] = []
        for b in self._batches:
            if set(b.rows) == wanted:
                b.reserve(extra)
                return b
            take = [i for i, r in enumerate(b.rows) if r in wanted]
            if take:
                parts.append(b.select(take))
        return KVBatch.concat(parts, extra_capacity=extra)

    def _sample(self, rows: list[_Row], logits: torch.Tensor) -> list[int]:
        dev = logits.device
        temperature = torch.tensor([r.params.temperature for r in rows], device=dev)
        top_p = torch.tensor([r.params.top_p for r in rows], device=dev)
        uniform = torch.tensor([float(torch.rand((), generator=r.generator)) for r in rows], device=dev)
        return [int(t) for t in sample_next_tokens(logits, temperature, top_p, uniform).tolist()]

    def _append(self, rows: list[_Row], tokens: list[int]) -> None:
        for r, t in zip(rows, tokens, strict=True):
            r.token_ids.append(t)
            r.usage.generated_tokens += 1
            self._requests[r.request_id].usage.generated_tokens += 1
            if t in self._eos:
                r.finish_reason = "eos"
            elif r.params.stop and self._match_stop(r):
                r.finish_reason = "stop"
            elif len(r.token_ids) >= r.params.max_new_tokens:
                r.finish_reason = "length"

    def _match_stop(self, row: _Row) -> bool:
        """Whether the row's text now contains a stop string; records where the first one starts."""
        text = self._format.decode(row.token_ids)
        hits = [text.find(s) for s in row.params.stop if s in text]
        if hits:
            row.stop_at = min(hits)
            return True
        return False

    def _charge(self, rows: list[_Row], seconds: float) -> None:
        """Split ``seconds`` of wall time evenly over ``rows``; each request is charged once."""
        share = seconds / max(len(rows), 1)
        for r in rows:
            r.usage.wall_time_s += share
        for req_id in {r.request_id for r in rows}:
            self._requests[req_id].usage.wall_time_s += share * sum(r.request_id == req_id for r in rows)

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
