"""ChatCapEval: a LangChain chat model that spends inference-time compute only where it helps.

Inside, the LangGraph graph of :mod:`langchain_capeval.graph` samples a response,
asks the same model whether it would do better by starting over, and resamples
at an annealed temperature, prunes, or accepts. Only the accepted answer is
returned or streamed; rejected candidates never leak.

Example:
    >>> from langchain_capeval import ChatCapEval
    >>> llm = ChatCapEval()  # embedded SmolLM2-135M-Instruct  # doctest: +SKIP
    >>> msg = llm.invoke("What is the capital of France?")  # doctest: +SKIP
    >>> msg.response_metadata["samples_used"], msg.response_metadata["stop_reason"]  # doctest: +SKIP
    (1, 'threshold_met')
    >>> cheap = llm.bind(max_samples=2)  # per-call budget  # doctest: +SKIP
    >>> strict = llm.with_config(configurable={"accept_threshold": 0.9})  # doctest: +SKIP

"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

from langchain_core.callbacks import (
    AsyncCallbackManagerForLLMRun,
    CallbackManager,
    CallbackManagerForLLMRun,
    dispatch_custom_event,
)
from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.language_models.chat_models import agenerate_from_stream, generate_from_stream
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, convert_to_messages
from langchain_core.messages.ai import UsageMetadata
from langchain_core.outputs import ChatGenerationChunk, ChatResult
from langchain_core.runnables import RunnableConfig
from langchain_core.runnables.config import run_in_executor
from pydantic import ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from langchain_capeval.config import CapEvalConfig
from langchain_capeval.engines.base import Engine
from langchain_capeval.errors import (
    CapEvalError,
    InvalidMessagesError,
    UnknownRowError,
    UnsupportedFeatureError,
)

_ENGINES: dict[tuple[str | None, str | None, str], Engine] = {}
_ENGINES_LOCK = threading.Lock()

PROGRESS_EVENT = "capeval_progress"
"""Name of the custom callback event that carries each progress event."""

IGNORED_STANDARD_PARAMS = frozenset({"timeout", "max_retries", "api_key", "streaming"})
"""LangChain's standard chat model arguments that mean nothing for a local model: accepted and ignored."""

CALL_ARGUMENTS = frozenset({"max_tokens", "model", "request_id", "stream"})
"""Per-call keyword arguments besides the policy fields: LangChain's ``max_tokens`` (``max_new_tokens``),
a per-call ``model``, the engine ``request_id``, and LangChain's own ``stream`` switch."""


def check_call_arguments(kwargs: dict[str, Any]) -> None:
    """Reject per-call keyword arguments ChatCapEval does not know, naming each.

    A misspelt override (``llm.invoke(q, max_new_token=5)``) would otherwise be ignored and the
    call would spend the default budget.

    Raises:
        pydantic.ValidationError: One ``extra_forbidden`` error per unknown argument, as
            ``CapEvalConfig`` raises for unknown fields.

    """
    unknown = sorted(set(kwargs) - CapEvalConfig.field_names() - CALL_ARGUMENTS)
    if unknown:
        raise ValidationError.from_exception_data(
            "ChatCapEval call arguments",
            [{"type": "extra_forbidden", "loc": (name,), "input": kwargs[name]} for name in unknown],
        )


def shared_engine(model: str | None, adapter: str | None, device: str) -> Engine:
    """One engine per (model, adapter, device) per process, shared by every ChatCapEval."""
    key = (model, adapter, device)
    with _ENGINES_LOCK:
        if key not in _ENGINES:
            from langchain_capeval.engines.transformers import TransformersEngine, TransformersEngineConfig

            cfg = TransformersEngineConfig(model=model, adapter=adapter, device=device)
            _ENGINES[key] = TransformersEngine.from_config(cfg)
        return _ENGINES[key]


def to_chat_dicts(messages: Sequence[BaseMessage]) -> list[dict[str, str]]:
    """LangChain messages -> ``{"role", "content"}`` dicts (text content only).

    Raises:
        InvalidMessagesError: A message type with no chat role, or non-text content.

    """
    roles = {"human": "user", "ai": "assistant", "system": "system"}
    out = []
    for i, m in enumerate(messages):
        role = roles.get(m.type)
        if role is None:
            raise InvalidMessagesError(
                f"messages[{i}]: {m.type!r} messages are not supported (tool calling is not); "
                "use system, human and ai messages"
            )
        content = m.content
        if isinstance(content, list):
            parts = [p if isinstance(p, str) else p.get("text") if p.get("type") == "text" else None for p in content]
            texts = [p for p in parts if isinstance(p, str)]
            if len(texts) != len(parts):
                raise InvalidMessagesError(f"messages[{i}]: only text content is supported (text parts with a string)")
            content = "".join(texts)
        out.append({"role": role, "content": str(content)})
    return out


def _policy_for(values: dict[str, Any], fields: dict[str, Any]) -> CapEvalConfig:
    """The policy fields given, over those the adapter was measured with (``adapters.adapter_policy``).

    A given ``engine`` brings no adapter to read. An adapter that cannot be read leaves the defaults:
    building the engine reports the problem, on first use, as it does without a policy.
    """
    if values.get("engine") is None:
        from langchain_capeval.adapters import policy_for_adapter

        with contextlib.suppress(CapEvalError):
            return policy_for_adapter(values.get("model"), values.get("adapter", "default"), fields)
    return CapEvalConfig.model_validate(fields)


class ChatCapEval(BaseChatModel):
    """A chat model with adaptive inference-time compute by capability-aware self-evaluation.

    Works with no arguments on the embedded SmolLM2-135M-Instruct (with the shipped
    self-evaluation adapter when one ships). Policy fields of :class:`CapEvalConfig`
    can be passed directly (``ChatCapEval(max_samples=4)``), and overridden per call
    through ``.bind(...)``, call keyword arguments, or
    ``.with_config(configurable={...})``.

    ``usage_metadata`` counts every token: ``input_tokens`` are the prompt (prefilled
    once) plus the self-evaluation tokens; ``output_tokens`` are every sampled token
    of every sample, of which ``output_token_details["reasoning"]`` were spent on
    samples that were not returned.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    model: str | None = None
    """Local model folder or ``.gguf`` file; ``None``: the embedded default."""
    adapter: str | None = "default"
    """Self-evaluation LoRA adapter folder or shipped name; ``"default"``: the shipped one for the default model
    (``"smollm2-135m-selfeval-partial-credit"``: the self-evaluation-only one; :mod:`langchain_capeval.adapters`)."""
    device: str = "cpu"
    """Torch device of the transformers engine."""
    policy: CapEvalConfig = Field(default_factory=CapEvalConfig)
    """How compute is spent; see :class:`CapEvalConfig`. Fields not given take the adapter's measured ones
    (``capeval_adapter.json``'s ``"policy"``, e.g. the partial-credit adapter's ``accept_threshold=0.7``), then
    the defaults."""
    stop: list[str] | None = None
    """Stop strings applied to every call, besides the call's own ``stop``."""
    engine: Engine | None = Field(default=None, exclude=True)
    """A ready engine (overrides ``model``/``adapter``/``device``); shared between models."""

    _graph: Any = PrivateAttr(default=None)

    def __init__(self, **kwargs: Any) -> None:
        """Build the model; fields of :class:`CapEvalConfig` may be given directly (``ChatCapEval(max_samples=4)``)."""
        super().__init__(**kwargs)

    @model_validator(mode="before")
    @classmethod
    def _collect_policy_fields(cls, values: Any) -> Any:
        """Accept CapEvalConfig fields (and LangChain's ``temperature``/``max_tokens``) as keyword arguments."""
        if not isinstance(values, dict):
            return values
        values = dict(values)
        policy = values.get("policy")
        fields = policy.model_dump(exclude_unset=True) if isinstance(policy, CapEvalConfig) else dict(policy or {})
        if "max_tokens" in values and values["max_tokens"] is not None:
            fields["max_new_tokens"] = values.pop("max_tokens")
        values.pop("max_tokens", None)
        for name in CapEvalConfig.field_names():
            if name in values:
                fields[name] = values.pop(name)
        values["policy"] = _policy_for(values, fields)
        for name in IGNORED_STANDARD_PARAMS:
            values.pop(name, None)
        unknown = sorted(set(values) - set(cls.model_fields))
        if unknown:
            raise ValueError(
                f"unknown argument(s) {unknown}; ChatCapEval takes {sorted(cls.model_fields)} "
                f"and the policy fields {sorted(CapEvalConfig.field_names())}"
            )
        return values

    @property
    def _llm_type(self) -> str:
        return "capeval"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model": self.model_name, "adapter": self.adapter, **self.policy.model_dump()}

    @property
    def model_name(self) -> str:
        """Name of the model behind the engine."""
        if self.engine is not None:
            return self.engine.model_name
        from langchain_capeval.models import DEFAULT_MODEL

        return self.model or DEFAULT_MODEL

    @property
    def temperature(self) -> float:
        """The temperature annealing rises to (LangChain's standard name)."""
        return self.policy.temperature

    @property
    def max_tokens(self) -> int:
        """Most tokens of one sample (LangChain's standard name)."""
        return self.policy.max_new_tokens

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> Any:
        params = super()._get_ls_params(stop=stop, **kwargs)
        params["ls_provider"] = "capeval"
        params["ls_model_name"] = kwargs.get("model") or self.model_name
        params["ls_temperature"] = self.policy.temperature
        params["ls_max_tokens"] = self.policy.max_new_tokens
        return params

    def bind_tools(self, tools: Any, **kwargs: Any) -> Any:
        """Tool calling is not supported."""
        raise UnsupportedFeatureError(
            "ChatCapEval does not support tool calling: its self-evaluation scores free-text answers. "
            "Use it for the answering step, and another chat model for tool calls."
        )

    # -- engine and graph -------------------------------------------------------------------------

    def get_engine(self, model: str | None = None) -> Engine:
        """The engine (loaded on first use, shared per model); ``model`` names another local model."""
        if model is not None and model != self.model:
            return shared_engine(model, self.adapter, self.device)
        if self.engine is None:
            self.engine = shared_engine(self.model, self.adapter, self.device)
        return self.engine

    def get_graph_runnable(self, model: str | None = None) -> Any:
        """The compiled adaptive-compute graph over the engine of ``model`` (default: this model's)."""
        from langchain_capeval.graph import build_graph

        engine = self.get_engine(model)
        if engine is not self.engine:
            return build_graph(engine, self.policy)
        if self._graph is None:
            self._graph = build_graph(engine, self.policy)
        return self._graph

    # -- per-call overrides through configurable ------------------------------------------------

    def _with_configurable(self, config: RunnableConfig | None, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Per-call policy overrides from ``config["configurable"]``, under the call's own kwargs."""
        configurable = (config or {}).get("configurable") or {}
        picked = {k: v for k, v in configurable.items() if k in CapEvalConfig.field_names()}
        return {**picked, **kwargs}

    def invoke(self, input: LanguageModelInput, config: RunnableConfig | None = None, **kwargs: Any) -> AIMessage:
        """Like ``BaseChatModel.invoke``; ``config["configurable"]`` may override policy fields."""
        return super().invoke(readable_input(input), config, **self._with_configurable(config, kwargs))

    async def ainvoke(
        self, input: LanguageModelInput, config: RunnableConfig | None = None, **kwargs: Any
    ) -> AIMessage:
        """Like ``BaseChatModel.ainvoke``; ``config["configurable"]`` may override policy fields."""
        return await super().ainvoke(readable_input(input), config, **self._with_configurable(config, kwargs))

    def stream(
        self, input: LanguageModelInput, config: RunnableConfig | None = None, **kwargs: Any
    ) -> Iterator[AIMessageChunk]:
        """Like ``BaseChatModel.stream``; ``config["configurable"]`` may override policy fields."""
        yield from super().stream(readable_input(input), config, **self._with_configurable(config, kwargs))

    async def astream(
        self, input: LanguageModelInput, config: RunnableConfig | None = None, **kwargs: Any
    ) -> AsyncIterator[AIMessageChunk]:
        """Like ``BaseChatModel.astream``; ``config["configurable"]`` may override policy fields."""
        async for chunk in super().astream(readable_input(input), config, **self._with_configurable(config, kwargs)):
            yield chunk

    # -- BaseChatModel hooks ------------------------------------------------------------------------

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        return generate_from_stream(self._stream(messages, stop=stop, run_manager=run_manager, **kwargs))

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        check_call_arguments(kwargs)
        overrides = {k: v for k, v in kwargs.items() if k in CapEvalConfig.field_names()}
        if kwargs.get("max_tokens") is not None:  # LangChain's name of max_new_tokens; merged in the same step
            overrides["max_new_tokens"] = kwargs["max_tokens"]
        policy = self.policy.merged(overrides)
        request_id = kwargs.get("request_id") or uuid.uuid4().hex
        state_in = {
            "messages": to_chat_dicts(messages),
            "stop": [*(self.stop or []), *(stop or [])],
            "request_id": request_id,
        }
        forward = _outer_stream_writer()
        model = kwargs.get("model")  # a per-call model override: another local model, with its own engine
        graph = self.get_graph_runnable(model)
        final: dict[str, Any] = {}
        engine = self.get_engine(model)
        callbacks = _child_callbacks(run_manager)
        try:
            for mode, chunk in graph.stream(
                state_in, context=policy, stream_mode=["custom", "values"], config={"callbacks": callbacks}
            ):
                if mode == "custom":
                    _dispatch_progress(chunk, callbacks, run_manager)
                    forward(chunk)
                else:
                    final = chunk
        finally:  # a failed or abandoned run must not leave rows in the engine
            if "answer" not in final:
                _close_quietly(engine, request_id)
        yield from self._answer_chunks(final, engine, run_manager)

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        return await agenerate_from_stream(self._astream(messages, stop=stop, run_manager=run_manager, **kwargs))

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        """Run the graph in a worker thread; if the caller is cancelled, cancel the engine request.

        Cancelling the ``ainvoke``/``astream`` task frees the request's engine rows before
        the engine's next decode step (the graph's thread then stops on
        :class:`~langchain_capeval.errors.RequestCancelledError`).
        """
        check_call_arguments(kwargs)
        request_id = kwargs.pop("request_id", None) or uuid.uuid4().hex
        engine = self.get_engine(kwargs.get("model"))
        chunks = self._stream(
            messages,
            stop=stop,
            run_manager=run_manager.get_sync() if run_manager else None,
            request_id=request_id,
            **kwargs,
        )
        done = object()
        try:
            while True:
                chunk = await run_in_executor(None, next, chunks, done)
                if not isinstance(chunk, ChatGenerationChunk):
                    return
                yield chunk
        except asyncio.CancelledError:
            await asyncio.shield(run_in_executor(None, _cancel_quietly, engine, request_id))
            raise

    def _answer_chunks(
        self, final: dict[str, Any], engine: Engine, run_manager: CallbackManagerForLLMRun | None
    ) -> Iterator[ChatGenerationChunk]:
        """The accepted answer, token by token, then a last chunk with usage and metadata."""
        answer = final.get("answer", "")
        pieces = _token_pieces(engine, answer)
        for piece in pieces:
            chunk = ChatGenerationChunk(message=AIMessageChunk(content=piece))
            if run_manager is not None:
                run_manager.on_llm_new_token(piece, chunk=chunk)
            yield chunk
        usage = final.get("usage", {})
        samples = final.get("samples", [])
        index = final.get("answer_index")
        answer_tokens = next((s["num_tokens"] for s in samples if s["index"] == index), 0)
        generated = int(usage.get("generated_tokens", 0))
        input_tokens = int(usage.get("prompt_tokens", 0) + usage.get("self_eval_tokens", 0))
        usage_metadata = UsageMetadata(
            input_tokens=input_tokens,
            output_tokens=generated,
            total_tokens=input_tokens + generated,
            output_token_details={"reasoning": generated - answer_tokens},
        )
        chosen = next((s for s in samples if s["index"] == index), None)
        metadata = {
            "model_name": engine.model_name,
            "model_provider": "capeval",
            "finish_reason": chosen["finish_reason"] if chosen else None,
            "samples_used": len(samples),
            "samples": [
                {
                    "index": s["index"],
                    "p_win_or_tie": s["score"],
                    "temperature": s["temperature"],
                    "tokens": s["num_tokens"],
                    "pruned": s["pruned"],
                    "finish_reason": s["finish_reason"],
                }
                for s in samples
            ],
            "accepted_sample": index,
            "stop_reason": final.get("stop_reason"),
            "trace": final.get("trace", []),
            "compute": dict(usage),
        }
        last = ChatGenerationChunk(
            message=AIMessageChunk(content="", usage_metadata=usage_metadata, response_metadata=metadata),
            generation_info={"finish_reason": metadata["finish_reason"]},
        )
        if run_manager is not None:
            run_manager.on_llm_new_token("", chunk=last)
        yield last


def readable_input(value: LanguageModelInput) -> LanguageModelInput:
    """``value``, once each item of a message list is known to be readable by LangChain's coercion.

    LangChain raises its documented ``ValueError``/``NotImplementedError`` for most bad items, but a
    ``KeyError`` for some (a ``("tool", ...)`` message without a ``tool_call_id``).

    Raises:
        InvalidMessagesError: An item LangChain's coercion fails on with an undocumented error.

    """
    if isinstance(value, str) or not isinstance(value, Sequence):
        return value
    for i, item in enumerate(value):
        try:
            convert_to_messages([item])
        except (ValueError, NotImplementedError):
            break  # LangChain's own documented error: let invoke raise it as usual
        except Exception as e:
            raise InvalidMessagesError(
                f"messages[{i}]: LangChain cannot read it as a message ({type(e).__name__}: {e})"
            ) from e
    return value


def _token_pieces(engine: Engine, text: str) -> list[str]:
    """Split the answer into per-token text pieces whose concatenation is exactly ``text``."""
    if not text:
        return []
    fmt = engine.chat_format
    ids = fmt.tokenizer(text, add_special_tokens=False)["input_ids"]
    pieces, prev = [], ""
    for i in range(1, len(ids) + 1):
        cur = str(fmt.tokenizer.decode(ids[:i]))
        if cur.endswith("\ufffd") and i < len(ids):  # an incomplete UTF-8 character: wait for the rest
            continue
        pieces.append(cur[len(prev) :])
        prev = cur
    if "".join(pieces) != text:  # decoding normalised something: fall back to one piece
        return [text]
    return [p for p in pieces if p]


def _child_callbacks(run_manager: CallbackManagerForLLMRun | None) -> CallbackManager | None:
    """Callbacks for the inner graph run, nested under this chat model's run in traces."""
    if run_manager is None:
        return None
    return CallbackManager(
        handlers=list(run_manager.inheritable_handlers),
        inheritable_handlers=list(run_manager.inheritable_handlers),
        parent_run_id=run_manager.run_id,
        tags=list(run_manager.inheritable_tags),
        inheritable_tags=list(run_manager.inheritable_tags),
        metadata=dict(run_manager.inheritable_metadata),
        inheritable_metadata=dict(run_manager.inheritable_metadata),
    )


def _dispatch_progress(
    event: dict[str, Any], callbacks: CallbackManager | None, run_manager: CallbackManagerForLLMRun | None
) -> None:
    """Send a progress event to LangChain callbacks as a custom event named ``PROGRESS_EVENT``.

    ``invoke`` hands this model its run manager; ``stream`` does not (langchain-core
    dispatches the tokens itself), so there the event goes to the enclosing run, if any.
    """
    if callbacks is not None and run_manager is not None:
        callbacks.on_custom_event(PROGRESS_EVENT, event, run_id=run_manager.run_id)
        return
    with contextlib.suppress(RuntimeError):  # no enclosing run to attach the event to
        dispatch_custom_event(PROGRESS_EVENT, event)


def _outer_stream_writer() -> Any:
    """The enclosing LangGraph run's custom stream writer, or a no-op outside one."""
    try:
        from langgraph.config import get_stream_writer

        return get_stream_writer()
    except (RuntimeError, KeyError):  # outside any runnable / inside a runnable that is not a LangGraph run
        return lambda _chunk: None


def _close_quietly(engine: Engine, request_id: str) -> None:
    with contextlib.suppress(UnknownRowError):
        engine.close_request(request_id)


def _cancel_quietly(engine: Engine, request_id: str) -> None:
    with contextlib.suppress(UnknownRowError):
        engine.cancel(request_id)


__all__ = ["PROGRESS_EVENT", "ChatCapEval", "shared_engine", "to_chat_dicts"]
