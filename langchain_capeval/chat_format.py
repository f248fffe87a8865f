r"""Chat messages and the self-evaluation turn, rendered with the model's own template.

The self-evaluation turn is a new *user* message, ``SELF_EVALUATION_QUESTION``,
followed by the assistant header; the model's next token is read as "No" (it
would not do better by starting over: the response is as good as it gets) or
"Yes" (it would). :class:`ChatFormat` renders it as the token ids that follow a
response, so an engine can append them on top of the response's KV cache.

Example:
    >>> fmt = ChatFormat(tokenizer)  # doctest: +SKIP
    >>> prompt = fmt.encode([{"role": "user", "content": "What is 2+3?"}])  # doctest: +SKIP
    >>> print(fmt.tokenizer.decode(fmt.self_evaluation_suffix))  # doctest: +SKIP
    <|im_end|>
    <|im_start|>user
    Would you do better if you started over? ("Yes." or "No.")<|im_end|>
    <|im_start|>assistant

"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import cached_property
from typing import TYPE_CHECKING, Any

from langchain_capeval.errors import InvalidMessagesError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

SELF_EVALUATION_QUESTION = 'Would you do better if you started over? ("Yes." or "No.")'
"""The question of the paper, asked after a full or partial response."""

ROLES = ("system", "user", "assistant")
"""Roles a prompt may contain."""

_SENTINEL = "\x00CAPEVAL_RESPONSE\x00"

ChatMessage = Mapping[str, Any]
"""A message as a mapping with ``role`` and ``content`` (the OpenAI shape)."""


def lone_surrogate_at(text: str) -> int | None:
    r"""Index of the first lone surrogate in ``text`` (a character UTF-8 cannot encode), or ``None``.

    Such text is not valid Unicode: it cannot be tokenized or sent back as UTF-8 JSON.
    JSON may carry one as an escape (``"\ud800"``), which Python's ``json`` decodes as is.

    Example:
        >>> lone_surrogate_at("caf\u00e9"), lone_surrogate_at("ab\ud800")
        (None, 2)

    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return int(e.start)
    return None


def validate_messages(messages: object) -> list[dict[str, str]]:
    """Check a message list and return it as plain ``{"role", "content"}`` dicts.

    Raises:
        InvalidMessagesError: Empty list, a non-mapping item, an unknown role, a
            non-string content or one that is not valid Unicode (a lone surrogate),
            or a last message that is not from the user.

    Example:
        >>> validate_messages([{"role": "user", "content": "hi"}])  # doctest: +ELLIPSIS
        [{'role': 'user', 'content': 'hi'}]
        >>> validate_messages([{"role": "robot", "content": "hi"}])
        Traceback (most recent call last):
        ...
        langchain_capeval.errors.InvalidMessagesError: messages[0]: unknown role 'robot'; ...

    """
    if isinstance(messages, str | bytes) or not isinstance(messages, Sequence):
        raise InvalidMessagesError(f"messages must be a list of messages, got {type(messages).__name__}")
    if len(messages) == 0:
        raise InvalidMessagesError("messages: the list is empty; give at least one user message")
    out: list[dict[str, str]] = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise InvalidMessagesError(
                f"messages[{i}]: expected a mapping with 'role' and 'content', got {type(m).__name__}"
            )
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise InvalidMessagesError(f"messages[{i}]: unknown role {role!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise InvalidMessagesError(f"messages[{i}]: content must be a string, got {type(content).__name__}")
        bad = lone_surrogate_at(content)
        if bad is not None:
            raise InvalidMessagesError(
                f"messages[{i}]: content is not valid Unicode: a lone surrogate {content[bad]!r} at position {bad}; "
                "send UTF-8 text"
            )
        out.append({"role": str(role), "content": content})
    if out[-1]["role"] != "user":
        raise InvalidMessagesError(
            f"messages[{len(out) - 1}]: the last message must be from the user, got {out[-1]['role']!r}"
        )
    return out


class ChatFormat:
    """Messages -> prompt token ids, and the self-evaluation suffix, for one tokenizer.

    Args:
        tokenizer: A Hugging Face tokenizer with a chat template.

    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        if not getattr(tokenizer, "chat_template", None):
            raise InvalidMessagesError("the tokenizer has no chat template; pass a chat (instruct) model")
        self.tokenizer = tokenizer

    def render(self, messages: Sequence[ChatMessage]) -> str:
        """The prompt text: ``messages`` then the assistant header."""
        msgs = validate_messages(messages)
        text = self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        assert isinstance(text, str)
        return text

    def encode(self, messages: Sequence[ChatMessage]) -> list[int]:
        """The prompt token ids: ``messages`` then the assistant header."""
        return self._ids(self.render(messages))

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, token_ids: Sequence[int]) -> str:
        """Response text of ``token_ids``, without special tokens."""
        return str(self.tokenizer.decode(list(token_ids), skip_special_tokens=True))

    @cached_property
    def self_evaluation_suffix(self) -> list[int]:
        """Token ids after a response: end of turn, the question as a user turn, the assistant header."""
        msgs = [
            {"role": "user", "content": "Q"},
            {"role": "assistant", "content": _SENTINEL},
            {"role": "user", "content": SELF_EVALUATION_QUESTION},
        ]
        text = self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        assert isinstance(text, str)
        return self._ids(text.split(_SENTINEL, 1)[1])

    def suffix_after(self, response_ids: Sequence[int]) -> list[int]:
        """The self-evaluation suffix for a response.

        A response that already ended its turn (its last token is the suffix's first,
        the end-of-turn token) skips that token.
        """
        suffix = self.self_evaluation_suffix
        if response_ids and response_ids[-1] == suffix[0] and suffix[0] in self.eos_token_ids:
            return suffix[1:]
        return suffix

    @cached_property
    def eos_token_ids(self) -> frozenset[int]:
        """Tokens that end the assistant's turn."""
        ids = {self.tokenizer.eos_token_id}
        end_of_turn = self.self_evaluation_suffix[0]
        if self.tokenizer.convert_ids_to_tokens(end_of_turn) in self.tokenizer.all_special_tokens:
            ids.add(end_of_turn)
        return frozenset(i for i in ids if i is not None)

    @cached_property
    def answer_token_ids(self) -> tuple[int, int]:
        """The ("No", "Yes") token ids read after the self-evaluation turn."""
        no = self._ids("No")
        yes = self._ids("Yes")
        return no[0], yes[0]
