"""Plain sampling for ``/v1/completions``: one engine row per request, streamed token by token.

This is the endpoint a remote client engine needs: generation as one stream per row,
and self-evaluation as a one-token completion with top-k logprobs. Logprobs are the
model's raw next-token log-probabilities (before temperature and top-p, as vLLM's
default), computed by one forward pass over the prompt and the tokens generated so far;
only a local transformers engine can compute them (:func:`scorer_for`).

Example:
    >>> params = SamplingParams(max_new_tokens=8)
    >>> run = CompletionRun(view, prompt_ids, params, logprobs=5, scorer=scorer)  # doctest: +SKIP
    >>> run.start()  # submit the row: prompt errors surface here, before any response is sent  # doctest: +SKIP
    >>> step = run.finish()  # or: for step in run.steps(): ...  # doctest: +SKIP

"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from langchain_capeval.engines.base import Engine, RowId, Sample
from langchain_capeval.sampling import SamplingParams

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class TokenLogprobs:
    """One generated token's log-probability and the top alternatives at its position."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]
    """``(token id, logprob)`` pairs, most likely first."""


class LogprobScorer(Protocol):
    """Computes next-token logprobs over a token sequence."""

    def score(self, ids: Sequence[int], start: int, k: int) -> list[TokenLogprobs]:
        """Logprobs of ``ids[start:]``, each given the tokens before it, with the top ``k`` alternatives."""
        ...


def top_logprobs(
    logits: torch.Tensor, targets: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-softmax of ``logits`` [T, V]; returns the targets' logprobs [T], top-k logprobs [T, k] and ids [T, k]."""
    import torch

    with torch.inference_mode():
        logp = torch.log_softmax(logits.double(), dim=-1)
        chosen = logp.gather(1, targets[:, None]).squeeze(1)
        values, ids = logp.topk(k, dim=-1) if k > 0 else (logp[:, :0], targets[:, None][:, :0])
        return chosen, values, ids


class TransformersScorer:
    """A :class:`LogprobScorer` over a Hugging Face causal LM: one forward pass without a cache."""

    def __init__(self, model: Any) -> None:
        self.model = model

    def score(self, ids: Sequence[int], start: int, k: int) -> list[TokenLogprobs]:
        """Logprobs of ``ids[start:]`` (``start >= 1``) with the top ``k`` alternatives at each position."""
        import torch

        device = next(self.model.parameters()).device
        with torch.inference_mode():
            x = torch.tensor([list(ids[:-1])], device=device)
            logits = self.model(input_ids=x, use_cache=False).logits[0, start - 1 :]
            targets = torch.tensor(list(ids[start:]), device=device)
            chosen, values, top = top_logprobs(logits, targets, k)
        return [
            TokenLogprobs(int(t), float(c), [(int(i), float(v)) for i, v in zip(ti.tolist(), tv.tolist(), strict=True)])
            for t, c, ti, tv in zip(targets.tolist(), chosen.tolist(), top, values, strict=True)
        ]


def scorer_for(engine: Engine) -> LogprobScorer | None:
    """A logprob scorer for ``engine`` if it runs a local torch model (the transformers engine), else ``None``."""
    model = getattr(engine, "model", None)
    if model is None:
        return None
    import torch

    return TransformersScorer(model) if isinstance(model, torch.nn.Module) else None


@dataclass
class CompletionStep:
    """What one step of a completion adds (or, from :meth:`CompletionRun.finish`, the whole completion)."""

    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    finish_reason: str | None = None
    """``"stop"`` (end of turn or a stop string) or ``"length"``; ``None`` while generating."""
    stop_reason: str | None = None
    """The stop string that ended the completion, if one did (vLLM's field)."""


class CompletionRun:
    """One ``/v1/completions`` request: a single engine row, generated to the end or step by step.

    Args:
        engine: The engine (in the server, the request's cancellable view of it).
        prompt_ids: The prompt.
        params: How the row is decoded.
        logprobs: Top alternatives per token to return, or ``None`` for no logprobs.
        scorer: Computes the logprobs; required when ``logprobs`` is not ``None``.

    """

    def __init__(
        self,
        engine: Engine,
        prompt_ids: list[int],
        params: SamplingParams,
        *,
        logprobs: int | None = None,
        scorer: LogprobScorer | None = None,
    ) -> None:
        if logprobs is not None and scorer is None:
            raise ValueError("logprobs: a scorer is required to return logprobs")
        self.engine = engine
        self.prompt_ids = prompt_ids
        self.params = params
        self.logprobs = logprobs
        self.scorer = scorer
        self.row: RowId | None = None
        self.sample: Sample | None = None
        self._sent_tokens = 0
        self._sent_text = ""
        self._holdback = max((len(s) for s in params.stop), default=1) - 1

    def start(self) -> None:
        """Submit the row (the engine samples its first token)."""
        self.row = self.engine.submit(self.prompt_ids, [self.params])[0]
        self.sample = self.engine.sample(self.row)

    def finish(self) -> CompletionStep:
        """Generate to the end; return the whole completion."""
        assert self.row is not None, "call start() first"
        self.sample = self.engine.generate([self.row])[0]
        return self._step(self.sample)

    def steps(self) -> Iterator[CompletionStep]:
        """Generate token by token; yield each token's step (text held back while it may start a stop string)."""
        assert self.row is not None and self.sample is not None, "call start() first"
        while True:
            step = self._step(self.sample)
            if step.token_ids or step.text or step.finish_reason:
                yield step
            if step.finish_reason is not None:
                return
            self.sample = self.engine.generate([self.row], until=self.sample.num_tokens + 1)[0]

    @property
    def num_tokens(self) -> int:
        """Tokens generated so far."""
        return self.sample.num_tokens if self.sample is not None else 0

    def usage(self) -> dict[str, int]:
        """OpenAI ``usage`` of the completion so far."""
        prompt, generated = len(self.prompt_ids), self.num_tokens
        return {"prompt_tokens": prompt, "completion_tokens": generated, "total_tokens": prompt + generated}

    def _step(self, s: Sample) -> CompletionStep:
        new_ids = s.token_ids[self._sent_tokens :]
        logprobs = self._score(s.token_ids, self._sent_tokens) if new_ids and self.logprobs is not None else []
        self._sent_tokens = len(s.token_ids)
        visible = s.text if s.finished else _stable_prefix(s.text, self._holdback)
        delta = visible[len(self._sent_text) :] if visible.startswith(self._sent_text) else ""
        self._sent_text += delta
        if not s.finished:
            return CompletionStep(new_ids, delta, logprobs)
        return CompletionStep(
            new_ids,
            delta,
            logprobs,
            finish_reason="length" if s.finish_reason == "length" else "stop",
            stop_reason=self._matched_stop(s) if s.finish_reason == "stop" else None,
        )

    def _score(self, token_ids: list[int], start: int) -> list[TokenLogprobs]:
        assert self.scorer is not None and self.logprobs is not None
        ids = [*self.prompt_ids, *token_ids]
        return self.scorer.score(ids, len(self.prompt_ids) + start, self.logprobs)

    def _matched_stop(self, s: Sample) -> str | None:
        full = self.engine.chat_format.decode(s.token_ids)
        return next((stop for stop in self.params.stop if full.startswith(stop, len(s.text))), None)


def _stable_prefix(text: str, holdback: int) -> str:
    """Text safe to send mid-generation.

    That is without the last ``holdback`` characters (a stop string may be starting there)
    and without a trailing incomplete UTF-8 character.

    Example:
        >>> _stable_prefix("Hello wor", 2), _stable_prefix("caf\ufffd", 0)
        ('Hello w', 'caf')

    """
    if holdback:
        text = text[: max(len(text) - holdback, 0)]
    return text.rstrip("\ufffd")


def token_string(tokenizer: PreTrainedTokenizerBase, token_id: int, *, as_id: bool) -> str:
    """A token as logprobs show it: its decoded text, or ``"token_id:{id}"`` (vLLM's extension)."""
    return f"token_id:{token_id}" if as_id else str(tokenizer.decode([token_id]))


def logprobs_json(
    entries: list[TokenLogprobs], tokenizer: PreTrainedTokenizerBase, *, as_ids: bool, offset: int = 0
) -> dict[str, Any]:
    """Legacy completions ``logprobs``: ``tokens``, ``token_logprobs``, ``top_logprobs``, ``text_offset``."""
    tokens, token_logprobs, tops, offsets = [], [], [], []
    for e in entries:
        token = token_string(tokenizer, e.token_id, as_id=as_ids)
        top: dict[str, float] = {}
        for tid, lp in e.top:
            top.setdefault(token_string(tokenizer, tid, as_id=as_ids), lp)
        top.setdefault(token, e.logprob)  # the sampled token is always listed, as in vLLM
        tokens.append(token)
        token_logprobs.append(e.logprob)
        tops.append(top)
        offsets.append(offset)
        offset += 0 if as_ids else len(token)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": tops, "text_offset": offsets}


def prompt_token_ids(
    tokenizer: PreTrainedTokenizerBase, prompt: str | list[int], *, add_special_tokens: bool
) -> list[int]:
    """The prompt as token ids: text is tokenized (with the tokenizer's special tokens if asked), ids pass through."""
    if isinstance(prompt, str):
        return list(tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"])
    return [int(t) for t in prompt]


def completion_choice(
    step: CompletionStep,
    tokenizer: PreTrainedTokenizerBase,
    *,
    logprobs: bool,
    tokens_as_ids: bool = False,
    token_ids: bool = False,
    prompt_ids: list[int] | None = None,
    offset: int = 0,
) -> dict[str, Any]:
    """A ``text_completion`` choice (or streamed delta) for ``step``, with vLLM's ``stop_reason`` and token ids."""
    out: dict[str, Any] = {
        "index": 0,
        "text": step.text,
        "logprobs": logprobs_json(step.logprobs, tokenizer, as_ids=tokens_as_ids, offset=offset) if logprobs else None,
        "finish_reason": step.finish_reason,
        "stop_reason": step.stop_reason,
    }
    if token_ids:
        out["token_ids"] = step.token_ids
        if prompt_ids is not None:
            out["prompt_token_ids"] = prompt_ids
    return out
