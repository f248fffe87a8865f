"""A left-padded batch of KV caches that rows can join, leave, and roll back.

:class:`KVBatch` holds the keys and values of a set of rows in preallocated
buffers of shape ``[rows, kv_heads, capacity, head_dim]`` per layer, written in
place (no ``torch.cat`` per step), with a boolean mask of real (non-padding)
columns and each row's next position id. Rows of different lengths are
left-padded. The operations are the ones the method needs:

* :meth:`KVBatch.forward` pushes a chunk of tokens per row through the model on
  top of the cache (a decode step, or the self-evaluation suffix);
* :meth:`KVBatch.truncate` rolls the cache back to an earlier length (after a
  self-evaluation, generation continues as if nothing happened);
* :meth:`KVBatch.select` and :meth:`KVBatch.concat` split and merge batches, so
  dropped rows leave the batch and cost nothing further;
* :meth:`KVBatch.prefix` copies the first tokens of a prompt's cache, for a new prompt
  that starts with them (:mod:`~langchain_capeval.engines.prefix_cache`).

Example:
    >>> batch = KVBatch.empty(model, rows=[0], capacity=64)  # doctest: +SKIP
    >>> logits = batch.forward(model, torch.tensor([[1, 2, 3]]))  # prefill  # doctest: +SKIP
    >>> batch.length  # doctest: +SKIP
    3

"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from transformers.cache_utils import Cache, DynamicLayer

if TYPE_CHECKING:
    from transformers import PreTrainedModel

RowId = int


class _BufferLayer(DynamicLayer):
    """One layer's cache as a view on a preallocated buffer; ``update`` writes in place."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, length: int) -> None:
        super().__init__()
        self.buf_k, self.buf_v, self.length = keys, values, length
        self.dtype, self.device = keys.dtype, keys.device
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + key_states.shape[-2]
        self.buf_k[:, :, self.length : end] = key_states
        self.buf_v[:, :, self.length : end] = value_states
        self.length = end
        self.keys, self.values = self.buf_k[:, :, :end], self.buf_v[:, :, :end]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length


_CACHE_KEYWORD: dict[type, str] = {}


def cache_keyword(model: Any) -> str:
    """The keyword a model's ``forward`` takes its KV cache by.

    transformers 5.24 renamed ``past_key_values`` to ``cache`` (the old name warns on every call and goes in
    5.40); the package supports ``transformers>=5,<6``, so the name is read from the model's own signature.
    A PEFT model forwards keyword arguments to the model it wraps, whose signature decides.

    Example:
        >>> out = model(input_ids=ids, **{cache_keyword(model): cache}, use_cache=True)  # doctest: +SKIP

    """
    owner = type(model.get_base_model() if hasattr(model, "get_base_model") else model)
    if owner not in _CACHE_KEYWORD:
        params = inspect.signature(owner.forward).parameters
        _CACHE_KEYWORD[owner] = "cache" if "cache" in params else "past_key_values"
    return _CACHE_KEYWORD[owner]


def output_cache(out: Any) -> Any:
    """The KV cache a forward returned: ``out.cache`` since transformers 5.24, ``out.past_key_values`` before."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def _kv_shape(model: PreTrainedModel) -> tuple[int, int, int]:
    """(layers, kv_heads, head_dim) of a decoder-only model."""
    cfg = model.config.get_text_config(decoder=True)
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return cfg.num_hidden_layers, kv_heads, head_dim


def chunk_attention_mask(cache_mask: torch.Tensor, chunk_mask: torch.Tensor) -> torch.Tensor:
    """4D boolean mask for a chunk on top of a cache.

    Args:
        cache_mask: ``[B, L]`` real columns of the cache.
        chunk_mask: ``[B, S]`` real tokens of the chunk.

    Returns:
        ``[B, 1, S, L + S]``: query i attends to the cache's real columns and to the
        chunk's real tokens at positions <= i (True = attend).

    """
    s = chunk_mask.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool, device=chunk_mask.device).tril_()
    new = causal[None] & chunk_mask[:, None, :]  # [B, S, S]
    old = cache_mask[:, None, :].expand(-1, s, -1)  # [B, S, L]
    return torch.cat([old, new], dim=-1)[:, None]


def left_padded_chunk(chunks: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids ``[B, S]`` and real-token mask ``[B, S]`` of chunks of different lengths, left-padded.

    Left padding keeps every row's last position real, where :meth:`KVBatch.forward` reads the logits.

    Example:
        >>> ids, mask = left_padded_chunk([[5, 6], [7]])
        >>> ids.tolist(), mask.tolist()
        ([[5, 6], [0, 7]], [[True, True], [False, True]])

    """
    width = max(len(c) for c in chunks)
    ids = torch.zeros(len(chunks), width, dtype=torch.long)
    mask = torch.zeros(len(chunks), width, dtype=torch.bool)
    for i, c in enumerate(chunks):
        ids[i, width - len(c) :] = torch.tensor(list(c), dtype=torch.long)
        mask[i, width - len(c) :] = True
    return ids, mask


def chunk_position_ids(next_pos: torch.Tensor, chunk_mask: torch.Tensor) -> torch.Tensor:
    """``[B, S]`` position ids of a chunk: each real token continues its row; pads repeat the last."""
    steps = chunk_mask.long().cumsum(dim=1) - 1
    return next_pos[:, None] + steps.clamp_min(0)


class KVBatch:
    """Keys and values of ``rows``, left-padded to a shared ``length``.

    Padding columns hold zeros, never uninitialised memory: attention weights of
    masked columns are 0, but 0 * NaN would still poison the output.

    Attributes:
        rows: Row ids, in batch order.
        keys, values: Per layer, ``[B, kv_heads, capacity, head_dim]`` buffers.
        mask: ``[B, capacity]`` True where a column holds a real token.
        next_pos: ``[B]`` position id of each row's next token.
        length: Columns in use.

    """

    def __init__(
        self,
        rows: Sequence[RowId],
        keys: list[torch.Tensor],
        values: list[torch.Tensor],
        mask: torch.Tensor,
        next_pos: torch.Tensor,
        length: int,
    ) -> None:
        self.rows = list(rows)
        self.keys, self.values = keys, values
        self.mask, self.next_pos, self.length = mask, next_pos, length

    @classmethod
    def empty(cls, model: PreTrainedModel, rows: Sequence[RowId], capacity: int) -> KVBatch:
        """A batch of ``rows`` with nothing cached yet."""
        n_layers, kv_heads, head_dim = _kv_shape(model)
        param = next(model.parameters())
        shape = (len(rows), kv_heads, capacity, head_dim)
        keys = [torch.zeros(shape, dtype=param.dtype, device=param.device) for _ in range(n_layers)]
        values = [torch.zeros(shape, dtype=param.dtype, device=param.device) for _ in range(n_layers)]
        mask = torch.zeros(len(rows), capacity, dtype=torch.bool, device=param.device)
        next_pos = torch.zeros(len(rows), dtype=torch.long, device=param.device)
        return cls(rows, keys, values, mask, next_pos, 0)

    @property
    def capacity(self) -> int:
        """Columns allocated."""
        return self.mask.shape[1]

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def nbytes(self) -> int:
        """Bytes of the key/value buffers and the mask."""
        kv = sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))
        return kv + self.mask.numel() * self.mask.element_size()

    def real_lengths(self) -> torch.Tensor:
        """``[B]`` real (non-padding) tokens per row."""
        return self.mask[:, : self.length].sum(dim=1)

    def reserve(self, extra: int) -> None:
        """Make room for ``extra`` more columns (one copy; callers reserve what they will use)."""
        need = self.length + extra
        if need <= self.capacity:
            return
        cap = need + 64
        self.keys = [_grow(k, cap) for k in self.keys]
        self.values = [_grow(v, cap) for v in self.values]
        mask = torch.zeros(len(self), cap, dtype=torch.bool, device=self.mask.device)
        mask[:, : self.length] = self.mask[:, : self.length]
        self.mask = mask

    @torch.inference_mode()
    def forward(
        self, model: PreTrainedModel, input_ids: torch.Tensor, input_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Push a chunk through ``model`` on top of the cache and append it.

        Args:
            model: The causal LM whose cache this is.
            input_ids: ``[B, S]`` tokens, one chunk per row.
            input_mask: ``[B, S]`` True for real tokens; pads must come first
                (left-padded) so the last position is real in every row.

        Returns:
            ``[B, vocab]`` logits at the chunk's last position.

        """
        b, s = input_ids.shape
        if input_mask is None:
            input_mask = torch.ones(b, s, dtype=torch.bool, device=input_ids.device)
        self.reserve(s)
        start = self.length
        attn = chunk_attention_mask(self.mask[:, :start], input_mask)
        pos = chunk_position_ids(self.next_pos, input_mask)
        layers = [_BufferLayer(k, v, start) for k, v in zip(self.keys, self.values, strict=True)]
        cache = Cache(layers=layers)  # type: ignore[arg-type]
        out = model(
            input_ids=input_ids,
            attention_mask=attn,
            position_ids=pos,
            **{cache_keyword(model): cache},
            use_cache=True,
            logits_to_keep=1,
        )
        self.mask[:, start : start + s] = input_mask
        self.next_pos = self.next_pos + input_mask.sum(dim=1)
        self.length = start + s
        logits: torch.Tensor = out.logits[:, -1, :]
        return logits

    def truncate(self, length: int, next_pos: torch.Tensor) -> None:
        """Roll back to ``length`` columns, restoring each row's next position."""
        self.mask[:, length : self.length] = False
        self.length = length
        self.next_pos = next_pos

    def select(self, indices: Sequence[int]) -> KVBatch:
        """A new, compact batch of the rows at ``indices`` (leading all-pad columns dropped)."""
        idx = torch.tensor(list(indices), dtype=torch.long, device=self.mask.device)
        mask = self.mask[idx, : self.length]
        used = mask.any(dim=0).nonzero()
        first = int(used[0]) if len(used) else self.length
        length = self.length - first
        cap = self.capacity - first
        keys = [_take(k, idx, first, self.length, cap) for k in self.keys]
        values = [_take(v, idx, first, self.length, cap) for v in self.values]
        new_mask = torch.zeros(len(idx), cap, dtype=torch.bool, device=mask.device)
        new_mask[:, :length] = mask[:, first:]
        return KVBatch([self.rows[i] for i in indices], keys, values, new_mask, self.next_pos[idx].clone(), length)

    def expand(self, rows: Sequence[RowId], extra_capacity: int) -> KVBatch:
        """A batch of ``rows`` that all copy this one-row batch's cache (one prefill, many samples)."""
        assert len(self) == 1, "expand copies a single-row (prompt) batch"
        n, cap = len(rows), self.length + extra_capacity
        keys = [_repeat(k, n, self.length, cap) for k in self.keys]
        values = [_repeat(v, n, self.length, cap) for v in self.values]
        mask = torch.zeros(n, cap, dtype=torch.bool, device=self.mask.device)
        mask[:, : self.length] = self.mask[:, : self.length]
        return KVBatch(rows, keys, values, mask, self.next_pos.expand(n).clone(), self.length)

    def prefix(self, tokens: int, extra_capacity: int = 0) -> KVBatch:
        """A new one-row batch: this one-row batch's first ``tokens`` real tokens, with room for ``extra_capacity``.

        Keys and values of a token depend only on the tokens before it, so the copy is the
        cache a prefill of just those tokens would give (prefix caching).
        """
        assert len(self) == 1, "prefix copies from a single-row (prompt) batch"
        real = self.mask[0, : self.length].nonzero().flatten()
        if not 1 <= tokens <= len(real):
            raise ValueError(f"tokens must be in [1, {len(real)}], got {tokens}")
        length = int(real[tokens - 1]) + 1  # columns up to and including that token
        cap = length + extra_capacity
        idx = torch.zeros(1, dtype=torch.long, device=self.mask.device)
        keys = [_take(k, idx, 0, length, cap) for k in self.keys]
        values = [_take(v, idx, 0, length, cap) for v in self.values]
        mask = torch.zeros(1, cap, dtype=torch.bool, device=self.mask.device)
        mask[:, :length] = self.mask[:, :length]
        next_pos = self.next_pos - (len(real) - tokens)
        return KVBatch(self.rows, keys, values, mask, next_pos, length)

    @staticmethod
    def concat(batches: Sequence[KVBatch], extra_capacity: int = 0) -> KVBatch:
        """Merge batches into one, left-padding the shorter ones."""
        if len(batches) == 1 and extra_capacity <= batches[0].capacity - batches[0].length:
            return batches[0]
        length = max(b.length for b in batches)
        cap = length + extra_capacity
        n = sum(len(b) for b in batches)
        ref = batches[0]
        keys, values = [], []
        for layer in range(len(ref.keys)):
            _, heads, _, dim = ref.keys[layer].shape
            k = ref.keys[layer].new_zeros((n, heads, cap, dim))
            v = torch.zeros_like(k)
            row = 0
            for b in batches:
                off = length - b.length
                k[row : row + len(b), :, off:length] = b.keys[layer][:, :, : b.length]
                v[row : row + len(b), :, off:length] = b.values[layer][:, :, : b.length]
                row += len(b)
            keys.append(k)
            values.append(v)
        mask = torch.zeros(n, cap, dtype=torch.bool, device=ref.mask.device)
        row = 0
        for b in batches:
            mask[row : row + len(b), length - b.length : length] = b.mask[:, : b.length]
            row += len(b)
        next_pos = torch.cat([b.next_pos for b in batches])
        rows = [r for b in batches for r in b.rows]
        return KVBatch(rows, keys, values, mask, next_pos, length)


def _grow(buf: torch.Tensor, capacity: int) -> torch.Tensor:
    """``[B, H, C, D]`` -> ``[B, H, capacity, D]``, keeping the first C columns."""
    out = buf.new_zeros((buf.shape[0], buf.shape[1], capacity, buf.shape[3]))
    out[:, :, : buf.shape[2]] = buf
    return out


def _take(buf: torch.Tensor, idx: torch.Tensor, first: int, length: int, capacity: int) -> torch.Tensor:
    """Rows ``idx`` and columns ``first:length`` of ``[B, H, C, D]`` into a new ``[b, H, capacity, D]``."""
    out = buf.new_zeros((len(idx), buf.shape[1], capacity, buf.shape[3]))
    out[:, :, : length - first] = buf[idx, :, first:length]
    return out


def _repeat(buf: torch.Tensor, n: int, length: int, capacity: int) -> torch.Tensor:
    """``[1, H, C, D]`` -> ``[n, H, capacity, D]`` with the first ``length`` columns copied to every row."""
    out = buf.new_zeros((n, buf.shape[1], capacity, buf.shape[3]))
    out[:, :, :length] = buf[:, :, :length]
    return out
