"""On-policy preference data: samples of the model, rewards, win-or-tie targets and truncated prefixes.

For each prompt, :class:`PreferenceDataBuilder` draws ``num_samples`` responses from the
*same* engine and decoding used at inference, scores them with a
:class:`~langchain_capeval.rewards.RewardSource` (by default the task's answer checker),
and gives each the win-or-tie target of the paper: the fraction of the other samples
it beats or ties (:func:`~langchain_capeval.preferences.win_or_tie_targets`). Each
sample also gets a few truncation lengths, drawn from ``prefix_lengths``; a prefix
inherits its completion's target.

The output is ``preferences.jsonl``, one JSON object per prompt (a :class:`PromptRecord`),
appended as each prompt is done: rerunning the command skips prompts already in the
file, so an interrupted build resumes. ``data_card.json`` and ``DATA_CARD.md`` beside it
describe the data (model, seed, decoding, counts, tie rate, label balance, and how well
the targets can rank correctness: :func:`correctness_aurocs`); ``capeval data-card DIR``
(:func:`describe_folder`) writes them again for a folder built earlier.

Example:
    >>> from langchain_capeval.engines.transformers import TransformersEngine, TransformersEngineConfig
    >>> from langchain_capeval.training import PreferenceDataBuilder, PreferenceDataConfig
    >>> engine = TransformersEngine.from_config(TransformersEngineConfig(adapter=None))  # doctest: +SKIP
    >>> config = PreferenceDataConfig(output_dir="/tmp/prefs", max_prompts_per_family=2)  # doctest: +SKIP
    >>> card = PreferenceDataBuilder(engine, config).build()  # doctest: +SKIP
    >>> card["counts"]["prompts"]  # doctest: +SKIP
    16

"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from langchain_capeval.preferences import tie_rate, win_or_tie_targets
from langchain_capeval.rewards import PartialCreditReward, RewardSource, VerifiableReward
from langchain_capeval.sampling import SamplingParams
from langchain_capeval.tasks.answers import check
from langchain_capeval.tasks.base import Task
from langchain_capeval.tasks.synthetic import build_suite
from langchain_capeval.training.config import PreferenceDataConfig
from langchain_capeval.training.metrics import auroc

if TYPE_CHECKING:
    from langchain_capeval.engines.base import Engine, RowId

logger = logging.getLogger(__name__)

DATA_FILE = "preferences.jsonl"
"""Name of the data file inside ``output_dir``."""

_SAMPLE_FIELDS = ("model", "seed", "num_samples", "temperature", "top_p", "max_new_tokens", "n_per_family", "split")
"""Config fields that change the samples: a resumed build must keep them."""

_LABEL_FIELDS = ("reward", "epsilon")
"""Config fields that change the labels: a resumed build must keep them too (absent in older folders: the defaults)."""

_PREFIX_FIELDS = ("prefix_lengths", "prefixes_per_sample")
"""Config fields that draw the prefixes: recorded by a relabel that drew them anew, and kept by a build resuming it."""


def _recorded_settings(config: PreferenceDataConfig) -> dict[str, Any]:
    """The config fields ``build_config.json`` records: those that change the samples or their labels."""
    fields = (*_SAMPLE_FIELDS, *_LABEL_FIELDS)
    return {k: v for k, v in config.model_dump(mode="json").items() if k in fields}


REWARD_SOURCES: dict[str, type[VerifiableReward]] = {
    "verifiable": VerifiableReward,
    "partial_credit": PartialCreditReward,
}
"""The reward sources ``PreferenceDataConfig.reward`` names."""

_REWARD_TEXT = {
    "verifiable": "verifiable (task answer checker, 1.0 or 0.0)",
    "partial_credit": "partial_credit (1.0 if the checker accepts, else below 0.5 the nearer the answer)",
}


@dataclass
class SampleRecord:
    """One on-policy sample and its labels.

    Attributes:
        index: Sample number within its prompt.
        seed: Seed of the sample's random stream.
        token_ids: Sampled tokens (with the final EOS when it ended so), as the engine returned them.
        text: Decoded response text.
        finish_reason: ``"eos"``, ``"stop"`` or ``"length"``.
        reward: Its reward.
        target: Win-or-tie target: fraction of the other samples it beats or ties.
        prefix_lengths: Truncation lengths (each shorter than the response) that inherit ``target``.
        correct: Whether the task's checker accepts it, whatever the reward (``None`` in data built
            before this field, where the reward was the checker's: see :attr:`is_correct`).

    """

    index: int
    seed: int
    token_ids: list[int]
    text: str
    finish_reason: str | None
    reward: float
    target: float
    prefix_lengths: list[int] = field(default_factory=list)
    correct: bool | None = None

    @property
    def is_correct(self) -> bool:
        """Whether the sample is right: ``correct``, or for older data its 0/1 reward."""
        return self.reward > 0 if self.correct is None else self.correct


@dataclass
class PromptRecord:
    """One prompt with its samples: one line of ``preferences.jsonl``.

    Attributes:
        task: The task, as a dict of :class:`~langchain_capeval.tasks.Task` fields.
        prompt_ids: The rendered prompt tokens (``ChatFormat.encode(task.messages())``).
        samples: The on-policy samples.
        tie_rate: Fraction of sample pairs that tie.

    """

    task: dict[str, Any]
    prompt_ids: list[int]
    samples: list[SampleRecord]
    tie_rate: float

    @property
    def task_id(self) -> str:
        """The task's stable id."""
        return str(self.task["id"])

    @property
    def family(self) -> str:
        """The task's family."""
        return str(self.task["family"])

    def to_json(self) -> str:
        """One JSONL line."""
        return json.dumps(asdict(self), ensure_ascii=False)

    @classmethod
    def from_json(cls, line: str) -> PromptRecord:
        """Parse one JSONL line."""
        raw = json.loads(line)
        return cls(raw["task"], raw["prompt_ids"], [SampleRecord(**s) for s in raw["samples"]], raw["tie_rate"])


def sample_seed(seed: int, task_id: str, index: int) -> int:
    """Return a sample's seed from the build seed, its task and its number: stable whatever the batching.

    Example:
        >>> sample_seed(0, "add1/3+4", 0) == sample_seed(0, "add1/3+4", 0) != sample_seed(0, "add1/3+4", 1)
        True

    """
    digest = hashlib.sha256(f"{seed}:{task_id}:{index}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def prefix_rng(seed: int, task_id: str) -> random.Random:
    """The generator a prompt's truncation lengths are drawn with: ``build-data`` and ``relabel`` draw alike.

    Example:
        >>> prefix_rng(0, "add1/3+4").random() == prefix_rng(0, "add1/3+4").random()
        True

    """
    return random.Random(f"{seed}:{task_id}:prefixes")


def choose_prefix_lengths(num_tokens: int, lengths: Sequence[int], k: int, rng: random.Random) -> list[int]:
    """Draw up to ``k`` distinct truncation lengths shorter than the response, in increasing order.

    Example:
        >>> choose_prefix_lengths(20, (8, 16, 32, 64), 2, random.Random(0))
        [8, 16]
        >>> choose_prefix_lengths(5, (8, 16), 2, random.Random(0))
        []

    """
    eligible = [n for n in lengths if n < num_tokens]
    return sorted(rng.sample(eligible, min(k, len(eligible))))


def label_samples(
    rewards: Sequence[float], num_tokens: Sequence[int], config: PreferenceDataConfig, rng: random.Random
) -> tuple[list[float], list[list[int]]]:
    """Win-or-tie targets of a prompt's samples and the prefix lengths each one inherits its target to.

    Example:
        >>> cfg = PreferenceDataConfig(prefix_lengths=(4, 8), prefixes_per_sample=1)
        >>> label_samples([1.0, 0.0, 0.0], [10, 6, 3], cfg, random.Random(0))
        ([1.0, 0.5, 0.5], [[8], [4], []])

    """
    targets = win_or_tie_targets(rewards, config.epsilon)
    prefixes = [choose_prefix_lengths(n, config.prefix_lengths, config.prefixes_per_sample, rng) for n in num_tokens]
    return targets, prefixes


def read_records(path: str | os.PathLike[str]) -> list[PromptRecord]:
    """Read ``preferences.jsonl``; a torn last line (an interrupted write) is ignored."""
    records: list[PromptRecord] = []
    p = Path(path)
    if not p.is_file():
        return records
    lines = p.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(PromptRecord.from_json(line))
        except (json.JSONDecodeError, KeyError, TypeError):
            if i == len(lines) - 1:
                logger.warning("%s: ignoring a torn last line (an interrupted write)", p)
                break
            raise
    return records


def _repair(path: Path) -> None:
    """Cut a torn last line off the file, so appends start on a fresh line."""
    if not path.is_file():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        path.write_bytes(data[: data.rfind(b"\n") + 1])


class PreferenceDataBuilder:
    """Builds on-policy preference data with one engine: the model and decoding used at inference.

    Args:
        engine: The engine to sample from (its model must be the one to train, without a self-evaluation adapter).
        config: What to build.
        reward: Scores the samples; ``None`` uses the source ``config.reward`` names (by default
            :class:`~langchain_capeval.rewards.VerifiableReward`, the answer checker).

    """

    def __init__(self, engine: Engine, config: PreferenceDataConfig, reward: RewardSource | None = None) -> None:
        self.engine = engine
        self.config = config
        self.reward: RewardSource = reward or REWARD_SOURCES[config.reward]()
        self.output_dir = Path(config.output_dir)
        self.path = self.output_dir / DATA_FILE

    @property
    def reward_name(self) -> str:
        """``config.reward`` when the builder scores with that source, else the source's class name."""
        named = self.config.reward
        return named if type(self.reward) is REWARD_SOURCES[named] else type(self.reward).__name__

    def tasks(self) -> list[Task]:
        """Return the prompts of the config: the split of the suite, capped per family, families interleaved."""
        cfg = self.config
        suite = build_suite(cfg.families, n_per_family=cfg.n_per_family, seed=cfg.seed)
        tasks: list[Task] = getattr(suite, cfg.split)
        if cfg.max_prompts_per_family is None:
            return list(tasks)
        taken: Counter[str] = Counter()
        out = []
        for t in tasks:
            if taken[t.family] < cfg.max_prompts_per_family:
                taken[t.family] += 1
                out.append(t)
        return out

    def build(self, tasks: Sequence[Task] | None = None, *, progress: bool = True) -> dict[str, Any]:
        """Sample, label and append every prompt not yet in the file; then write the data card.

        Args:
            tasks: Prompts to build; ``None`` uses :meth:`tasks`.
            progress: Show a tqdm progress bar.

        Returns:
            The data card, as written to ``data_card.json``.

        Raises:
            ValueError: The folder holds data built with different sampling settings.

        """
        todo_all = list(tasks) if tasks is not None else self.tasks()
        return self._append(todo_all, lambda t: t.id, self.sample_prompts, "build-data", progress)

    def extend(self, records: Sequence[PromptRecord], *, progress: bool = True) -> dict[str, Any]:
        """Continue the cut-short samples of ``records`` (:meth:`continue_prompts`); append those not yet in the file.

        Returns:
            The data card, as written to ``data_card.json``.

        """
        return self._append(list(records), lambda r: r.task_id, self.continue_prompts, "extend-data", progress)

    def _append(
        self,
        todo_all: list[Any],
        task_id: Callable[[Any], str],
        produce: Callable[[Sequence[Any]], Iterator[PromptRecord]],
        desc: str,
        progress: bool,
    ) -> dict[str, Any]:
        """Produce records for the items whose task is not yet in the file, ``prompts_per_batch`` at a time."""
        from tqdm.auto import tqdm

        self.output_dir.mkdir(parents=True, exist_ok=True)
        self._check_settings()
        _repair(self.path)
        done = {r.task_id for r in read_records(self.path)}
        todo = [t for t in todo_all if task_id(t) not in done]
        start = time.perf_counter()
        bar = tqdm(total=len(todo_all), initial=len(todo_all) - len(todo), desc=desc, disable=not progress)
        step = self.config.prompts_per_batch
        with self.path.open("a", encoding="utf-8") as out:
            for i in range(0, len(todo), step):
                for record in produce(todo[i : i + step]):
                    out.write(record.to_json() + "\n")
                    out.flush()
                    bar.update(1)
        bar.close()
        return self.data_card(seconds=time.perf_counter() - start)

    def sample_prompts(self, tasks: Sequence[Task]) -> Iterator[PromptRecord]:
        """Draw ``num_samples`` responses for each task, decoded together; score and label them."""
        cfg = self.config
        fmt = self.engine.chat_format
        requests: list[tuple[Task, list[int], str, list[int]]] = []
        try:
            for task in tasks:
                prompt_ids = fmt.encode(task.messages())
                seeds = [sample_seed(cfg.seed, task.id, j) for j in range(cfg.num_samples)]
                params = [
                    SamplingParams(
                        temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens, seed=s
                    )
                    for s in seeds
                ]
                request_id = f"build-data:{task.id}"
                rows = self.engine.submit(prompt_ids, params, request_id=request_id)
                requests.append((task, prompt_ids, request_id, rows))
            all_rows = [r for *_, rows in requests for r in rows]
            samples = self.engine.generate(all_rows)
            by_row = {s.row: s for s in samples}
            for task, prompt_ids, _, rows in requests:
                got = [by_row[r] for r in rows]
                drawn = [
                    (sample_seed(cfg.seed, task.id, j), s.token_ids, s.text, s.finish_reason) for j, s in enumerate(got)
                ]
                yield self._label(task, prompt_ids, drawn)
        finally:
            for *_, request_id, _ in requests:
                self.engine.close_request(request_id)

    def continue_prompts(self, records: Sequence[PromptRecord]) -> Iterator[PromptRecord]:
        """Decode on the samples of ``records`` that stopped at a smaller ``max_new_tokens``; label them anew.

        A sample that ended (EOS or a stop string) is kept as it is. One cut short by the old
        limit (``finish_reason == "length"``) is continued from its own tokens, at the same
        temperature and top-p, up to ``config.max_new_tokens`` in all: the model's distribution
        over the rest of a response given its start, so the whole is a sample of the longer
        decoding, as a build with the larger limit would draw (from another random stream:
        the continuation's seed is :func:`sample_seed` of the task id and the old length).
        Every sample is then scored, targeted and given prefix lengths as :meth:`sample_prompts` does.
        """
        cfg = self.config
        fmt = self.engine.chat_format
        requests: list[tuple[PromptRecord, dict[int, tuple[str, RowId]]]] = []
        try:
            for record in records:
                rows: dict[int, tuple[str, RowId]] = {}  # sample index -> its continuation's request and row
                for x in record.samples:
                    if x.finish_reason != "length" or len(x.token_ids) >= cfg.max_new_tokens:
                        continue
                    if x.token_ids and x.token_ids[-1] in fmt.eos_token_ids:
                        continue
                    seed = sample_seed(cfg.seed, f"{record.task_id}@{len(x.token_ids)}", x.index)
                    params = SamplingParams(
                        temperature=cfg.temperature,
                        top_p=cfg.top_p,
                        max_new_tokens=cfg.max_new_tokens - len(x.token_ids),
                        seed=seed,
                    )
                    request_id = f"extend-data:{record.task_id}:{x.index}"
                    (row,) = self.engine.submit([*record.prompt_ids, *x.token_ids], [params], request_id=request_id)
                    rows[x.index] = (request_id, row)
                requests.append((record, rows))
            all_rows = [row for _, rows in requests for _, row in rows.values()]
            by_row = {s.row: s for s in self.engine.generate(all_rows)} if all_rows else {}
            for record, rows in requests:
                drawn = []
                for x in record.samples:
                    if x.index not in rows:
                        drawn.append((x.seed, x.token_ids, x.text, x.finish_reason))
                        continue
                    more = by_row[rows[x.index][1]]
                    ids = [*x.token_ids, *more.token_ids]
                    drawn.append((x.seed, ids, fmt.decode(ids), more.finish_reason))  # the engine's text of a row
                yield self._label(Task(**record.task), record.prompt_ids, drawn)
        finally:
            for _, rows in requests:
                for request_id, _ in rows.values():
                    self.engine.close_request(request_id)

    def _label(
        self, task: Task, prompt_ids: Sequence[int], drawn: Sequence[tuple[int, list[int], str, str | None]]
    ) -> PromptRecord:
        """Score a prompt's samples ``(seed, token_ids, text, finish_reason)``; give them targets and prefixes."""
        cfg = self.config
        texts = [text for _, _, text, _ in drawn]
        rewards = self.reward.score([task.prompt] * len(drawn), texts, [task] * len(drawn))
        rng = prefix_rng(cfg.seed, task.id)
        targets, prefixes = label_samples(rewards, [len(ids) for _, ids, _, _ in drawn], cfg, rng)
        return PromptRecord(
            task=asdict(task),
            prompt_ids=list(prompt_ids),
            samples=[
                SampleRecord(
                    index=j,
                    seed=seed,
                    token_ids=list(ids),
                    text=text,
                    finish_reason=finish,
                    reward=rewards[j],
                    target=targets[j],
                    prefix_lengths=prefixes[j],
                    correct=check(task, text),
                )
                for j, (seed, ids, text, finish) in enumerate(drawn)
            ],
            tie_rate=tie_rate(rewards, cfg.epsilon),
        )

    def _check_settings(self) -> None:
        """Record the sampling settings on the first run; refuse to resume with different ones."""
        settings_path = self.output_dir / "build_config.json"
        mine = _recorded_settings(self.config)
        mine["engine_model"] = self.engine.model_name
        mine["reward"] = self.reward_name
        if settings_path.is_file():
            theirs = json.loads(settings_path.read_text())
            defaults = PreferenceDataConfig().model_dump(mode="json")
            for k in _LABEL_FIELDS:
                theirs.setdefault(k, defaults[k])
            given = self.config.model_dump(mode="json")
            mine |= {k: given[k] for k in _PREFIX_FIELDS if k in theirs}
            diff = {k: (theirs.get(k), v) for k, v in mine.items() if theirs.get(k) != v}
            if diff:
                raise ValueError(
                    f"{self.output_dir} holds data sampled with other settings {diff} (stored, given); "
                    "use another output_dir or the same settings"
                )
        else:
            settings_path.write_text(json.dumps(mine, indent=2) + "\n")

    def data_card(self, seconds: float | None = None) -> dict[str, Any]:
        """Describe the data in the file; write ``data_card.json`` and ``DATA_CARD.md``."""
        records = read_records(self.path)
        card = describe(records, self.config, self.engine.model_name, self.reward_name)
        if seconds is not None:
            card["build_seconds_last_run"] = round(seconds, 1)
        _write_data_card(self.output_dir, card)
        return card


def describe_folder(output_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Describe a built folder again, without an engine; rewrite its data card.

    The settings come from the folder's ``build_config.json`` (and ``epsilon`` from its old
    card): for data built before the card grew a field, or merged by hand.

    Example:
        >>> card = describe_folder("results/training/v5-suffix-lora/data")  # doctest: +SKIP
        >>> card["label_balance"]["auroc_target_for_correctness"]  # doctest: +SKIP
        0.934

    Raises:
        FileNotFoundError: The folder has no ``preferences.jsonl`` or no ``build_config.json``.

    """
    out = Path(output_dir)
    settings = read_build_settings(out)
    old_path = out / "data_card.json"
    old = json.loads(old_path.read_text()) if old_path.is_file() else {}
    given = {k: settings[k] for k in _SAMPLE_FIELDS if k in settings}
    given["epsilon"] = settings.get("epsilon", old.get("epsilon", 0.0))
    named = settings.get("reward", "verifiable")
    if named in REWARD_SOURCES:
        given["reward"] = named
    config = PreferenceDataConfig(output_dir=str(out), **given)
    card = describe(read_records(out / DATA_FILE), config, settings.get("engine_model") or str(config.model), named)
    if "build_seconds_last_run" in old:
        card["build_seconds_last_run"] = old["build_seconds_last_run"]
    _write_data_card(out, card)
    return card


def relabel_folder(
    source_dir: str | os.PathLike[str],
    output_dir: str | os.PathLike[str],
    reward: str,
    epsilon: float = 0.0,
    *,
    prefix_lengths: Sequence[int] | None = None,
    prefixes_per_sample: int | None = None,
) -> dict[str, Any]:
    """Score a built folder's samples again with another reward; write them, relabelled, to a new folder.

    Sampling is the expensive part of the data; rewards and targets are cheap. The samples
    (tokens, texts, seeds, prefix lengths) are copied as they are; each sample's reward,
    win-or-tie target and ``correct`` and each prompt's tie rate are computed anew, and the
    new folder's ``build_config.json`` records the reward and ``epsilon`` (so ``build-data``
    can resume it with the same labelling) and its data card describes the new labels.

    Given ``prefix_lengths`` or ``prefixes_per_sample`` (the other then the config's default),
    the truncation lengths are drawn anew as ``build-data`` draws them (seeded by the source's
    seed and each prompt's id), for more or other mid-generation examples from the same samples;
    ``build_config.json`` records the two then, and ``build-data`` resuming the folder must keep them.

    Example:
        >>> card = relabel_folder("results/training/v5-suffix-lora/data", "runs/pc", "partial_credit")  # doctest: +SKIP
        >>> card["label_balance"]["auroc_target_for_correctness"]  # doctest: +SKIP
        0.981
        >>> card = relabel_folder("runs/pc", "runs/pc-dense", "partial_credit", prefixes_per_sample=4)  # doctest: +SKIP

    Raises:
        FileNotFoundError: ``source_dir`` is not a built folder.
        ValueError: ``output_dir`` is ``source_dir`` or already holds data; an unknown reward or a bad epsilon;
            bad prefix lengths or count.

    """
    src, out = Path(source_dir), Path(output_dir)
    settings = read_build_settings(src)
    if out.resolve() == src.resolve() or (out / DATA_FILE).exists():
        raise ValueError(f"{out} already holds preference data; relabel into a new folder")
    given = {k: settings[k] for k in _SAMPLE_FIELDS if k in settings}
    asked = {"prefix_lengths": prefix_lengths, "prefixes_per_sample": prefixes_per_sample}
    redraw = {k: v for k, v in asked.items() if v is not None}
    config = PreferenceDataConfig.model_validate(
        given | redraw | {"output_dir": str(out), "reward": reward, "epsilon": epsilon}
    )
    source = REWARD_SOURCES[config.reward]()
    records = []
    for r in read_records(src / DATA_FILE):
        task = Task(**r.task)
        texts = [x.text for x in r.samples]
        rewards = source.score([task.prompt] * len(texts), texts, [task] * len(texts))
        if redraw:
            rng = prefix_rng(config.seed, task.id)
            targets, prefixes = label_samples(rewards, [len(x.token_ids) for x in r.samples], config, rng)
        else:
            targets, prefixes = win_or_tie_targets(rewards, config.epsilon), [x.prefix_lengths for x in r.samples]
        samples = [
            replace(x, reward=rw, target=t, prefix_lengths=list(k), correct=check(task, x.text))
            for x, rw, t, k in zip(r.samples, rewards, targets, prefixes, strict=True)
        ]
        records.append(replace(r, samples=samples, tie_rate=tie_rate(rewards, config.epsilon)))
    out.mkdir(parents=True, exist_ok=True)
    with (out / DATA_FILE).open("w", encoding="utf-8") as f:
        f.writelines(r.to_json() + "\n" for r in records)
    recorded = settings | _recorded_settings(config)
    if redraw:
        recorded |= {k: v for k, v in config.model_dump(mode="json").items() if k in _PREFIX_FIELDS}
    (out / "build_config.json").write_text(json.dumps(recorded, indent=2) + "\n")
    card = describe(records, config, settings.get("engine_model") or str(config.model))
    card["relabelled_from"] = str(src)
    _write_data_card(out, card)
    return card


def extend_folder(
    source_dir: str | os.PathLike[str],
    output_dir: str | os.PathLike[str],
    engine: Engine,
    max_new_tokens: int,
    *,
    prefix_lengths: Sequence[int] | None = None,
    prompts_per_batch: int = 4,
    progress: bool = True,
) -> dict[str, Any]:
    """Continue a built folder's samples to a larger ``max_new_tokens``, into a new folder (resumable).

    Data sampled with a short limit is a sample of another decoding than the one used at
    inference (``CapEvalConfig.max_new_tokens``, 256): an answer cut at 48 tokens is scored as
    it stands, and a self-evaluator trained on it never sees a longer response. Continuing each
    cut-short sample from its own tokens (:meth:`PreferenceDataBuilder.continue_prompts`) turns
    the data into samples of the longer decoding for the cost of the tokens past the old limit
    only; samples that ended are kept. The new folder's samples are scored with the source's
    reward and ``epsilon``; targets, prefix lengths (``prefix_lengths``, default the config's)
    and the data card are made anew, and ``build_config.json`` records the new limit, so
    rerunning the command resumes it. ``prompts_per_batch`` prompts' samples are decoded together.

    Example:
        >>> card = extend_folder("runs/data48", "runs/data256", engine, 256)  # doctest: +SKIP
        >>> card["extended_from"]  # doctest: +SKIP
        'runs/data48'

    Raises:
        FileNotFoundError: ``source_dir`` is not a built folder.
        ValueError: ``output_dir`` is ``source_dir``; ``max_new_tokens`` is not above the source's; the engine
            serves another model than the one the source was sampled from.

    """
    src, out = Path(source_dir), Path(output_dir)
    settings = read_build_settings(src)
    if out.resolve() == src.resolve():
        raise ValueError(f"extend {src} into a new folder, not into itself")
    if max_new_tokens <= settings["max_new_tokens"]:
        raise ValueError(
            f"max_new_tokens={max_new_tokens} does not extend {src}, sampled with max_new_tokens="
            f"{settings['max_new_tokens']}; give a larger limit"
        )
    sampled_by = settings.get("engine_model")
    if sampled_by is not None and sampled_by != engine.model_name:
        raise ValueError(f"{src} was sampled from {sampled_by!r}; the engine serves {engine.model_name!r}")
    given = {k: settings[k] for k in (*_SAMPLE_FIELDS, *_LABEL_FIELDS) if k in settings}
    if prefix_lengths is not None:
        given["prefix_lengths"] = tuple(prefix_lengths)
    config = PreferenceDataConfig.model_validate(
        given | {"output_dir": str(out), "max_new_tokens": max_new_tokens, "prompts_per_batch": prompts_per_batch}
    )
    card = PreferenceDataBuilder(engine, config).extend(read_records(src / DATA_FILE), progress=progress)
    card["extended_from"] = str(src)
    _write_data_card(out, card)
    return card


def read_build_settings(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``build_config.json`` of a folder ``build-data`` wrote; ``FileNotFoundError`` naming what it lacks."""
    folder = Path(folder)
    for name in (DATA_FILE, "build_config.json"):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder} is not a built preference-data folder: it has no {name}")
    settings: dict[str, Any] = json.loads((folder / "build_config.json").read_text())
    return settings


def _write_data_card(output_dir: Path, card: dict[str, Any]) -> None:
    (output_dir / "data_card.json").write_text(json.dumps(card, indent=2) + "\n")
    (output_dir / "DATA_CARD.md").write_text(render_data_card(card))


def correctness_aurocs(records: Sequence[PromptRecord]) -> dict[str, float | None]:
    """How well the win-or-tie targets, and prompt difficulty alone, rank the samples' correctness.

    ``auroc_target_for_correctness`` is the AUROC for correctness (:attr:`SampleRecord.is_correct`) of the samples'
    own targets: what a self-evaluator that predicted its training target exactly would score,
    so the ceiling of a trained one's correctness AUROC on these prompts. It is below 1 where a
    prompt's samples are all wrong: they tie each other, so each has target 1, as a right answer
    has. ``auroc_difficulty_for_correctness`` scores each sample by its prompt's mean target
    alone (the part of the target that says how hard the prompt is, not which sample is right);
    below 0.5 means that part, learnt alone, ranks correctness worse than chance.

    Example:
        >>> s = [SampleRecord(i, 0, [1], "", "eos", r, t) for i, (r, t) in enumerate([(1.0, 1.0), (0.0, 0.0)])]
        >>> w = [SampleRecord(i, 0, [1], "", "eos", 0.0, 1.0) for i in range(2)]
        >>> correctness_aurocs([PromptRecord({}, [], s, 0.0), PromptRecord({}, [], w, 1.0)])
        {'auroc_target_for_correctness': 0.6667, 'auroc_difficulty_for_correctness': 0.1667}

    """
    rows = [(s.is_correct, s.target, _mean([x.target for x in r.samples])) for r in records for s in r.samples]
    correct = [c for c, _, _ in rows]
    by_target, by_difficulty = auroc([t for _, t, _ in rows], correct), auroc([d for _, _, d in rows], correct)
    return {
        "auroc_target_for_correctness": None if by_target is None else round(by_target, 4),
        "auroc_difficulty_for_correctness": None if by_difficulty is None else round(by_difficulty, 4),
    }


def describe(
    records: Sequence[PromptRecord], config: PreferenceDataConfig, model_name: str, reward_name: str | None = None
) -> dict[str, Any]:
    """Describe a set of records: what was sampled, how, and how the labels are spread.

    ``reward_name`` is the reward source's name when it is not the one ``config.reward`` names.
    Accuracy and the correctness AUROCs read :attr:`SampleRecord.is_correct`, not the reward.
    """
    reward = reward_name or config.reward
    samples = [s for r in records for s in r.samples]
    targets = [s.target for s in samples]
    prefix_counts: Counter[int] = Counter(k for s in samples for k in s.prefix_lengths)
    per_family: dict[str, dict[str, float | None]] = {}
    for fam in sorted({r.family for r in records}):
        recs = [r for r in records if r.family == fam]
        fs = [s for r in recs for s in r.samples]
        per_family[fam] = {
            "prompts": len(recs),
            "samples": len(fs),
            "accuracy": _mean([float(s.is_correct) for s in fs]),
            "mean_target": _mean([s.target for s in fs]),
            "prompts_all_wrong": sum(not any(s.is_correct for s in r.samples) for r in recs),
            **correctness_aurocs(recs),
        }
    solved = [sum(s.is_correct for s in r.samples) / max(len(r.samples), 1) for r in records]
    histogram = Counter(min(int(t * 10), 9) for t in targets)
    return {
        "model": model_name,
        "seed": config.seed,
        "reward": _REWARD_TEXT.get(reward, reward),
        "epsilon": config.epsilon,
        "decoding": {
            "temperature": config.temperature,
            "top_p": config.top_p,
            "max_new_tokens": config.max_new_tokens,
            "samples_per_prompt": config.num_samples,
        },
        "suite": {"families": sorted(per_family), "split": config.split, "n_per_family": config.n_per_family},
        "counts": {
            "prompts": len(records),
            "samples": len(samples),
            "prefix_examples": sum(prefix_counts.values()),
            "prefix_examples_by_length": {str(k): prefix_counts[k] for k in sorted(prefix_counts)},
            "examples": len(samples) + sum(prefix_counts.values()),
        },
        "tie_rate": _mean([r.tie_rate for r in records]),
        "label_balance": {
            "mean_target": _mean(targets),
            "share_target_1": _mean([float(t == 1.0) for t in targets]),
            "share_target_0": _mean([float(t == 0.0) for t in targets]),
            "target_histogram_deciles": [histogram[i] for i in range(10)],
            "accuracy": _mean([float(s.is_correct) for s in samples]),
            "prompts_all_correct": sum(x == 1.0 for x in solved),
            "prompts_all_wrong": sum(x == 0.0 for x in solved),
            "prompts_mixed": sum(0.0 < x < 1.0 for x in solved),
            **correctness_aurocs(records),
        },
        "finish_reasons": dict(Counter(str(s.finish_reason) for s in samples)),
        "mean_response_tokens": _mean([float(len(s.token_ids)) for s in samples]),
        "per_family": per_family,
    }


def _mean(values: Sequence[float]) -> float:
    return round(sum(values) / len(values), 4) if values else 0.0


def render_data_card(card: dict[str, Any]) -> str:
    """Render the data card as Markdown."""
    d, c, lb = card["decoding"], card["counts"], card["label_balance"]
    lines = [
        "# Data card: on-policy self-evaluation preferences",
        "",
        f"- Model: {card['model']} (samples drawn by the model itself: on-policy)",
        f"- Seed: {card['seed']}; suite: {', '.join(card['suite']['families'])} "
        f"({card['suite']['split']} split, n_per_family={card['suite']['n_per_family']})",
        f"- Decoding: temperature {d['temperature']}, top_p {d['top_p']}, max_new_tokens {d['max_new_tokens']}, "
        f"{d['samples_per_prompt']} samples per prompt",
        f"- Reward: {card['reward']}; ties: reward gap <= {card['epsilon']}",
        f"- Counts: {c['prompts']} prompts, {c['samples']} samples, {c['prefix_examples']} truncated prefixes "
        f"{c['prefix_examples_by_length']}, {c['examples']} examples in all",
        f"- Tie rate (mean over prompts of the share of sample pairs that tie): {card['tie_rate']}",
        f"- Label balance: mean target {lb['mean_target']}, target = 1: {lb['share_target_1']}, "
        f"target = 0: {lb['share_target_0']}, deciles {lb['target_histogram_deciles']}",
        f"- Sample accuracy {lb['accuracy']}; prompts all correct {lb['prompts_all_correct']}, "
        f"all wrong {lb['prompts_all_wrong']}, mixed {lb['prompts_mixed']}",
        f"- Finish reasons: {card['finish_reasons']}; mean response tokens {card['mean_response_tokens']}",
        f"- AUROC for correctness of the win-or-tie targets (the ceiling of a self-evaluator trained on them): "
        f"{lb.get('auroc_target_for_correctness')}; of prompt difficulty alone (each sample scored by its "
        f"prompt's mean target): {lb.get('auroc_difficulty_for_correctness')}",
        "",
        "| family | prompts | samples | accuracy | mean target | prompts all wrong | AUROC of targets | "
        "AUROC of difficulty |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for fam, row in card["per_family"].items():
        cells = [row["prompts"], row["samples"], row["accuracy"], row["mean_target"], row.get("prompts_all_wrong")]
        cells += [row.get("auroc_target_for_correctness"), row.get("auroc_difficulty_for_correctness")]
        lines.append(f"| {fam} | " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"
