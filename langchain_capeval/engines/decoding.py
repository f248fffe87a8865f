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
    cum = probs.cumsum(dim=-1)
    pick = torch.searchsorted(cum, (uniform * cum[:, -1])[:, None], right=True).clamp_max(cum.shape[1] - 1)
    sampled = pick.squeeze(1)
    nucleus = top_p < 1
    if bool(nucleus.any()):
        sorted_p, order = probs[nucleus].sort(dim=-1, descending=True, stable=True)
        cum = sorted_p.cumsum(dim=-1)
        sorted_p = sorted_p.masked_fill(cum - sorted_p >= top_p[nucleus, None], 0.0)
        cum = sorted_p.cumsum(dim=-1)
        u = uniform[nucleus] * cum[:, -1]
        pick = torch.searchsorted(cum, u[:, None], right=True).clamp_max(cum.shape[1] - 1)
        sampled = sampled.masked_scatter(nucleus, order.gather(1, pick).squeeze(1))
    return torch.where(greedy, out, sampled)


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
