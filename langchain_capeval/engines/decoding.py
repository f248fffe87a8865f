"""Pure tensor functions of decoding: sampling the next token and reading a self-evaluation.

Sampling is by inverse CDF on one uniform draw per row, taken from the row's own
seeded generator, so a row's tokens do not depend on which other rows share its
batch: dropping a row leaves the others' outputs unchanged.

Example:
    >>> import torch
    >>> logits = torch.tensor([[0.0, 5.0, 0.0], [3.0, 0.0, 0.0]])
    >>> sample_next_tokens(logits, torch.tensor([0.0, 1.0]), torch.tensor([1.0, 0.5]), torch.tensor([0.9, 0.99]))
    tensor([1, 0])

"""

from __future__ import annotations

import torch


@torch.inference_mode()
def sample_next_tokens(
    logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, uniform: torch.Tensor
) -> torch.Tensor:
    """Sample one token per row.

    Args:
        logits: ``[B, V]`` next-token logits.
        temperature: ``[B]``; 0 means greedy.
        top_p: ``[B]`` nucleus mass in (0, 1].
        uniform: ``[B]`` draws in [0, 1) from each row's generator.

    Returns:
        ``[B]`` token ids.

    """
    logits = logits.float()
    greedy = temperature <= 0
    out = logits.argmax(dim=-1)
    if bool(greedy.all()):
        return out
    probs = torch.softmax(logits / temperature.clamp_min(1e-5)[:, None], dim=-1)
    # Each row's inverse CDF runs over its own token order: vocabulary order without top-p,
    # descending probability with it; so a row's token never depends on the other rows' top_p.
    nucleus = (top_p < 1) & ~greedy
    whole = ~nucleus & ~greedy
    if bool(whole.any()):
        cum = probs[whole].cumsum(dim=-1)
        pick = torch.searchsorted(cum, (uniform[whole] * cum[:, -1])[:, None], right=True)
        out[whole] = pick.clamp_max(cum.shape[1] - 1).squeeze(1)
    if bool(nucleus.any()):
        out[nucleus] = _sample_nucleus(probs[nucleus], top_p[nucleus], uniform[nucleus])
    return out


NUCLEUS_CANDIDATES = 256
"""Tokens the nucleus is first looked for among; a row whose nucleus is not inside them is fully sorted."""


def _sample_nucleus(probs: torch.Tensor, top_p: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Inverse CDF over each row's nucleus, in descending probability (ties by token id).

    Fully sorting a 49k vocabulary costs 2-4 ms a row on a CPU, more than the rest of a
    decode step's sampling together, while the nucleus rarely holds more than a few dozen
    tokens. So the rows are first sorted among their ``NUCLEUS_CANDIDATES`` most likely
    tokens; a row whose nucleus ends strictly above its smallest candidate has the same
    nucleus, in the same order, as the full sort would give it (no token left out can tie
    with a kept one), and only the other rows are fully sorted. Both paths give the same
    token for the same row, whatever else is in the batch.
    """
    k = min(NUCLEUS_CANDIDATES, probs.shape[-1])
    cand_p, cand_ids = probs.topk(k, dim=-1, sorted=False)
    cand_ids, by_id = cand_ids.sort(dim=-1)  # ties resolved by token id, as a stable full sort would
    cand_p = cand_p.gather(1, by_id)
    sorted_p, order = cand_p.sort(dim=-1, descending=True, stable=True)
    order = cand_ids.gather(1, order)
    kept = _nucleus_mask(sorted_p, top_p)
    last_kept = kept.sum(dim=1) - 1
    covered = ~kept[:, -1] & (sorted_p.gather(1, last_kept[:, None]).squeeze(1) > sorted_p[:, -1])
    tokens = torch.empty(len(probs), dtype=torch.long, device=probs.device)
    if bool(covered.any()):
        tokens[covered] = _inverse_cdf(sorted_p[covered], order[covered], kept[covered], uniform[covered])
    if not bool(covered.all()):
        rest = ~covered
        sorted_p, order = probs[rest].sort(dim=-1, descending=True, stable=True)
        kept = _nucleus_mask(sorted_p, top_p[rest])
        tokens[rest] = _inverse_cdf(sorted_p, order, kept, uniform[rest])
    return tokens


def _nucleus_mask(sorted_p: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Which of the descending probabilities the nucleus keeps: those with less than ``top_p`` before them.

    The most likely token is always kept, also when ``top_p`` rounds to 0 in float32 (5e-324, say).
    """
    kept = sorted_p.cumsum(dim=-1) - sorted_p < top_p[:, None]
    kept[:, 0] = True
    return kept


def _inverse_cdf(
    sorted_p: torch.Tensor, order: torch.Tensor, kept: torch.Tensor, uniform: torch.Tensor
) -> torch.Tensor:
    """The token at ``uniform`` of each row's kept mass (``kept`` is a prefix of the descending order)."""
    cum = sorted_p.masked_fill(~kept, 0.0).cumsum(dim=-1)
    pick = torch.searchsorted(cum, (uniform * cum[:, -1])[:, None], right=True)
    pick = torch.minimum(pick, kept.sum(dim=1, keepdim=True) - 1)  # u * mass rounding up to mass stays inside
    return order.gather(1, pick).squeeze(1)


@torch.inference_mode()
def answer_probabilities(logits: torch.Tensor, no_id: int, yes_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw P("No") and P("Yes") over the whole vocabulary.

    Args:
        logits: ``[B, V]`` logits after the self-evaluation turn.
        no_id: Token id of "No".
        yes_id: Token id of "Yes".

    Returns:
        Two ``[B]`` tensors (float64): P("No"), P("Yes").

    """
    logp = torch.log_softmax(logits.double(), dim=-1)
    return logp[:, no_id].exp(), logp[:, yes_id].exp()


def win_or_tie_probability(p_no: float, p_yes: float) -> float:
    """P("No") normalised over the two answers: P(a fresh sample would not beat this one).

    Example:
        >>> round(win_or_tie_probability(0.3, 0.1), 6)
        0.75

    """
    total = p_no + p_yes
    return p_no / total if total > 0 else 0.5
