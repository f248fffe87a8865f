"""Per-sample decoding settings, validated at construction.

One :class:`SamplingParams` describes how one engine row is decoded, in the
manner of vLLM's ``SamplingParams``: a batch may mix rows with different
temperatures, which is how a single batch follows an annealing schedule.

Example:
    >>> from langchain_capeval.sampling import SamplingParams
    >>> p = SamplingParams(temperature=0.7, top_p=0.95, max_new_tokens=64, seed=1)
    >>> p.with_temperature(1.0).temperature
    1.0
    >>> SamplingParams(top_p=0)
    Traceback (most recent call last):
    ...
    langchain_capeval.errors.InvalidSamplingError: top_p must be in (0, 1], got 0

"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from langchain_capeval.errors import InvalidSamplingError


@dataclass(frozen=True)
class SamplingParams:
    """How one row is decoded.

    Attributes:
        temperature: Softmax temperature; 0 means greedy decoding.
        top_p: Nucleus sampling mass in (0, 1]; 1 disables it.
        max_new_tokens: Most tokens this row may generate.
        stop: Strings that end the row when they appear in its text; the returned
            text is cut before the first one.
        seed: Seed of the row's own random stream. Rows with the same seed,
            prompt and settings produce the same tokens whatever else shares
            their batch.

    """

    temperature: float = 0.7
    top_p: float = 1.0
    max_new_tokens: int = 256
    stop: tuple[str, ...] = field(default_factory=tuple)
    seed: int = 0

    def __post_init__(self) -> None:
        t = self.temperature
        if not isinstance(t, int | float) or isinstance(t, bool) or not math.isfinite(t) or t < 0:
            raise InvalidSamplingError(f"temperature must be a finite number >= 0, got {t!r}")
        p = self.top_p
        if not isinstance(p, int | float) or isinstance(p, bool) or not (0 < p <= 1):
            raise InvalidSamplingError(f"top_p must be in (0, 1], got {p!r}")
        n = self.max_new_tokens
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise InvalidSamplingError(f"max_new_tokens must be an integer >= 1, got {n!r}")
        if isinstance(self.stop, str) or not isinstance(self.stop, Sequence):
            raise InvalidSamplingError(f"stop must be a sequence of strings, got {self.stop!r}")
        stop = tuple(self.stop)
        if not all(isinstance(s, str) and s for s in stop):
            raise InvalidSamplingError(f"stop must hold non-empty strings, got {stop!r}")
        object.__setattr__(self, "stop", stop)
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise InvalidSamplingError(f"seed must be an integer >= 0, got {self.seed!r}")

    def with_temperature(self, temperature: float) -> SamplingParams:
        """Return a copy at another temperature (one step of an annealing schedule)."""
        return dataclasses.replace(self, temperature=temperature)

    def with_seed(self, seed: int) -> SamplingParams:
        """Return a copy with another seed."""
        return dataclasses.replace(self, seed=seed)
