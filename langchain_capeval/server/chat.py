"""``/v1/chat/completions`` over ChatCapEval: OpenAI fields in, the accepted answer and its compute out.

The OpenAI fields map onto the policy (:class:`~langchain_capeval.config.CapEvalConfig`):
``temperature`` is the temperature annealing rises to (and caps the first sample's),
``top_p`` the nucleus mass, ``max_completion_tokens`` (or ``max_tokens``) the tokens of one
sample, ``seed`` the request's seed; the body's ``capeval`` object overrides any policy
field. The answer is ChatCapEval's accepted sample; ``usage`` counts every token it
spent (our accounting: prompt and self-evaluation tokens as prompt tokens, every sampled
token as completion tokens, those of samples not returned as reasoning tokens), and the
response's ``capeval`` object carries the samples, the stop reason and the decision trace.

Example:
    >>> body = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], temperature=0.2)
    >>> request_policy(CapEvalConfig(), body).temperature, request_policy(CapEvalConfig(), body).initial_temperature
    (0.2, 0.2)

"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, HumanMessage, SystemMessage
from pydantic import ValidationError

from langchain_capeval.config import CapEvalConfig
from langchain_capeval.engines.base import Engine
from langchain_capeval.errors import BudgetTooSmallError, PromptTooLongError
from langchain_capeval.policy import plan_next_batch
from langchain_capeval.server.protocol import APIError, ChatCompletionRequest


def request_policy(default: CapEvalConfig, body: ChatCompletionRequest) -> CapEvalConfig:
    """The request's policy: ``default`` with the OpenAI fields, then the ``capeval`` extension, applied.

    Raises:
        APIError: 400 naming the field, for a value the policy rejects.

    """
    overrides: dict[str, Any] = {}
    if body.temperature is not None:
        overrides["temperature"] = body.temperature
        overrides["initial_temperature"] = min(default.initial_temperature, body.temperature)
    if body.top_p is not None:
        overrides["top_p"] = body.top_p
    if body.completion_limit is not None:
        overrides["max_new_tokens"] = body.completion_limit
    if body.seed is not None:
        overrides["seed"] = body.seed
    extension = body.capeval or {}
    unknown = sorted(set(extension) - CapEvalConfig.field_names())
    if unknown:
        valid = ", ".join(sorted(CapEvalConfig.field_names()))
        raise APIError(
            400, f"capeval: unknown policy field(s) {unknown}; valid: {valid}", param=f"capeval.{unknown[0]}"
        )
    try:
        return default.merged({**overrides, **extension})
    except ValidationError as e:
        err = e.errors()[0]
        name = ".".join(str(x) for x in err["loc"])
        if not name:  # a check across fields
            param = "capeval"
        elif name in overrides and name not in extension:
            param = _OPENAI_FIELDS[name]
        else:
            param = f"capeval.{name}"
        raise APIError(400, f"{param}: {err['msg']}", param=param) from e


_OPENAI_FIELDS = {
    "temperature": "temperature",
    "initial_temperature": "temperature",
    "top_p": "top_p",
    "max_new_tokens": "max_completion_tokens",
    "seed": "seed",
}


def check_prompt_fits(engine: Engine, messages: list[dict[str, str]], policy: CapEvalConfig) -> int:
    """Encode the prompt and check it fits the context with one sample and its self-evaluation; return its length.

    Raises:
        InvalidMessagesError: The messages are malformed.
        PromptTooLongError: The prompt plus ``max_new_tokens`` does not fit.

    """
    prompt = engine.chat_format.encode(messages)
    budget = engine.context_length - len(engine.chat_format.self_evaluation_suffix) - 1
    if len(prompt) + policy.max_new_tokens > budget:
        raise PromptTooLongError(len(prompt), policy.max_new_tokens, budget)
    return len(prompt)


def check_budget_fits(engine: Engine, policy: CapEvalConfig) -> None:
    """Check that the token budget fits at least one sample of one token and its self-evaluation.

    Raises:
        BudgetTooSmallError: ``max_total_tokens`` is too small for any sample to be drawn.

    """
    eval_tokens = len(engine.chat_format.self_evaluation_suffix) + 1  # as the graph counts one self-evaluation
    first = plan_next_batch(policy, batches_drawn=0, samples_drawn=0, tokens_spent=0, eval_tokens=eval_tokens)
    if first is None and policy.max_total_tokens is not None:
        raise BudgetTooSmallError(policy.max_total_tokens, 1 + eval_tokens)


def to_langchain(messages: list[dict[str, str]]) -> list[BaseMessage]:
    """``{"role", "content"}`` dicts as LangChain messages (roles already validated)."""
    kinds = {"system": SystemMessage, "user": HumanMessage, "assistant": AIMessage}
    out: list[BaseMessage] = []
    for m in messages:
        kind = kinds.get(m["role"])
        if kind is None:
            raise APIError(400, f"unknown role {m['role']!r}; expected system, user or assistant", param="messages")
        out.append(kind(content=m["content"]))
    return out


def openai_usage(message: AIMessage | AIMessageChunk) -> dict[str, Any]:
    """OpenAI ``usage`` from ChatCapEval's ``usage_metadata`` (every sampled and self-evaluation token).

    ``prompt_tokens_details.cached_tokens`` counts the prompt tokens the engine took from its
    prefix cache (included in ``prompt_tokens``, as in OpenAI's API).
    """
    u = message.usage_metadata or {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0}
    reasoning = (u.get("output_token_details") or {}).get("reasoning", 0)
    compute = message.response_metadata.get("compute", {})
    return {
        "prompt_tokens": u["input_tokens"],
        "completion_tokens": u["output_tokens"],
        "total_tokens": u["total_tokens"],
        "prompt_tokens_details": {"cached_tokens": int(compute.get("cached_prompt_tokens", 0))},
        "completion_tokens_details": {"reasoning_tokens": reasoning},
        "capeval": {
            "prompt_tokens": int(compute.get("prompt_tokens", 0)),
            "generated_tokens": int(compute.get("generated_tokens", 0)),
            "self_eval_tokens": int(compute.get("self_eval_tokens", 0)),
        },
    }


def capeval_extension(message: AIMessage | AIMessageChunk, policy: CapEvalConfig) -> dict[str, Any]:
    """The response's ``capeval`` object: samples, accepted sample, stop reason, decision trace, compute, policy."""
    meta = message.response_metadata
    return {
        "samples_used": meta.get("samples_used"),
        "samples": meta.get("samples", []),
        "accepted_sample": meta.get("accepted_sample"),
        "stop_reason": meta.get("stop_reason"),
        "trace": meta.get("trace", []),
        "compute": meta.get("compute", {}),
        "policy": policy.model_dump(mode="json"),
    }


def finish_reason(message: AIMessage | AIMessageChunk) -> str:
    """OpenAI's ``finish_reason`` of the accepted sample: ``length`` if it ran out of tokens, else ``stop``."""
    return "stop" if message.response_metadata.get("finish_reason") in ("eos", "stop") else "length"


def completion_id() -> str:
    """A fresh chat completion id."""
    return f"chatcmpl-{uuid.uuid4().hex}"


def chat_response(message: AIMessage, model: str, policy: CapEvalConfig) -> dict[str, Any]:
    """A ``chat.completion`` object for ChatCapEval's answer."""
    return {
        "id": completion_id(),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": message.content},
                "finish_reason": finish_reason(message),
                "logprobs": None,
            }
        ],
        "usage": openai_usage(message),
        "capeval": capeval_extension(message, policy),
    }


def chat_chunks(
    chunks: Iterator[AIMessageChunk], model: str, policy: CapEvalConfig, *, include_usage: bool
) -> Iterator[dict[str, Any]]:
    """``chat.completion.chunk`` objects: the role, the accepted answer's pieces, the finish, then usage.

    The role chunk comes at once; the answer's pieces come when ChatCapEval has accepted
    a sample (rejected samples never stream). The finishing chunk carries the ``capeval``
    extension; with ``include_usage`` a last chunk with no choices carries ``usage``.
    """
    head = {"id": completion_id(), "object": "chat.completion.chunk", "created": int(time.time()), "model": model}
    yield {**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}
    last: AIMessageChunk | None = None
    for chunk in chunks:
        if chunk.content:
            yield {**head, "choices": [{"index": 0, "delta": {"content": chunk.content}, "finish_reason": None}]}
        if chunk.response_metadata.get("stop_reason") is not None or chunk.usage_metadata:
            last = chunk
    if last is None:
        return
    done = {"index": 0, "delta": {}, "finish_reason": finish_reason(last)}
    yield {**head, "choices": [done], "capeval": capeval_extension(last, policy)}
    if include_usage:
        yield {**head, "choices": [], "usage": openai_usage(last)}
