"""Training sequences for the self-evaluation token, tokenized exactly as the engine evaluates.

At inference the engine scores a response of ``k`` generated tokens on top of its KV
cache with the sequence::

    prompt_ids + response_ids[:k] + chat_format.suffix_after(response_ids[:k])

and reads the next token: "No" (it would not do better by starting over) or "Yes".
A finished response keeps its final end-of-turn token, and ``suffix_after`` then skips
the suffix's own. A training example is that same sequence with the soft target
``{"No": p, "Yes": 1 - p}``, where ``p`` is the sample's win-or-tie target (a
truncated prefix inherits its completion's).

One sample is evaluated at several lengths (the full response and a few prefixes).
:func:`pack_sample` puts them all in one *tree-packed* sequence: the trunk
(prompt + full response) once, then one branch per evaluated length holding the
self-evaluation turn, each branch attending only to the trunk's first
``len(prompt) + k`` tokens and to itself, with the position ids it would have on its
own. The logits at a branch's last token are those of the separate sequence above,
and the trunk also yields the response-token logits that the SFT/KL regularizer needs.

Example:
    >>> from langchain_capeval.training.examples import pack_sample
    >>> packed = pack_sample([5, 6], [7, 8, 2], [2, 9, 10], lengths=[3, 1], targets=[1.0, 1.0], eos_ids={2})
    >>> packed.input_ids  # trunk, then the full branch (suffix without its end-of-turn), then the 1-token prefix's
    [5, 6, 7, 8, 2, 9, 10, 2, 9, 10]
    >>> packed.position_ids
    [0, 1, 2, 3, 4, 5, 6, 3, 4, 5]
    >>> packed.answer_positions, packed.response_span
    ([6, 9], (2, 5))

"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

import torch

TRUNK = 0
"""Branch id of the trunk (prompt + response); branches are numbered from 1; padding is -1."""


@dataclass(frozen=True)
class PackedSample:
    """One on-policy sample as a tree-packed training sequence.

    Attributes:
        input_ids: Trunk tokens (prompt + response), then each branch's self-evaluation turn.
        position_ids: Each token's position in its own (unpacked) sequence.
        branch: Per token, :data:`TRUNK` or the branch number (1-based).
        cut: Per branch (index ``b - 1``), how many trunk tokens it sees (``len(prompt) + k``).
        answer_positions: Per branch, the index of its last token, whose logits predict the answer.
        targets: Per branch, P("No") to train: the win-or-tie target.
        num_tokens: Per branch, the response tokens it sees (``k``).
        response_span: ``(start, end)`` trunk indices of the response tokens: the logits at ``i - 1``
            predict token ``i`` for ``start <= i < end``.

    """

    input_ids: list[int]
    position_ids: list[int]
    branch: list[int]
    cut: list[int]
    answer_positions: list[int]
    targets: list[float]
    num_tokens: list[int]
    response_span: tuple[int, int]

    def __len__(self) -> int:
        return len(self.input_ids)


def suffix_after(response_ids: Sequence[int], suffix: Sequence[int], eos_ids: Collection[int]) -> list[int]:
    """Return the self-evaluation turn after a (possibly truncated) response, as ``ChatFormat.suffix_after`` does.

    Example:
        >>> suffix_after([7, 2], [2, 9], eos_ids={2}), suffix_after([7], [2, 9], eos_ids={2})
        ([9], [2, 9])

    """
    if response_ids and response_ids[-1] == suffix[0] and suffix[0] in eos_ids:
        return list(suffix[1:])
    return list(suffix)


def self_evaluation_sequence(
    prompt_ids: Sequence[int],
    response_ids: Sequence[int],
    num_tokens: int,
    suffix: Sequence[int],
    eos_ids: Collection[int],
) -> list[int]:
    """Return the token ids the engine pushes to self-evaluate the response's first ``num_tokens`` tokens.

    Example:
        >>> self_evaluation_sequence([5], [7, 8, 2], 2, [2, 9], eos_ids={2})
        [5, 7, 8, 2, 9]

    """
    head = list(response_ids[:num_tokens])
    return [*prompt_ids, *head, *suffix_after(head, suffix, eos_ids)]


def pack_sample(
    prompt_ids: Sequence[int],
    response_ids: Sequence[int],
    suffix: Sequence[int],
    lengths: Sequence[int],
    targets: Sequence[float],
    eos_ids: Collection[int],
) -> PackedSample:
    """Tree-pack one sample evaluated at several response lengths.

    Args:
        prompt_ids: The rendered prompt (``ChatFormat.encode``).
        response_ids: The sampled response tokens (with the final EOS when it ended so).
        suffix: ``ChatFormat.self_evaluation_suffix``.
        lengths: Response tokens seen by each branch, each in ``[1, len(response_ids)]``.
        targets: P("No") target of each branch.
        eos_ids: Tokens that end the assistant's turn.

    Raises:
        ValueError: Empty prompt or response, a length out of range, or misaligned targets.

    """
    if not prompt_ids or not response_ids:
        raise ValueError("prompt_ids and response_ids must be non-empty")
    if len(lengths) != len(targets) or not lengths:
        raise ValueError(f"give one target per length, got {len(lengths)} lengths and {len(targets)} targets")
    n_prompt, n_resp = len(prompt_ids), len(response_ids)
    ids = [*prompt_ids, *response_ids]
    pos = list(range(len(ids)))
    branch = [TRUNK] * len(ids)
    cut, answers = [], []
    for b, k in enumerate(lengths, start=1):
        if not 1 <= k <= n_resp:
            raise ValueError(f"length {k} out of range [1, {n_resp}]")
        turn = suffix_after(response_ids[:k], suffix, eos_ids)
        ids.extend(turn)
        pos.extend(range(n_prompt + k, n_prompt + k + len(turn)))
        branch.extend([b] * len(turn))
        cut.append(n_prompt + k)
        answers.append(len(ids) - 1)
    return PackedSample(
        input_ids=ids,
        position_ids=pos,
        branch=branch,
        cut=cut,
        answer_positions=answers,
        targets=[float(t) for t in targets],
        num_tokens=list(lengths),
        response_span=(n_prompt, n_prompt + n_resp),
    )


def unpack_sample(
    prompt_ids: Sequence[int],
    response_ids: Sequence[int],
    suffix: Sequence[int],
    lengths: Sequence[int],
    targets: Sequence[float],
    eos_ids: Collection[int],
) -> list[PackedSample]:
    """Build the examples of :func:`pack_sample` as one plain sequence per length (no tree mask needed).

    The first holds the full response trunk (so the regularizer sees every response token once);
    the others are ``prompt + prefix + turn`` with an empty response span.
    """
    out: list[PackedSample] = []
    for i, (k, p) in enumerate(zip(lengths, targets, strict=True)):
        if i == 0 and k == len(response_ids):
            out.append(pack_sample(prompt_ids, response_ids, suffix, [k], [p], eos_ids))
            continue
        seq = self_evaluation_sequence(prompt_ids, response_ids, k, suffix, eos_ids)
        n = len(seq)
        span = len(prompt_ids) + k
        out.append(PackedSample(seq, list(range(n)), [TRUNK] * n, [n], [n - 1], [float(p)], [k], (span, span)))
    return out


@dataclass(frozen=True)
class ChunkExample:
    """One evaluated length of a sample, for an adapter scoped to the self-evaluation chunk.

    The engine runs such an adapter (``capeval_adapter.json``: ``"scope": "self_evaluation"``)
    on the chunk only: the pending last token of the (possibly truncated) response and the
    self-evaluation turn, over the KV cache the base weights wrote for everything before it.
    Training runs the trunk through the base weights (no gradient) and the chunk through the
    adapter, the same split.

    Attributes:
        trunk: The prompt and the first ``k - 1`` response tokens (the base weights' cache).
        chunk: Response token ``k`` and the self-evaluation turn after it; the answer is read at its end.
        target: P("No") to train: the win-or-tie target of the sample.

    Example:
        >>> ex = ChunkExample.of([5, 6], [7, 8, 2], 3, [2, 9, 10], target=0.5, eos_ids={2})
        >>> ex.trunk, ex.chunk, len(ex)
        ([5, 6, 7, 8], [2, 9, 10], 7)
        >>> ChunkExample.of([5, 6], [7, 8, 2], 1, [2, 9, 10], target=0.5, eos_ids={2}).chunk
        [7, 2, 9, 10]

    """

    trunk: list[int]
    chunk: list[int]
    target: float

    def __len__(self) -> int:
        return len(self.trunk) + len(self.chunk)

    @classmethod
    def of(
        cls,
        prompt_ids: Sequence[int],
        response_ids: Sequence[int],
        num_tokens: int,
        suffix: Sequence[int],
        target: float,
        eos_ids: Collection[int],
    ) -> ChunkExample:
        """The example that self-evaluates the response's first ``num_tokens`` tokens (at least one)."""
        if num_tokens < 1:
            raise ValueError(
                f"num_tokens must be >= 1 (the chunk starts with the last response token), got {num_tokens}"
            )
        seq = self_evaluation_sequence(prompt_ids, response_ids, num_tokens, suffix, eos_ids)
        cut = len(prompt_ids) + num_tokens - 1
        return cls(seq[:cut], seq[cut:], float(target))


@dataclass
class Batch:
    """Padded tensors of several packed samples.

    Attributes:
        input_ids: ``[B, L]`` token ids (padding 0).
        position_ids: ``[B, L]``.
        attention_mask: ``[B, 1, L, L]`` boolean tree mask (True = attend).
        answer_index: ``[A]`` flat indices (into ``B * L``) of the answer positions.
        targets: ``[A]`` P("No") targets.
        response_index: ``[R]`` flat indices of the positions whose logits predict a response token.
        response_labels: ``[R]`` the response tokens they predict.

    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor
    answer_index: torch.Tensor
    targets: torch.Tensor
    response_index: torch.Tensor
    response_labels: torch.Tensor

    @property
    def num_tokens(self) -> int:
        """Padded tokens in the batch."""
        return int(self.input_ids.numel())


def tree_attention_mask(branch: torch.Tensor, cut: torch.Tensor) -> torch.Tensor:
    """Boolean tree mask of one packed sequence.

    Args:
        branch: ``[L]`` branch id per token (:data:`TRUNK`, ``1..n``, or -1 for padding).
        cut: ``[n + 1]`` trunk tokens seen per branch id (index 0, the trunk, is unused).

    Returns:
        ``[L, L]``: query ``i`` attends to key ``j <= i`` when both are on the trunk, or ``j`` is on the
        trunk before ``i``'s cut, or both are on the same branch; padding attends only to itself.

    Example:
        >>> tree_attention_mask(torch.tensor([0, 0, 1, 2]), torch.tensor([0, 1, 2])).int().tolist()
        [[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 0, 1]]

    """
    n = branch.shape[0]
    idx = torch.arange(n)
    causal = idx[None, :] <= idx[:, None]
    q, k = branch[:, None], branch[None, :]
    trunk_key = k == TRUNK
    q_cut = torch.where(q > TRUNK, cut[q.clamp_min(0)], torch.full_like(q, n))
    sees_trunk = trunk_key & (q >= TRUNK) & (idx[None, :] < q_cut)
    same_branch = (q == k) & (q > TRUNK)
    mask = causal & (sees_trunk | same_branch)
    return mask | torch.eye(n, dtype=torch.bool)


def collate(samples: Sequence[PackedSample]) -> Batch:
    """Right-pad packed samples into one :class:`Batch`."""
    width = max(len(s) for s in samples)
    b = len(samples)
    ids = torch.zeros(b, width, dtype=torch.long)
    pos = torch.zeros(b, width, dtype=torch.long)
    mask = torch.zeros(b, 1, width, width, dtype=torch.bool)
    answer_index: list[int] = []
    targets: list[float] = []
    response_index: list[int] = []
    labels: list[int] = []
    for i, s in enumerate(samples):
        n = len(s)
        ids[i, :n] = torch.tensor(s.input_ids)
        pos[i, :n] = torch.tensor(s.position_ids)
        pos[i, n:] = torch.arange(width - n)
        branch = torch.full((width,), -1, dtype=torch.long)
        branch[:n] = torch.tensor(s.branch)
        mask[i, 0] = tree_attention_mask(branch, torch.tensor([0, *s.cut]))
        answer_index.extend(i * width + a for a in s.answer_positions)
        targets.extend(s.targets)
        start, end = s.response_span
        response_index.extend(i * width + t - 1 for t in range(start, end))
        labels.extend(s.input_ids[start:end])
    return Batch(
        input_ids=ids,
        position_ids=pos,
        attention_mask=mask,
        answer_index=torch.tensor(answer_index, dtype=torch.long),
        targets=torch.tensor(targets, dtype=torch.float32),
        response_index=torch.tensor(response_index, dtype=torch.long),
        response_labels=torch.tensor(labels, dtype=torch.long),
    )
