"""GSM8K grade-school math word problems, read from the shared data folder.

The files are the original ``{train,test}.jsonl`` (7,473 and 1,319 rows), one JSON
object per line with a ``question`` and a worked ``answer`` that ends in
``#### N``. Nothing is downloaded: the folder is found on this machine, in order,

1. from the environment variable ``CAPEVAL_GSM8K_DIR``, if set;
2. as ``shared/data/gsm8k`` in the current directory or one of its parents
   (the repository sits beside ``shared/``, so ``../shared`` is found from it);
3. the same search upward from this package's location.

A task's prompt is the question followed by :data:`INSTRUCTION`; its answer is
the number after ``####`` (commas dropped). Responses are read with kind
``"cot_number"``: the number after "The answer is" if the response says it, else
its final number (see :mod:`langchain_capeval.tasks.answers`).

Example:
    >>> from langchain_capeval.tasks.gsm8k import load_gsm8k
    >>> from langchain_capeval.tasks.answers import check
    >>> task = load_gsm8k("train", limit=1, seed=None)[0]
    >>> task.answer
    '72'
    >>> check(task, "She sold 48 / 2 = 24 in May, 48 + 24 = 72 in all. The answer is 72.")
    True

"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

from langchain_capeval.errors import DataNotFoundError, InvalidTaskError
from langchain_capeval.tasks.base import Task, parse_decimal

GSM8K_DIR_ENV = "CAPEVAL_GSM8K_DIR"
"""Environment variable that points at the folder holding ``train.jsonl`` and ``test.jsonl``."""

GSM8K_SPLITS = ("train", "test")
"""The splits GSM8K ships."""

INSTRUCTION = 'Think step by step, then end with "The answer is N." where N is a number.'
"""Appended to each question on its own line."""

_RELATIVE = Path("shared") / "data" / "gsm8k"


def find_gsm8k_dir() -> Path:
    """Return the folder holding the GSM8K files.

    Raises:
        DataNotFoundError: ``CAPEVAL_GSM8K_DIR`` names a missing folder, or no
            ``shared/data/gsm8k`` is found upward from the current directory or
            from the package; the message names the paths tried.

    """
    env = os.environ.get(GSM8K_DIR_ENV)
    if env:
        path = Path(env).expanduser()
        if not path.is_dir():
            raise DataNotFoundError(f"{GSM8K_DIR_ENV}={env!r} is not a folder; point it at the folder with test.jsonl")
        return path
    starts = (Path.cwd().resolve(), Path(__file__).resolve().parent)
    for start in starts:
        for folder in (start, *start.parents):
            candidate = folder / _RELATIVE
            if candidate.is_dir():
                return candidate
    raise DataNotFoundError(
        f"GSM8K data not found: expected a folder {_RELATIVE} beside the repository (for example "
        f"{starts[0].parent / _RELATIVE}), searched upward from {starts[0]} and {starts[1]}; "
        f"put train.jsonl and test.jsonl there or set {GSM8K_DIR_ENV}"
    )


def final_answer(solution: str) -> str:
    r"""Return the canonical answer of a GSM8K worked solution: the number after ``####``.

    Example:
        >>> final_answer("48 + 24 = <<48+24=72>>72 clips.\n#### 1,072")
        '1072'

    """
    _, sep, tail = solution.rpartition("####")
    value = parse_decimal(tail) if sep else None
    if value is None:
        raise InvalidTaskError(f"GSM8K solution has no number after '####': {solution[-80:]!r}")
    return format(value.normalize(), "f") if value == value.to_integral_value() else str(value)


def load_gsm8k(
    split: str = "test", limit: int | None = None, seed: int | None = 0, data_dir: str | Path | None = None
) -> list[Task]:
    """Load GSM8K problems as tasks.

    Args:
        split: ``"train"`` or ``"test"``.
        limit: Keep at most this many tasks; ``None`` keeps all.
        seed: Shuffle the rows with this seed before ``limit`` is applied, so a
            limited load is a seeded random subset; ``None`` keeps file order.
        data_dir: The folder with the files; ``None`` finds it with
            :func:`find_gsm8k_dir`.

    Returns:
        Tasks with ids ``"gsm8k-<split>/<line number>"`` (stable across seeds),
        family ``"gsm8k"`` and kind ``"cot_number"``.

    Raises:
        InvalidTaskError: Unknown split, negative limit, or a malformed row.
        DataNotFoundError: The folder or the split's file is missing.

    Example:
        >>> len(load_gsm8k("test", limit=5))
        5

    """
    if split not in GSM8K_SPLITS:
        raise InvalidTaskError(f"split must be one of {GSM8K_SPLITS}, got {split!r}")
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 0):
        raise InvalidTaskError(f"limit must be None or an integer >= 0, got {limit!r}")
    folder = Path(data_dir) if data_dir is not None else find_gsm8k_dir()
    path = folder / f"{split}.jsonl"
    if not path.is_file():
        raise DataNotFoundError(f"GSM8K {split} split not found: expected {path}")
    tasks: list[Task] = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                question, solution = row["question"], row["answer"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise InvalidTaskError(f"{path}:{number + 1}: not a GSM8K row ({e})") from e
            tasks.append(
                Task(
                    id=f"gsm8k-{split}/{number}",
                    family="gsm8k",
                    prompt=f"{question.strip()}\n{INSTRUCTION}",
                    answer=final_answer(solution),
                    kind="cot_number",
                )
            )
    if seed is not None:
        random.Random(f"{seed}:gsm8k-{split}").shuffle(tasks)
    return tasks if limit is None else tasks[:limit]
