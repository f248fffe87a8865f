"""How good a self-evaluation is: discrimination (AUROC), calibration (Brier, ECE), reliability bins.

Pure functions on plain sequences of floats, no torch. A *score* is a predicted
probability (P(win or tie)); a *target* is what it predicts, either a 0/1
outcome (the response is correct) or a soft one (the empirical win-or-tie rate
of the response among the other samples of its prompt).

Example:
    >>> from langchain_capeval.training.metrics import auroc, brier_score, expected_calibration_error
    >>> auroc([0.9, 0.8, 0.3, 0.1], [1, 0, 1, 0])
    0.75
    >>> brier_score([1.0, 0.5], [1, 0])
    0.125
    >>> expected_calibration_error([0.25, 0.25, 0.75, 0.75], [0, 1, 1, 1], bins=2)
    0.25

"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass


def _pairs(scores: Sequence[float], targets: Sequence[float]) -> list[tuple[float, float]]:
    """Zip scores and targets, checking that they align and are finite."""
    if len(scores) != len(targets):
        raise ValueError(f"got {len(scores)} scores but {len(targets)} targets; pass one target per score")
    out = [(float(s), float(t)) for s, t in zip(scores, targets, strict=True)]
    if not all(math.isfinite(s) and math.isfinite(t) for s, t in out):
        raise ValueError("scores and targets must be finite numbers")
    return out


def auroc(scores: Sequence[float], labels: Sequence[float | bool]) -> float | None:
    """Area under the ROC curve of ``scores`` for binary ``labels`` (ties in score count half).

    It is the probability that a random positive scores above a random negative.

    Returns:
        The AUROC, or ``None`` when only one class is present (it is undefined).

    Example:
        >>> auroc([0.2, 0.2, 0.7], [0, 1, 1])
        0.75
        >>> auroc([0.1, 0.2], [1, 1]) is None
        True

    """
    pairs = _pairs(scores, [float(x) for x in labels])
    if any(t not in (0.0, 1.0) for _, t in pairs):
        raise ValueError("auroc needs binary labels (0/1 or bool)")
    pos = sorted(s for s, t in pairs if t == 1.0)
    neg = sorted(s for s, t in pairs if t == 0.0)
    if not pos or not neg:
        return None
    # Mann-Whitney U by merging the two sorted lists: O(n log n).
    wins = 0.0
    lo = hi = 0  # neg[:lo] < s, neg[:hi] <= s
    for s in pos:
        while lo < len(neg) and neg[lo] < s:
            lo += 1
        hi = max(hi, lo)
        while hi < len(neg) and neg[hi] <= s:
            hi += 1
        wins += lo + 0.5 * (hi - lo)
    return wins / (len(pos) * len(neg))


def auroc_interval(
    scores: Sequence[float],
    labels: Sequence[float | bool],
    groups: Sequence[str],
    *,
    draws: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float] | None:
    """Bootstrap interval of :func:`auroc`, resampling whole groups (a prompt's samples move together).

    Samples of one prompt are not independent (they share its difficulty), so the interval draws
    ``len(set(groups))`` groups with replacement, ``draws`` times (seeded), and takes the
    percentiles of the AUROCs; draws with one class only are skipped.

    Returns:
        ``(low, high)``, or ``None`` when no draw has both classes.

    Raises:
        ValueError: Misaligned scores, labels and groups, non-binary labels, or a level outside (0, 1).

    Example:
        >>> scores, labels = [0.9, 0.4, 0.6, 0.3, 0.8, 0.5], [1, 0, 1, 0, 0, 1]
        >>> auroc(scores, labels)
        0.7777777777777778
        >>> auroc_interval(scores, labels, ["a", "a", "b", "b", "c", "c"], draws=200)
        (0.3333333333333333, 1.0)

    """
    if not 0.0 < level < 1.0 or draws < 1:
        raise ValueError(f"need 0 < level < 1 and draws >= 1, got level={level}, draws={draws}")
    pairs = _pairs(scores, [float(x) for x in labels])
    if len(groups) != len(pairs):
        raise ValueError(f"got {len(pairs)} scores but {len(groups)} groups; pass one group per score")
    members: dict[str, list[int]] = {}
    for n, g in enumerate(groups):
        members.setdefault(g, []).append(n)
    ids = list(members)
    rng = random.Random(seed)
    found = []
    for _ in range(draws):
        pick = [n for g in (rng.choice(ids) for _ in ids) for n in members[g]]
        a = auroc([pairs[n][0] for n in pick], [pairs[n][1] for n in pick])
        if a is not None:
            found.append(a)
    if not found:
        return None
    found.sort()
    tail = round((1.0 - level) / 2, 12)  # 0.025, not 0.025000000000000022
    return found[int(tail * len(found))], found[int((1.0 - tail) * len(found)) - 1]


def brier_score(scores: Sequence[float], targets: Sequence[float | bool]) -> float:
    """Mean squared error between predicted probabilities and (soft or 0/1) targets.

    Example:
        >>> brier_score([0.8, 0.2], [1.0, 0.5])
        0.065

    """
    pairs = _pairs(scores, [float(x) for x in targets])
    if not pairs:
        raise ValueError("brier_score needs at least one score")
    return round(sum((s - t) ** 2 for s, t in pairs) / len(pairs), 15)


@dataclass(frozen=True)
class ReliabilityBin:
    """One bin of a reliability diagram.

    Attributes:
        lower: Lower edge of the bin (inclusive).
        upper: Upper edge (exclusive, except for the last bin).
        count: Predictions in the bin.
        mean_score: Mean predicted probability in the bin (``nan`` if empty).
        mean_target: Mean target in the bin (``nan`` if empty).

    """

    lower: float
    upper: float
    count: int
    mean_score: float
    mean_target: float


def reliability_bins(scores: Sequence[float], targets: Sequence[float | bool], bins: int = 10) -> list[ReliabilityBin]:
    """Group predictions into ``bins`` equal-width bins on [0, 1]; the data of a reliability diagram.

    Example:
        >>> [(b.count, b.mean_score, b.mean_target) for b in reliability_bins([0.1, 0.3, 0.9], [0, 1, 1], bins=2)]
        [(2, 0.2, 0.5), (1, 0.9, 1.0)]

    """
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    pairs = _pairs(scores, [float(x) for x in targets])
    members: list[list[tuple[float, float]]] = [[] for _ in range(bins)]
    for s, t in pairs:
        members[min(int(s * bins), bins - 1) if s > 0 else 0].append((s, t))
    out = []
    for i, m in enumerate(members):
        n = len(m)
        mean_s = sum(s for s, _ in m) / n if n else math.nan
        mean_t = sum(t for _, t in m) / n if n else math.nan
        out.append(ReliabilityBin(i / bins, (i + 1) / bins, n, round(mean_s, 12), round(mean_t, 12)))
    return out


def expected_calibration_error(scores: Sequence[float], targets: Sequence[float | bool], bins: int = 10) -> float:
    """Return the expected calibration error: the count-weighted mean |mean score - mean target| over equal-width bins.

    Example:
        >>> expected_calibration_error([0.9, 0.9], [1, 1], bins=10)
        0.1

    """
    table = reliability_bins(scores, targets, bins)
    total = sum(b.count for b in table)
    if total == 0:
        raise ValueError("expected_calibration_error needs at least one score")
    return round(sum(b.count * abs(b.mean_score - b.mean_target) for b in table if b.count) / total, 12)
