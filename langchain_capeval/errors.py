"""Typed errors of langchain-capeval.

Every error says what is wrong and, where there is one, what to do about it.
Input errors subclass :class:`ValueError` so that callers who already catch
``ValueError`` keep working; errors about the installation subclass
:class:`RuntimeError`.

Example:
    >>> from langchain_capeval.errors import InvalidMessagesError
    >>> try:
    ...     raise InvalidMessagesError("messages: the list is empty")
    ... except ValueError as e:
    ...     print(e)
    messages: the list is empty

"""

from __future__ import annotations


class CapEvalError(Exception):
    """Base class of every error raised by langchain-capeval."""


class CapEvalInputError(CapEvalError, ValueError):
    """The caller passed something invalid; fix the input and retry."""


class InvalidMessagesError(CapEvalInputError):
    """The chat messages are empty, malformed or use an unknown role."""


class PromptTooLongError(CapEvalInputError):
    """The prompt, plus the tokens asked for, does not fit the model's context."""

    def __init__(self, prompt_tokens: int, max_new_tokens: int, context_length: int) -> None:
        self.prompt_tokens = prompt_tokens
        self.max_new_tokens = max_new_tokens
        self.context_length = context_length
        super().__init__(
            f"prompt of {prompt_tokens} tokens + max_new_tokens={max_new_tokens} exceeds the "
            f"model's context length of {context_length} tokens; shorten the prompt or lower "
            "max_new_tokens"
        )


class InvalidSamplingError(CapEvalInputError):
    """A sampling value (temperature, top_p, max_new_tokens, stop, seed) is invalid."""


class UnknownRowError(CapEvalInputError):
    """An engine row id that is not (or no longer) live in the engine."""


class UnsupportedFeatureError(CapEvalError, NotImplementedError):
    """The feature is honestly not supported (for example tool calling)."""


class ModelNotInstalledError(CapEvalError, RuntimeError):
    """The model weights are not on this machine; the message names the install command."""


class MissingExtraError(CapEvalError, ImportError):
    """An optional dependency is missing; the message names the extra to install."""


class DataNotFoundError(CapEvalError, FileNotFoundError):
    """A data set is not on this machine; the message names the path that was expected."""


class UnknownTaskFamilyError(CapEvalInputError):
    """A task family name that is not registered; the message lists the valid ones."""

    def __init__(self, name: str, valid: list[str]) -> None:
        self.name = name
        self.valid = valid
        super().__init__(f"unknown task family {name!r}; valid families: {', '.join(valid)}")


class InvalidTaskError(CapEvalInputError):
    """A task, or an argument that builds tasks (split, limit, family size), is invalid."""


class InvalidRewardError(CapEvalInputError):
    """A reward, a reward source's input or output, or a preference setting is invalid."""


class ServerError(CapEvalError, RuntimeError):
    """An OpenAI-compatible server failed (HTTP 5xx, a broken stream, an unusable answer) after any retries."""

    def __init__(self, message: str, *, status_code: int | None = None) -> None:
        self.status_code = status_code
        super().__init__(message)


class ServerConnectionError(ServerError, ConnectionError):
    """An OpenAI-compatible server could not be reached; the message names the URL and the retries made."""


class ServerTimeoutError(ServerError, TimeoutError):
    """An OpenAI-compatible server did not answer within the configured timeout; the message names it."""


class ServerRequestError(CapEvalInputError):
    """An OpenAI-compatible server rejected a request (HTTP 4xx); the message carries the server's own message."""

    def __init__(self, message: str, *, status_code: int | None = None, code: str | None = None) -> None:
        self.status_code = status_code
        self.code = code
        super().__init__(message)


class ServerFeatureError(UnsupportedFeatureError):
    """An OpenAI-compatible server lacks a feature the client engine needs (for example top-k logprobs)."""

    def __init__(self, feature: str, detail: str) -> None:
        self.feature = feature
        super().__init__(f"the server does not support {feature}: {detail}")


class RequestCancelledError(CapEvalError):
    """A request was cancelled (its HTTP client disconnected); its engine rows are being freed."""


class EngineClosedError(CapEvalError):
    """The engine was closed; it accepts no more work."""


class BudgetTooSmallError(CapEvalInputError):
    """The token budget (``max_total_tokens``) cannot fit even one sample of one token and its self-evaluation."""

    def __init__(self, max_total_tokens: int, needed: int) -> None:
        self.max_total_tokens = max_total_tokens
        self.needed = needed
        super().__init__(
            f"max_total_tokens={max_total_tokens} cannot fit one sample: a sample of 1 token and its "
            f"self-evaluation need {needed} tokens; raise max_total_tokens to at least {needed} or leave it unset"
        )
