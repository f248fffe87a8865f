"""Reading answers out of free-form model output, and checking them.

A small chat model rarely answers with the bare answer: it writes "The answer is 7.",
"3 + 4 = 7", "Paris is the capital of France." or adds chatter. The rules below
accept those phrasings and reject wrong answers, erring on the side of rejecting:
a reward that pays for hedging or listing candidates would teach the wrong thing.

Numbers (kinds ``"number"``, ``"cot_number"``). Commas and ``$`` are dropped,
"-3" is negative (but "8-3" is two numbers), "7.0" equals "7". The answer is:

1. If the text has an answer marker ("answer is", "answer:", "answer =", "answer would
   be", "answer should be", "####"), the clause after the last marker, up to the end
   of its sentence or line: the number after its last "=" if it has one, else its first
   number. "The answer is 12, not 7" reads 12; "The answer is 3 + 4 = 7" reads 7.
   If that clause has no number, rule 2 applies to the text after the marker.
2. Otherwise the final number of the text. For kind ``"number"`` (short synthetic
   questions), numbers that appear in the prompt are skipped when another number
   exists, so "42 comes after 41" reads 42 and "8 is 3 + 5" reads 8, while
   "5 + 0 = 5" still reads 5. Kind ``"cot_number"`` (GSM8K) takes the final number
   as is, since a chain of thought reuses the question's numbers.

Number words ("seven") are not read; a response must write digits.

Facts (kind ``"fact"``). The answer or one of its aliases must occur as a whole
word (case, accents and surrounding punctuation ignored), and, once those
occurrences are removed, no distractor (another candidate answer of the family
that does not appear in the prompt) may occur: "Paris or Lyon" passes when Lyon is
no capital in the family, "Paris, Rome or Madrid" fails.

Larger of two (kind ``"larger"``). A marked answer (rule 1 above) decides. Else,
if only one of the two numbers appears, that one is the answer. If both appear,
the first comparative claim decides: "52 is larger/greater/bigger", "the larger
(number) is 52", "52 > 37", "37 < 52", "37 is smaller/less than 52". With no
claim, the response is ambiguous and rejected.

Example:
    >>> from langchain_capeval.tasks.answers import extract_number
    >>> extract_number("3 + 4 = 7.")
    Decimal('7')
    >>> str(extract_number("So the total is $1,234.50"))
    '1234.50'
    >>> extract_number("The answer is 12, not 7")
    Decimal('12')

"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Collection
from decimal import Decimal
from difflib import SequenceMatcher
from functools import lru_cache
from typing import TYPE_CHECKING

from langchain_capeval.tasks.base import parse_decimal

if TYPE_CHECKING:
    from langchain_capeval.tasks.base import Task

_NUMBER = re.compile(r"(?<![\w.])[-\u2212]?\$?[-\u2212]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")
_VERB = r"(?:is|(?:would|should|will)\s+be)"
_MARKER = re.compile(rf"\banswer(?:\s+{_VERB}\b\s*[:=]?|\s*[:=])|####", re.IGNORECASE)
_SENTENCE_END = re.compile(r"[.!?](?=\s|$)|\n")
_WORD = r"(?<![a-z0-9]){}(?![a-z0-9])"

_BIGGER = r"(?:larger|greater|bigger|higher)"
_SMALLER = r"(?:smaller|less|lower)"
_N = r"(-?\d+(?:\.\d+)?)"
_CLAIMS: tuple[tuple[re.Pattern[str], int], ...] = (
    (re.compile(rf"{_N}\s+is\s+(?:the\s+)?{_BIGGER}"), 1),
    (re.compile(rf"{_BIGGER}\s+(?:(?:number|one|value|of\s+the\s+two(?:\s+numbers)?)\s+)?is\s+{_N}"), 1),
    (re.compile(rf"{_N}\s*>\s*{_N}"), 1),
    (re.compile(rf"{_N}\s*<\s*{_N}"), 2),
    (re.compile(rf"{_N}\s+is\s+(?:the\s+)?{_SMALLER}(?:\s+than\s+{_N})?"), 2),
)


def numbers(text: str) -> list[Decimal]:
    """Return every number written in digits in ``text``, in order."""
    found = (parse_decimal(m.group()) for m in _NUMBER.finditer(text))
    return [n for n in found if n is not None]


def _marked_clause(text: str) -> tuple[str, str] | None:
    """Return (clause, rest) after the last answer marker, or ``None`` without a marker."""
    markers = list(_MARKER.finditer(text))
    if not markers:
        return None
    rest = text[markers[-1].end() :]
    end = _SENTENCE_END.search(rest)
    return (rest[: end.start()] if end else rest), rest


def marked_number(text: str) -> Decimal | None:
    """Return the number given after the last answer marker (rule 1), or ``None``."""
    found = _marked_clause(text)
    if found is None:
        return None
    clause, rest = found
    after_equals = clause.rsplit("=", 1)[-1] if "=" in clause else clause
    in_clause = numbers(after_equals)
    if in_clause:
        return in_clause[0]
    in_rest = numbers(rest)
    return in_rest[-1] if in_rest else None


def extract_number(text: str, *, skip: Collection[Decimal] = ()) -> Decimal | None:
    """Return the numeric answer of a response, or ``None`` if it gives none.

    Args:
        text: The response.
        skip: Numbers to pass over in the final-number rule when another number
            exists (the prompt's operands for short questions).

    Returns:
        The marked number (rule 1) if there is one, else the final number that is
        not in ``skip``, else the final number.

    Example:
        >>> extract_number("42 comes after 41.", skip={Decimal(41)})
        Decimal('42')
        >>> extract_number("I don't know.") is None
        True

    """
    marked = marked_number(text)
    if marked is not None:
        return marked
    found = numbers(text)
    if not found:
        return None
    fresh = [n for n in found if n not in skip]
    return fresh[-1] if fresh else found[-1]


def normalize(text: str) -> str:
    """Lower-case, strip accents and unify quotes and whitespace, for word matching."""
    decomposed = unicodedata.normalize("NFKD", text)
    plain = "".join(c for c in decomposed if not unicodedata.combining(c)).lower()
    plain = plain.replace("\u2019", "'").replace("\u2018", "'").replace("\u2011", "-")
    return " ".join(plain.split())


@lru_cache(maxsize=4096)
def word_pattern(phrase: str) -> re.Pattern[str]:
    """Return the compiled whole-word pattern of a phrase, to search normalised text with."""
    return re.compile(_WORD.format(re.escape(normalize(phrase))))


def contains_word(text: str, phrase: str) -> bool:
    """Whether ``phrase`` occurs in ``text`` as whole words (both normalised first)."""
    return word_pattern(phrase).search(normalize(text)) is not None


def check_fact(answer: str, aliases: Collection[str], distractors: Collection[str], response: str) -> bool:
    """Whether a response names the answer (or an alias) and no distractor.

    Example:
        >>> check_fact("Paris", (), ("Rome", "Madrid"), "Paris is the capital of France.")
        True
        >>> check_fact("Paris", (), ("Rome", "Madrid"), "Paris, Rome or Madrid.")
        False

    """
    text = normalize(response)
    forms = sorted({normalize(f) for f in (answer, *aliases)}, key=len, reverse=True)
    named = False
    for form in forms:
        pattern = word_pattern(form)
        if pattern.search(text):
            named = True
            text = pattern.sub(" ", text)
    if not named:
        return False
    return not any(word_pattern(d).search(text) for d in distractors)


def larger_claim(text: str, options: tuple[Decimal, Decimal]) -> Decimal | None:
    """Return which of two numbers a response says is larger, or ``None`` if it does not say."""
    marked = marked_number(text)
    if marked is not None:
        return marked
    named = {n for n in numbers(text) if n in options}
    if len(named) == 1:
        return named.pop()
    if not named:
        return None
    plain = normalize(text).replace(",", "")
    claims: list[tuple[int, Decimal]] = []
    for pattern, group in _CLAIMS:
        for match in pattern.finditer(plain):
            value = match.group(group)
            claimed = parse_decimal(value) if value is not None else None
            if claimed in options:
                claims.append((match.start(), claimed))
    return min(claims)[1] if claims else None


def check(task: Task, response: str) -> bool:
    """Whether ``response`` gives the task's answer, by the rules of its kind.

    Args:
        task: The task answered.
        response: The model's free-form response text.

    Returns:
        ``True`` if the checker of ``task.kind`` accepts the response.

    Example:
        >>> from langchain_capeval.tasks.base import Task
        >>> t = Task(id="add1/3+4", family="add1", prompt="What is 3 + 4?", answer="7")
        >>> check(t, "3 + 4 = 7"), check(t, "3 + 4 = 8"), check(t, "The answer is 7.0.")
        (True, False, True)

    """
    if task.kind == "fact":
        return check_fact(task.answer, task.aliases, task.distractors, response)
    answer = parse_decimal(task.answer)
    if task.kind == "larger":
        other = parse_decimal(task.distractors[0])
        assert answer is not None and other is not None  # validated by Task
        return larger_claim(response, (answer, other)) == answer
    skip = set(numbers(task.prompt)) if task.kind == "number" else set()
    return extract_number(response, skip=skip) == answer


PARTIAL_CREDIT_MAX = 0.5
"""The most a wrong response earns in :func:`partial_credit`; a right one earns 1.0."""


def _closeness(response: str, forms: Collection[str]) -> float:
    """Best character similarity in [0, 1] between a form and a same-length word span of the response."""
    words = normalize(response).split()
    best = 0.0
    for form in forms:
        target = normalize(form)
        k = len(target.split())
        for i in range(max(1, len(words) - k + 1)):
            best = max(best, SequenceMatcher(None, target, " ".join(words[i : i + k])).ratio())
    return best


def partial_credit(task: Task, response: str) -> float:
    """A graded reward: 1.0 for a right response, less for a wrong one the nearer it is.

    The checker's 0/1 makes every wrong answer to a prompt tie with every other, so on a
    prompt no sample solves every sample's win-or-tie target is 1, as a right answer's is
    (docs/training.md section 10). A graded reward, as the paper's reward model gives,
    separates near misses from far ones. A wrong response earns at most
    :data:`PARTIAL_CREDIT_MAX` (so it never ties a right one under a tie margin below 0.5):

    - a numeric answer (kinds ``"number"``, ``"cot_number"``, and ``"fact"`` answers that are
      numbers): ``0.5 / (1 + |read - answer| / max(1, |answer|))``, 0 if no number is read;
    - a ``"fact"`` answer in words: 0.5 x the best character similarity
      (:class:`difflib.SequenceMatcher` ratio) between the answer or an alias and a span of
      the response with as many words ("Caracupem" is nearer "Caracas" than "Lima" is);
    - ``"larger"``: 0 (the only wrong answer is the other number).

    Example:
        >>> from langchain_capeval.tasks.base import Task
        >>> t = Task(id="add1/3+4", family="add1", prompt="What is 3 + 4?", answer="7")
        >>> [round(partial_credit(t, r), 3) for r in ("3 + 4 = 7", "3 + 4 = 8", "3 + 4 = 12", "No idea.")]
        [1.0, 0.438, 0.292, 0.0]
        >>> c = Task(id="capitals/venezuela", family="capitals", prompt="What is the capital of Venezuela?",
        ...          answer="Caracas", kind="fact", distractors=("Lima",))
        >>> partial_credit(c, "It is Caracupem.") > partial_credit(c, "It is Lima.")
        True

    """
    if check(task, response):
        return 1.0
    if task.kind == "larger":
        return 0.0
    answer = parse_decimal(task.answer)
    if answer is None:  # a fact in words
        return PARTIAL_CREDIT_MAX * _closeness(response, (task.answer, *task.aliases))
    skip = set(numbers(task.prompt)) if task.kind == "number" else set()
    read = extract_number(response, skip=skip)
    if read is None:
        return 0.0
    return PARTIAL_CREDIT_MAX / (1.0 + float(abs(read - answer)) / max(1.0, float(abs(answer))))
