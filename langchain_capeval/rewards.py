"""Reward sources: what says how good a response is, behind one interface.

The paper labels on-policy samples with an external reward model (ArmoRM) used
only to build preference data. A :class:`RewardSource` scores a batch of
(prompt, response) pairs; these sources share that interface:

- :class:`VerifiableReward`: 1.0 if the task's checker accepts the response, else 0.0;
  :class:`PartialCreditReward` grades the wrong ones below 0.5 by how near they are.
- :class:`CallableReward`: any Python function ``fn(prompt, response) -> float``.
- :class:`RewardModel`: a Hugging Face sequence-classification model from a local
  folder (ArmoRM or any ``AutoModelForSequenceClassification``), configured by
  :class:`RewardModelConfig`.

Rewards become preference targets in :mod:`langchain_capeval.preferences`.
torch and transformers are imported only when a :class:`RewardModel` is built.

Example:
    >>> from langchain_capeval.rewards import CallableReward, VerifiableReward
    >>> from langchain_capeval.tasks import Task
    >>> task = Task(id="add1/3+4", family="add1", prompt="What is 3 + 4?", answer="7")
    >>> VerifiableReward().score([task.prompt] * 2, ["3 + 4 = 7", "It is 8."], [task, task])
    [1.0, 0.0]
    >>> CallableReward(lambda prompt, response: -len(response)).score(["hi"], ["hello"])
    [-5.0]

"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from numbers import Real
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

from langchain_capeval.errors import InvalidRewardError, ModelNotInstalledError
from langchain_capeval.tasks.answers import check, partial_credit
from langchain_capeval.tasks.base import Task

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


@runtime_checkable
class RewardSource(Protocol):
    """Anything that scores a batch of responses; higher is better."""

    def score(
        self, prompts: Sequence[str], responses: Sequence[str], tasks: Sequence[Task | None] | None = None
    ) -> list[float]:
        """Return one finite reward per (prompt, response) pair.

        Args:
            prompts: The user prompts.
            responses: The responses, one per prompt.
            tasks: The task of each pair, for sources that check answers; others ignore it.

        """
        ...


def _check_batch(prompts: Sequence[str], responses: Sequence[str], tasks: Sequence[Task | None] | None) -> None:
    """Raise :class:`InvalidRewardError` unless prompts, responses (and tasks) align."""
    for name, values in (("prompts", prompts), ("responses", responses)):
        if isinstance(values, str) or not isinstance(values, Sequence):
            raise InvalidRewardError(f"{name} must be a sequence of strings, got {type(values).__name__}")
        for i, v in enumerate(values):
            if not isinstance(v, str):
                raise InvalidRewardError(f"{name}[{i}] must be a string, got {type(v).__name__}")
    if len(prompts) != len(responses):
        raise InvalidRewardError(f"got {len(prompts)} prompts but {len(responses)} responses; pass one each")
    if tasks is not None and len(tasks) != len(prompts):
        raise InvalidRewardError(f"got {len(tasks)} tasks for {len(prompts)} prompts; pass one task per prompt")


def _finite(value: object, where: str) -> float:
    """Return ``value`` as a float, or raise :class:`InvalidRewardError` if it is no finite real number."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise InvalidRewardError(
            f"{where} must be a finite real number, got {type(value).__name__} {value!r}; "
            "return a float (for a tensor, call .item(); for a bool, float(...))"
        )
    out = float(value)
    if not math.isfinite(out):
        raise InvalidRewardError(f"{where} must be finite, got {out!r}")
    return out


class VerifiableReward:
    """1.0 when the task's answer checker accepts the response, else 0.0.

    Every pair needs its :class:`~langchain_capeval.tasks.Task`; see
    :func:`langchain_capeval.tasks.check` for how answers are read.
    """

    def score(
        self, prompts: Sequence[str], responses: Sequence[str], tasks: Sequence[Task | None] | None = None
    ) -> list[float]:
        """Return 1.0 or 0.0 per response, by the checker of its task.

        Raises:
            InvalidRewardError: ``tasks`` is missing, misaligned or holds ``None``.

        """
        _check_batch(prompts, responses, tasks)
        if tasks is None:
            raise InvalidRewardError(f"{type(self).__name__} needs the task of every response: pass tasks=[...]")
        out: list[float] = []
        for i, (task, response) in enumerate(zip(tasks, responses, strict=True)):
            if not isinstance(task, Task):
                name = type(self).__name__
                raise InvalidRewardError(f"{name} needs a Task for every response; tasks[{i}] is {task!r}")
            out.append(self.reward(task, response))
        return out

    def reward(self, task: Task, response: str) -> float:
        """The reward of one response to ``task``."""
        return 1.0 if check(task, response) else 0.0


class PartialCreditReward(VerifiableReward):
    """1.0 when the checker accepts the response, else partial credit below 0.5 for near misses.

    A graded verifiable reward (:func:`langchain_capeval.tasks.answers.partial_credit`): wrong
    answers stop tying each other, so on a prompt the model never solves, the win-or-tie
    targets rank near misses above far ones instead of all being 1. Keep the tie margin
    ``epsilon`` below 0.5, or a near miss ties a right answer.

    Example:
        >>> t = Task(id="add1/3+4", family="add1", prompt="What is 3 + 4?", answer="7")
        >>> PartialCreditReward().score([t.prompt] * 3, ["7", "8", "I can't say."], [t] * 3)
        [1.0, 0.4375, 0.0]
    """

    def reward(self, task: Task, response: str) -> float:
        """The partial credit of one response to ``task``."""
        return partial_credit(task, response)


class CallableReward:
    """A reward from any function ``fn(prompt, response) -> float``.

    Example:
        >>> CallableReward(lambda p, r: float("nan")).score(["q"], ["a"])
        Traceback (most recent call last):
        ...
        langchain_capeval.errors.InvalidRewardError: reward of pair 0 must be finite, got nan

    """

    def __init__(self, fn: Callable[[str, str], float]) -> None:
        if not callable(fn):
            raise InvalidRewardError(f"CallableReward needs a callable fn(prompt, response) -> float, got {fn!r}")
        self.fn = fn

    def score(
        self, prompts: Sequence[str], responses: Sequence[str], tasks: Sequence[Task | None] | None = None
    ) -> list[float]:
        """Call ``fn`` on each pair; ``tasks`` is ignored.

        Raises:
            InvalidRewardError: ``fn`` returned something other than a finite real number.

        """
        _check_batch(prompts, responses, tasks)
        return [
            _finite(self.fn(prompt, response), f"reward of pair {i}")
            for i, (prompt, response) in enumerate(zip(prompts, responses, strict=True))
        ]


@dataclass(frozen=True)
class RewardModelConfig:
    """How a sequence-classification reward model is loaded and run.

    Attributes:
        path: Local folder with the model and its tokenizer (nothing is downloaded).
        head_index: Which output column is the reward (0 for single-head models).
        output: Output field to read: ``"logits"`` for standard models, ``"score"``
            for ArmoRM's custom head (which needs ``trust_remote_code=True``).
        batch_size: Pairs per forward pass.
        max_length: Most tokens per pair; longer ones keep their *last* tokens, so
            the response's end is always scored. ``None`` never truncates.
        device: Torch device, for example ``"cpu"`` or ``"cuda"``.
        dtype: Weight dtype; ``"auto"`` keeps the checkpoint's.
        trust_remote_code: Allow the folder's own modelling code (ArmoRM needs it).

    Example:
        >>> RewardModelConfig(path="/models/ArmoRM", batch_size=0)
        Traceback (most recent call last):
        ...
        langchain_capeval.errors.InvalidRewardError: batch_size must be an integer >= 1, got 0

    """

    path: str | Path
    head_index: int = 0
    output: Literal["logits", "score"] = "logits"
    batch_size: int = 8
    max_length: int | None = None
    device: str = "cpu"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.path, str | Path) or not str(self.path):
            raise InvalidRewardError(f"path must be a local folder, got {self.path!r}")
        for name, low in (("head_index", 0), ("batch_size", 1)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < low:
                raise InvalidRewardError(f"{name} must be an integer >= {low}, got {v!r}")
        m = self.max_length
        if m is not None and (not isinstance(m, int) or isinstance(m, bool) or m < 2):
            raise InvalidRewardError(f"max_length must be None or an integer >= 2, got {m!r}")
        if self.output not in ("logits", "score"):
            raise InvalidRewardError(f"output must be 'logits' or 'score', got {self.output!r}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise InvalidRewardError(f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")


class RewardModel:
    r"""A sequence-classification reward model, scoring (prompt, response) pairs in batches.

    A pair is rendered with the tokenizer's chat template as a user turn and an
    assistant turn when the tokenizer has one, else as ``"prompt\n\nresponse"``.
    Batches are right-padded with the model's pad token so that a pair scores the
    same alone or in a batch; the reward is column ``head_index`` of the output.

    Example:
        >>> rm = RewardModel.from_pretrained("/models/ArmoRM", trust_remote_code=True,
        ...                                  output="score", device="cuda")  # doctest: +SKIP
        >>> rm.score(["What is 3 + 4?"], ["7"])  # doctest: +SKIP
        [0.1234]

    """

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, config: RewardModelConfig) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = config
        text_config = model.config.get_text_config()
        pad_id = getattr(text_config, "pad_token_id", None)
        if pad_id is None:
            pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
            if pad_id is None:
                raise InvalidRewardError(
                    f"reward model at {config.path} has no pad token and its tokenizer no pad or eos token"
                )
            text_config.pad_token_id = pad_id  # the model finds each row's last token by it
        self.pad_id: int = int(pad_id)
        num_labels = getattr(model.config, "num_labels", None)
        if config.output == "logits" and num_labels is not None and config.head_index >= num_labels:
            raise InvalidRewardError(
                f"head_index={config.head_index} but the model at {config.path} has {num_labels} output columns"
            )

    @classmethod
    def from_config(cls, config: RewardModelConfig) -> RewardModel:
        """Load the model and tokenizer from ``config.path`` (local files only).

        Raises:
            ModelNotInstalledError: The folder does not exist.

        """
        path = Path(config.path).expanduser()
        if not path.is_dir():
            raise ModelNotInstalledError(
                f"reward model folder {path} not found; download it first, for example "
                f"`hf download RLHFlow/ArmoRM-Llama3-8B-v0.1 --local-dir {path}`"
            )
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        model = AutoModelForSequenceClassification.from_pretrained(
            path, dtype=config.dtype, local_files_only=True, trust_remote_code=config.trust_remote_code
        )
        tokenizer = AutoTokenizer.from_pretrained(
            path, local_files_only=True, trust_remote_code=config.trust_remote_code
        )
        return cls(model.to(config.device), tokenizer, config)

    @classmethod
    def from_pretrained(cls, path: str | Path, **settings: Any) -> RewardModel:
        """Shorthand for ``from_config(RewardModelConfig(path=path, **settings))``."""
        return cls.from_config(RewardModelConfig(path=path, **settings))

    def render(self, prompt: str, response: str) -> str:
        """Return the text the model scores for one pair."""
        if getattr(self.tokenizer, "chat_template", None):
            messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
            text = self.tokenizer.apply_chat_template(messages, tokenize=False)
            if not isinstance(text, str):
                raise InvalidRewardError(f"the chat template of {self.config.path} did not render to text")
            return text
        return f"{prompt}\n\n{response}"

    def encode(self, prompt: str, response: str) -> list[int]:
        """Return the token ids of one rendered pair, cut to its last ``max_length`` tokens."""
        templated = bool(getattr(self.tokenizer, "chat_template", None))
        ids = list(self.tokenizer(self.render(prompt, response), add_special_tokens=not templated)["input_ids"])
        limit = self.config.max_length
        return ids[-limit:] if limit is not None else ids

    def score(
        self, prompts: Sequence[str], responses: Sequence[str], tasks: Sequence[Task | None] | None = None
    ) -> list[float]:
        """Return the model's reward for each pair, ``batch_size`` pairs per forward pass.

        Raises:
            InvalidRewardError: The inputs do not align, or the model returned a
                non-finite reward.

        """
        _check_batch(prompts, responses, tasks)
        import torch

        rows = [self.encode(p, r) for p, r in zip(prompts, responses, strict=True)]
        out: list[float] = []
        device = next(self.model.parameters()).device
        size = self.config.batch_size
        for start in range(0, len(rows), size):
            batch = rows[start : start + size]
            width = max(len(r) for r in batch)
            input_ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
            attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
            for i, r in enumerate(batch):
                input_ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
                attention_mask[i, : len(r)] = 1
            with torch.inference_mode():
                result = self.model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device))
            head = getattr(result, self.config.output)
            rewards = head[:, self.config.head_index] if head.dim() == 2 else head
            for i, value in enumerate(rewards.float().cpu().tolist()):
                out.append(_finite(value, f"reward of pair {start + i}"))
        return out
