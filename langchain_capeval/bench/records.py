"""What the benchmark records: sample pools per prompt, per-prompt outcomes, and the resumable pools file.

A :class:`PromptPool` holds everything drawn for one prompt: a greedy sample, a pool of
samples at the fixed temperature T, and a pool whose i-th sample has the temperature the graph
gives the i-th sample it draws (annealing). Each :class:`PoolSample` carries what the replayed
strategies need: its length and finish, whether the checker accepts it, its self-evaluation at
the end and at each checkpoint it was still generating at, its extracted answer, its judge
rating and its self-certainty. :class:`PoolStore` appends one JSON line per prompt to
``pools.jsonl`` and, on a rerun, reads back the prompts already done, refusing a file written
with other collection settings.

An :class:`Outcome` is what one strategy did on one prompt: right or wrong, samples drawn,
tokens generated and tokens spent evaluating.

Example:
    >>> s = PoolSample(index=0, temperature=0.8, seed=1, text="7", num_tokens=2, finish_reason="eos",
    ...                correct=True, p_final=0.9, final_eval_tokens=28, p_at={8: 0.5}, tokens_at={8: 8})
    >>> PoolSample.from_dict(s.to_dict()) == s
    True

"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from langchain_capeval.errors import CapEvalInputError

POOLS_FILE = "pools.jsonl"
"""Name of the pools file inside the output folder."""

SETTINGS_FILE = "collection.json"
"""Name of the file recording the collection settings (and their hash) beside the pools."""


class PoolFileMismatchError(CapEvalInputError):
    """The output folder holds pools drawn with other settings; the message names them and what to do."""


@dataclass(frozen=True)
class PoolSample:
    """One recorded sample.

    Attributes:
        index: Its number in its pool (the order the graph would draw it in).
        temperature: Its sampling temperature.
        seed: Its random stream's seed.
        text: The response text.
        num_tokens: Tokens generated (a final end-of-turn token included).
        finish_reason: ``"eos"``, ``"stop"`` or ``"length"``.
        correct: Whether the task's checker accepts the response.
        p_final: P(win or tie) of the full response.
        final_eval_tokens: Tokens the engine pushes for the final self-evaluation (the pending
            token plus the turn; one fewer when the response ended its turn).
        p_at: P(win or tie) at each checkpoint the sample was still generating at.
        tokens_at: Tokens it held when paused at each of those checkpoints.
        text_at: Its text when paused at each of those checkpoints (the graph prunes copies of one
            prefix as one; pools written before this field replay with ``text`` instead, which
            only misses copies whose continuations differ).
        p_no: Raw P("No") of the full response.
        p_yes: Raw P("Yes") of the full response.
        answer: The answer extracted from the response (numeric kinds), for majority vote.
        judge_score: The same model's 0-10 rating of the response (fixed-temperature pool).
        judge_tokens: Tokens of that rating: the judge chat's prompt plus its answer.
        self_certainty: Mean over response tokens of KL(uniform || p) (fixed-temperature pool,
            transformers engine).

    """

    index: int
    temperature: float
    seed: int
    text: str
    num_tokens: int
    finish_reason: str | None
    correct: bool
    p_final: float
    final_eval_tokens: int
    p_at: dict[int, float] = field(default_factory=dict)
    tokens_at: dict[int, int] = field(default_factory=dict)
    text_at: dict[int, str] = field(default_factory=dict)
    p_no: float | None = None
    p_yes: float | None = None
    answer: str | None = None
    judge_score: float | None = None
    judge_tokens: int | None = None
    self_certainty: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (checkpoint keys as strings)."""
        d = asdict(self)
        d["p_at"] = {str(k): v for k, v in self.p_at.items()}
        d["tokens_at"] = {str(k): v for k, v in self.tokens_at.items()}
        d["text_at"] = {str(k): v for k, v in self.text_at.items()}
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PoolSample:
        """Read back :meth:`to_dict`."""
        data = dict(d)
        data["p_at"] = {int(k): float(v) for k, v in data.get("p_at", {}).items()}
        data["tokens_at"] = {int(k): int(v) for k, v in data.get("tokens_at", {}).items()}
        data["text_at"] = {int(k): str(v) for k, v in data.get("text_at", {}).items()}
        return cls(**data)

    def with_changes(self, **changes: Any) -> PoolSample:
        """A copy with ``changes``."""
        return replace(self, **changes)


@dataclass(frozen=True)
class PromptPool:
    """Everything drawn for one prompt.

    Attributes:
        task_id: The task.
        family: Its family.
        kind: Its answer kind (see :data:`~langchain_capeval.tasks.base.AnswerKind`).
        prompt_seed: The graph seed that draws exactly these pools' samples (``CapEvalConfig.seed``).
        eval_tokens: Tokens one mid-generation self-evaluation pushes: the self-evaluation
            suffix plus the pending token (the graph's ``eval_tokens``).
        max_new_tokens: Most tokens per sample.
        checkpoints: The checkpoints the samples were paused and self-evaluated at.
        greedy: The greedy sample (temperature 0), self-evaluated at the end.
        fixed: ``pool_size`` samples at the fixed temperature T.
        annealed: ``pool_size`` samples at the annealed temperatures; a sample whose temperature
            is T is the fixed pool's sample with the same seed (the graph would draw exactly it).
        seconds: Wall time spent on each pool (``greedy``, ``fixed``, ``annealed``) and on the
            ``judge`` and ``self_certainty`` scores.
        model_name: The engine's model name.

    """

    task_id: str
    family: str
    kind: str
    prompt_seed: int
    eval_tokens: int
    max_new_tokens: int
    checkpoints: tuple[int, ...]
    greedy: PoolSample
    fixed: tuple[PoolSample, ...]
    annealed: tuple[PoolSample, ...]
    seconds: dict[str, float] = field(default_factory=dict)
    model_name: str = ""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "task_id": self.task_id,
            "family": self.family,
            "kind": self.kind,
            "prompt_seed": self.prompt_seed,
            "eval_tokens": self.eval_tokens,
            "max_new_tokens": self.max_new_tokens,
            "checkpoints": list(self.checkpoints),
            "greedy": self.greedy.to_dict(),
            "fixed": [s.to_dict() for s in self.fixed],
            "annealed": [s.to_dict() for s in self.annealed],
            "seconds": self.seconds,
            "model_name": self.model_name,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PromptPool:
        """Read back :meth:`to_dict`."""
        return cls(
            task_id=d["task_id"],
            family=d["family"],
            kind=d["kind"],
            prompt_seed=int(d["prompt_seed"]),
            eval_tokens=int(d["eval_tokens"]),
            max_new_tokens=int(d["max_new_tokens"]),
            checkpoints=tuple(int(c) for c in d["checkpoints"]),
            greedy=PoolSample.from_dict(d["greedy"]),
            fixed=tuple(PoolSample.from_dict(s) for s in d["fixed"]),
            annealed=tuple(PoolSample.from_dict(s) for s in d["annealed"]),
            seconds={k: float(v) for k, v in d.get("seconds", {}).items()},
            model_name=str(d.get("model_name", "")),
        )


@dataclass(frozen=True)
class Outcome:
    """What a strategy did on one prompt.

    Attributes:
        correct: 1.0 if the returned answer is right, else 0.0 (an expectation for ``sample``).
        samples: Samples drawn (started, for pruning).
        generated_tokens: Tokens generated; a pruned sample counts the tokens it held when pruned.
        eval_tokens: Tokens spent judging samples: self-evaluation tokens for the method, the
            judge's prompt and answer for the judge baseline, 0 where selection is free.
        pick: Index of the returned sample in its pool, where the strategy returns one.
        stop_reason: Why sampling stopped, in the graph's terms, for graph strategies.

    """

    correct: float
    samples: float
    generated_tokens: float
    eval_tokens: float = 0.0
    pick: int | None = None
    stop_reason: str | None = None

    @property
    def total_tokens(self) -> float:
        """Generated plus evaluation tokens."""
        return self.generated_tokens + self.eval_tokens


def settings_hash(settings: Mapping[str, Any]) -> str:
    """A short, stable hash of a JSON-able settings dict.

    Example:
        >>> settings_hash({"a": 1, "b": [2]}) == settings_hash({"b": [2], "a": 1})
        True

    """
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def repair_jsonl(path: Path) -> None:
    """Cut a torn last line (an interrupted write) off a JSON-lines file, so appends start on a fresh line."""
    if not path.is_file():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        path.write_bytes(data[: data.rfind(b"\n") + 1])


class PoolStore:
    """The resumable ``pools.jsonl`` of one output folder, tied to one set of collection settings.

    The engine is checked apart (:meth:`check_engine`), when one is about to sample: replaying
    and reporting recorded pools needs no engine.

    Args:
        folder: The output folder (created if missing).
        settings: The collection settings that determine the pools.

    Raises:
        PoolFileMismatchError: The folder's pools were drawn with other settings.

    """

    def __init__(self, folder: Path, settings: Mapping[str, Any]) -> None:
        self.folder = folder
        self.path = folder / POOLS_FILE
        self.settings = dict(settings)
        self.hash = settings_hash(self.settings)
        folder.mkdir(parents=True, exist_ok=True)
        self.settings_path = stored_path = folder / SETTINGS_FILE
        if stored_path.is_file():
            stored = json.loads(stored_path.read_text())
            if stored.get("config_hash") != self.hash:
                theirs = stored.get("settings", {})
                diff = {
                    k: {"stored": theirs.get(k), "given": v} for k, v in self.settings.items() if theirs.get(k) != v
                }
                raise PoolFileMismatchError(
                    f"{self.path} holds pools drawn with other settings {diff}; give a new output_dir "
                    "(--output-dir) or the same settings"
                )
        else:
            stored_path.write_text(json.dumps({"config_hash": self.hash, "settings": self.settings}, indent=2) + "\n")
        repair_jsonl(self.path)

    def check_engine(self, model_name: str, adapter_sha256: str | None) -> None:
        """Record the engine on first use; refuse another model, or another adapter where both hashes are known.

        Raises:
            PoolFileMismatchError: The pools were drawn by another model or adapter.

        """
        stored = json.loads(self.settings_path.read_text())
        theirs = stored.get("engine")
        if theirs is None:
            stored["engine"] = {"model_name": model_name, "adapter_sha256": adapter_sha256}
            self.settings_path.write_text(json.dumps(stored, indent=2) + "\n")
            return
        other_adapter = None not in (theirs.get("adapter_sha256"), adapter_sha256) and (
            theirs.get("adapter_sha256") != adapter_sha256
        )
        if theirs.get("model_name") != model_name or other_adapter:
            raise PoolFileMismatchError(
                f"{self.path} holds pools drawn by {theirs}, not by model {model_name!r} with adapter "
                f"{adapter_sha256}; give a new output_dir (--output-dir) or the same engine"
            )

    def load(self) -> dict[str, PromptPool]:
        """The prompts already recorded, by task id."""
        out: dict[str, PromptPool] = {}
        if not self.path.is_file():
            return out
        for number, line in enumerate(self.path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if row.get("config_hash") != self.hash:
                raise PoolFileMismatchError(
                    f"{self.path}:{number} was written with other settings (hash {row.get('config_hash')}, "
                    f"expected {self.hash}); give a new output_dir or the same settings"
                )
            pool = PromptPool.from_dict(row["pool"])
            out[pool.task_id] = pool
        return out

    def append(self, pool: PromptPool) -> None:
        """Write one prompt's pools as a line, at once (an interrupted run keeps it)."""
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps({"config_hash": self.hash, "pool": pool.to_dict()}) + "\n")
            f.flush()
