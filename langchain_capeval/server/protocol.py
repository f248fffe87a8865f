"""The OpenAI wire format the server speaks: request bodies, error bodies, the ``capeval`` extension.

Request models accept (and ignore) fields this server has no use for, as OpenAI's own
API does for fields a model does not use; fields whose silent omission would change the
answer (``n > 1``, tools, penalties, ``echo``) are rejected with a 400 that names them.
Errors use OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``.

Example:
    >>> error_body("no such model", "invalid_request_error", param="model", code="model_not_found")["error"]
    {'message': 'no such model', 'type': 'invalid_request_error', 'param': 'model', 'code': 'model_not_found'}

"""

from __future__ import annotations

import random
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from langchain_capeval.chat_format import lone_surrogate_at
from langchain_capeval.sampling import SamplingParams

MAX_TOP_LOGPROBS = 20
"""Most alternatives per token that ``/v1/completions`` returns (as OpenAI and vLLM)."""

MAX_SEED = 2**63 - 1
"""Largest ``seed`` accepted (a signed 64-bit integer, as OpenAI's API); larger ones cannot seed a generator."""


def error_body(message: str, type_: str, *, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    r"""An OpenAI-shaped error body (text from the request that is not valid Unicode is written escaped).

    Example:
        >>> error_body("unknown field", "invalid_request_error", param="capeval.x\ud800")["error"]["param"]
        'capeval.x\\ud800'

    """
    param = None if param is None else utf8_safe(param)
    return {"error": {"message": utf8_safe(message), "type": type_, "param": param, "code": code}}


def utf8_safe(text: str) -> str:
    r"""``text`` with each lone surrogate (which UTF-8 cannot encode) written as a ``\udXXX`` escape."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


class APIError(Exception):
    """An error to answer with ``status`` and an OpenAI-shaped body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code
        super().__init__(message)

    def body(self) -> dict[str, Any]:
        """The JSON body of the error response."""
        return error_body(self.message, self.type, param=self.param, code=self.code)


def unsupported(param: str, what: str) -> APIError:
    """A 400 for a field whose value this server cannot honour."""
    return APIError(400, f"{param}: {what}", param=param, code="unsupported_parameter")


class StreamOptions(BaseModel):
    """OpenAI's ``stream_options``."""

    model_config = ConfigDict(extra="allow")

    include_usage: bool = False
    """Send a last chunk with the request's usage before ``data: [DONE]``."""


class _Common(BaseModel):
    """Fields shared by both endpoints."""

    model_config = ConfigDict(extra="allow")

    model: str
    """The served model name (``GET /v1/models``)."""
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None

    def stop_strings(self) -> tuple[str, ...]:
        """``stop`` as a tuple of non-empty strings."""
        if self.stop is None:
            return ()
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        if not all(stops):
            raise APIError(400, "stop: stop strings must not be empty", param="stop")
        return tuple(stops)

    def check_common(self) -> None:
        """Reject the shared fields this server cannot honour."""
        if self.n != 1:
            raise unsupported("n", f"only n=1 is supported, got {self.n}; send one request per completion")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise unsupported(name, "penalties are not supported; leave it unset or 0")
        if self.logit_bias:
            raise unsupported("logit_bias", "logit bias is not supported")

    @property
    def include_usage(self) -> bool:
        """Whether a streamed response ends with a usage chunk."""
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatMessageIn(BaseModel):
    """One chat message; content is a string or a list of text parts."""

    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[dict[str, Any]] | None = None

    def text(self, index: int) -> str:
        """The message's text content."""
        if isinstance(self.content, str):
            return self.content
        if self.content is None:
            raise APIError(400, f"messages[{index}].content: content is required", param=f"messages[{index}].content")
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise unsupported(f"messages[{index}].content", "only text content parts are supported")
            parts.append(part["text"])
        return "".join(parts)


class ChatCompletionRequest(_Common):
    """Body of ``POST /v1/chat/completions``."""

    messages: list[ChatMessageIn] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    logprobs: bool | None = None
    response_format: dict[str, Any] | None = None
    capeval: dict[str, Any] | None = None
    """Extension: per-request overrides of :class:`~langchain_capeval.config.CapEvalConfig` fields."""

    def check(self) -> None:
        """Reject the fields this server cannot honour."""
        self.check_common()
        if self.tools:
            raise unsupported("tools", "tool calling is not supported by ChatCapEval")
        if self.functions:
            raise unsupported("functions", "function calling is not supported by ChatCapEval")
        if self.tool_choice not in (None, "none"):
            raise unsupported("tool_choice", "tool calling is not supported by ChatCapEval")
        if self.logprobs:
            raise unsupported("logprobs", "chat logprobs are not returned; use /v1/completions with logprobs")
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise unsupported("response_format", "only {'type': 'text'} is supported")

    def chat_messages(self) -> list[dict[str, str]]:
        """The messages as ``{"role", "content"}`` dicts (``developer`` is read as ``system``)."""
        out = []
        for i, m in enumerate(self.messages):
            role = "system" if m.role == "developer" else m.role
            out.append({"role": role, "content": m.text(i)})
        return out

    @property
    def completion_limit(self) -> int | None:
        """``max_completion_tokens``, or the older ``max_tokens``."""
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_Common):
    """Body of ``POST /v1/completions``: plain sampling, with top-k logprobs for self-evaluation."""

    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int = Field(default=16, ge=1)
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None
    add_special_tokens: bool = True
    """vLLM extension: let the tokenizer add its special tokens (a BOS) to a text prompt; a client that
    sends an already templated prompt passes ``false``."""
    return_token_ids: bool = False
    """vLLM extension: each choice (each streamed delta) carries its ``token_ids``."""
    return_tokens_as_token_ids: bool = False
    """vLLM extension: logprob tokens are written ``"token_id:{id}"``."""

    def check(self) -> None:
        """Reject the fields this server cannot honour."""
        self.check_common()
        if self.echo:
            raise unsupported("echo", "echo is not supported")
        if self.suffix:
            raise unsupported("suffix", "suffix (insertion) is not supported")
        if self.best_of not in (None, 1):
            raise unsupported("best_of", "best_of is not supported; use /v1/chat/completions for adaptive best-of-N")

    def sampling_params(self) -> SamplingParams:
        """How the completion's row is decoded (OpenAI's defaults: temperature 1, top-p 1; a fresh seed)."""
        return SamplingParams(
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            max_new_tokens=self.max_tokens,
            stop=self.stop_strings(),
            seed=self.seed if self.seed is not None else random.SystemRandom().randrange(2**31),
        )

    def single_prompt(self) -> str | list[int]:
        """The one prompt of the request, as text or token ids."""
        p: Any = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], str | list):
            if len(p) != 1:
                raise unsupported("prompt", f"one prompt per request is supported, got {len(p)}")
            p = p[0]
        if not p:
            raise APIError(400, "prompt: the prompt is empty", param="prompt")
        bad = lone_surrogate_at(p) if isinstance(p, str) else None
        if bad is not None:
            raise APIError(
                400, f"prompt: the text is not valid Unicode: a lone surrogate at position {bad}", param="prompt"
            )
        return p
