"""Prefix caching: a new prompt starts from the cached keys and values of the longest prompt prefix seen.

Chat prompts repeat themselves. Every request of an application opens with the same
system prompt (24 of the ~35 tokens of a short SmolLM2 chat prompt are its default
system turn), and each turn of a conversation repeats the previous turn's prompt. The
transformers engine keeps the prompt caches of recent requests in a :class:`PrefixCache`
(least recently used first out, within a byte budget). A new prompt is prefilled on top of
a copy of the longest prefix it shares with a cached prompt or with the prompt of a live
request, so only the tokens after that prefix go through the model. The keys and values
of a token depend only on the tokens before it, so the result is the full prefill's, up
to float rounding (the same matrix products, in smaller batches).

Example:
    >>> import torch
    >>> from langchain_capeval.engines.kv_batch import KVBatch
    >>> def prompt_cache(n):  # a one-row cache of n tokens (1 layer, 1 head, head_dim 2)
    ...     kv = [torch.arange(n * 2.0).reshape(1, 1, n, 2)]
    ...     return KVBatch([-1], kv, kv, torch.ones(1, n, dtype=torch.bool), torch.tensor([n]), n)
    >>> cache = PrefixCache(max_bytes=2**20, min_tokens=2)
    >>> cache.add([1, 2, 3, 4], prompt_cache(4))
    >>> batch, tokens = cache.longest_prefix([1, 2, 3, 9, 9])
    >>> tokens, batch.length, batch.next_pos.tolist()
    (3, 3, [3])
    >>> cache.longest_prefix([7, 8])
    (None, 0)

"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence

from langchain_capeval.engines.kv_batch import KVBatch

DEFAULT_PREFIX_CACHE_BYTES = 64 * 2**20
"""Bytes of prompt caches kept after their requests end (SmolLM2-135M: ~46 KB a token, ~1,400 tokens)."""

MIN_PREFIX_TOKENS = 8
"""Shorter shared prefixes are prefilled again: copying them would save next to nothing."""


class PrefixCache:
    """Prompt caches of ended requests, looked up by longest shared prefix; least recently used first out.

    Args:
        max_bytes: Budget for the kept caches; 0 keeps none (live prompts are still shared).
        min_tokens: Shortest prefix worth reusing.

    """

    def __init__(self, max_bytes: int = DEFAULT_PREFIX_CACHE_BYTES, min_tokens: int = MIN_PREFIX_TOKENS) -> None:
        if max_bytes < 0 or min_tokens < 1:
            raise ValueError(f"max_bytes must be >= 0 and min_tokens >= 1, got {max_bytes} and {min_tokens}")
        self.max_bytes, self.min_tokens = max_bytes, min_tokens
        self._entries: OrderedDict[tuple[int, ...], KVBatch] = OrderedDict()
        self.nbytes = 0
        self.hits = 0
        self.reused_tokens = 0

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, prompt: Sequence[int], cache: KVBatch) -> None:
        """Keep ``cache``, the one-row cache of exactly ``prompt``; the least recently used go beyond the budget."""
        key = tuple(prompt)
        old = self._entries.pop(key, None)
        if old is not None:
            self.nbytes -= old.nbytes
        if cache.nbytes > self.max_bytes:
            return
        self._entries[key] = cache
        self.nbytes += cache.nbytes
        while self.nbytes > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self.nbytes -= evicted.nbytes

    def longest_prefix(
        self, prompt: Sequence[int], live: Iterable[tuple[Sequence[int], KVBatch]] = ()
    ) -> tuple[KVBatch | None, int]:
        """A copy of the cache of the longest prefix of ``prompt`` held here or by a ``live`` prompt.

        The prefix stops one token short of the whole prompt: its last token is pushed
        through the model, which gives the logits of the first sampled token.

        Args:
            prompt: The new prompt's token ids.
            live: ``(prompt ids, one-row cache)`` of the prompts of live requests.

        Returns:
            ``(cache, tokens)``: a new one-row cache of the prompt's first ``tokens`` tokens,
            with room for the rest; ``(None, 0)`` when no prefix reaches ``min_tokens``.

        """
        wanted = tuple(prompt)
        limit = len(wanted) - 1
        tokens, source, kept_key = 0, None, None
        candidates: list[tuple[Sequence[int], KVBatch, tuple[int, ...] | None]] = [
            (key, cache, key) for key, cache in self._entries.items()
        ]
        candidates += [(ids, cache, None) for ids, cache in live]
        for ids, cache, key in candidates:
            shared = min(shared_prefix_length(ids, wanted), limit)
            if shared > tokens:
                tokens, source, kept_key = shared, cache, key
        if source is None or tokens < self.min_tokens:
            return None, 0
        if kept_key is not None:
            self._entries.move_to_end(kept_key)
        self.hits += 1
        self.reused_tokens += tokens
        return source.prefix(tokens, extra_capacity=len(wanted) - tokens), tokens

    def clear(self) -> None:
        """Drop every kept cache."""
        self._entries.clear()
        self.nbytes = 0


def shared_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens ``a`` and ``b`` share.

    Example:
        >>> shared_prefix_length([1, 2, 3], [1, 2, 4, 5])
        2

    """
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
