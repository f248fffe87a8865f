"""A seeded synthetic task suite sized to a very small chat model.

Thirteen families of short questions that a 135M-parameter model answers sometimes
but not always, so on-policy samples of one prompt differ in quality (the
material of win-or-tie preferences) and some prompts are out of reach (where a
capability-aware model should stop sampling). Everything is generated from
tables in this module: no network, no downloaded data.

============  =====  ==========================================  =======
family        pool   example prompt                              kind
============  =====  ==========================================  =======
add1             81  What is 3 + 5?                              number
add2           8100  What is 37 + 52?                            number
sub1             55  What is 7 - 3?                              number
mul1             64  What is 6 times 7?                          number
next_number     990  What number comes after 41?                 number
compare        8010  Which is larger, 37 or 52?                  larger
capitals         64  What is the capital of France?              fact
opposites        64  What is the opposite of "hot"?              fact
colors           53  What color is a banana?                     fact
animal_legs      52  How many legs does a spider have?           fact
languages        53  What language is spoken in Brazil?          fact
continents       54  On which continent is Kenya?                fact
plurals          53  What is the plural of "mouse"?              fact
============  =====  ==========================================  =======

:func:`build_suite` draws ``n = min(n_per_family, pool)`` distinct tasks per family
with a seeded generator and splits them into test and dev of ``n // 6`` tasks each
and train of the rest (60 tasks: 40/10/10; 55: 37/9/9; 54: 36/9/9; 53: 37/8/8; 52: 36/8/8).
A task belongs to one split only, so no prompt is in two splits.

Example:
    >>> from langchain_capeval.tasks.synthetic import build_suite
    >>> splits = build_suite(["add1", "capitals"], n_per_family=60, seed=0)
    >>> splits.sizes()
    {'train': 80, 'dev': 20, 'test': 20}
    >>> splits == build_suite(["add1", "capitals"], n_per_family=60, seed=0)
    True

"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence

from langchain_capeval.errors import InvalidTaskError, UnknownTaskFamilyError
from langchain_capeval.tasks.answers import normalize, word_pattern
from langchain_capeval.tasks.base import Splits, Task, TaskFamily

DEFAULT_N_PER_FAMILY = 60
"""Default number of tasks drawn per family (40/10/10 train/dev/test)."""

FactRow = tuple[str, str, str, tuple[str, ...]]
"""One fact: (key, prompt, answer, aliases)."""

# --- the fact tables -------------------------------------------------------------------

_CAPITALS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("France", "Paris", ()),
    ("Germany", "Berlin", ()),
    ("Italy", "Rome", ()),
    ("Spain", "Madrid", ()),
    ("Portugal", "Lisbon", ()),
    ("the United Kingdom", "London", ()),
    ("Ireland", "Dublin", ()),
    ("the Netherlands", "Amsterdam", ()),
    ("Belgium", "Brussels", ()),
    ("Switzerland", "Bern", ("Berne",)),
    ("Austria", "Vienna", ()),
    ("Poland", "Warsaw", ()),
    ("the Czech Republic", "Prague", ()),
    ("Hungary", "Budapest", ()),
    ("Greece", "Athens", ()),
    ("Sweden", "Stockholm", ()),
    ("Norway", "Oslo", ()),
    ("Denmark", "Copenhagen", ()),
    ("Finland", "Helsinki", ()),
    ("Iceland", "Reykjavik", ()),
    ("Russia", "Moscow", ()),
    ("Ukraine", "Kyiv", ("Kiev",)),
    ("Romania", "Bucharest", ()),
    ("Bulgaria", "Sofia", ()),
    ("Serbia", "Belgrade", ()),
    ("Croatia", "Zagreb", ()),
    ("Turkey", "Ankara", ()),
    ("Egypt", "Cairo", ()),
    ("Kenya", "Nairobi", ()),
    ("Nigeria", "Abuja", ()),
    ("Ethiopia", "Addis Ababa", ()),
    ("Morocco", "Rabat", ()),
    ("Ghana", "Accra", ()),
    ("Senegal", "Dakar", ()),
    ("Japan", "Tokyo", ()),
    ("China", "Beijing", ("Peking",)),
    ("South Korea", "Seoul", ()),
    ("India", "New Delhi", ("Delhi",)),
    ("Pakistan", "Islamabad", ()),
    ("Bangladesh", "Dhaka", ("Dacca",)),
    ("Thailand", "Bangkok", ()),
    ("Vietnam", "Hanoi", ()),
    ("the Philippines", "Manila", ()),
    ("Indonesia", "Jakarta", ()),
    ("Malaysia", "Kuala Lumpur", ()),
    ("Nepal", "Kathmandu", ()),
    ("Iran", "Tehran", ("Teheran",)),
    ("Iraq", "Baghdad", ()),
    ("Saudi Arabia", "Riyadh", ()),
    ("Israel", "Jerusalem", ()),
    ("Afghanistan", "Kabul", ()),
    ("Australia", "Canberra", ()),
    ("New Zealand", "Wellington", ()),
    ("Canada", "Ottawa", ()),
    ("the United States", "Washington, D.C.", ("Washington", "Washington DC", "Washington D.C.")),
    ("Mexico", "Mexico City", ()),
    ("Argentina", "Buenos Aires", ()),
    ("Brazil", "Brasília", ("Brasilia",)),
    ("Chile", "Santiago", ()),
    ("Peru", "Lima", ()),
    ("Colombia", "Bogotá", ("Bogota",)),
    ("Venezuela", "Caracas", ()),
    ("Cuba", "Havana", ()),
    ("Jamaica", "Kingston", ()),
)

_OPPOSITES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("hot", "cold", ()),
    ("big", "small", ("little", "tiny")),
    ("fast", "slow", ()),
    ("happy", "sad", ("unhappy",)),
    ("wet", "dry", ()),
    ("tall", "short", ()),
    ("rich", "poor", ()),
    ("empty", "full", ()),
    ("clean", "dirty", ("messy",)),
    ("love", "hate", ()),
    ("win", "lose", ("loss", "losing")),
    ("strong", "weak", ()),
    ("loud", "quiet", ("silent", "soft")),
    ("thick", "thin", ()),
    ("true", "false", ("untrue",)),
    ("push", "pull", ()),
    ("inside", "outside", ()),
    ("day", "night", ()),
    ("hard", "soft", ("easy",)),
    ("open", "closed", ("shut",)),
    ("above", "below", ("beneath", "under")),
    ("buy", "sell", ()),
    ("laugh", "cry", ()),
    ("sweet", "sour", ("bitter",)),
    ("friend", "enemy", ("foe",)),
    ("north", "south", ()),
    ("east", "west", ()),
    ("summer", "winter", ()),
    ("remember", "forget", ()),
    ("brave", "cowardly", ("coward", "afraid", "scared", "fearful", "timid")),
    ("wide", "narrow", ()),
    ("deep", "shallow", ()),
    ("sharp", "dull", ("blunt",)),
    ("smooth", "rough", ()),
    ("cheap", "expensive", ("costly",)),
    ("safe", "dangerous", ("unsafe",)),
    ("asleep", "awake", ()),
    ("alive", "dead", ()),
    ("sick", "healthy", ()),
    ("arrive", "depart", ("leave",)),
    ("accept", "reject", ("refuse", "decline")),
    ("polite", "rude", ("impolite",)),
    ("ancient", "modern", ()),
    ("beautiful", "ugly", ()),
    ("generous", "selfish", ("stingy", "greedy")),
    ("kind", "cruel", ("unkind",)),
    ("import", "export", ()),
    ("increase", "decrease", ("reduce",)),
    ("maximum", "minimum", ()),
    ("victory", "defeat", ("loss",)),
    ("entrance", "exit", ()),
    ("major", "minor", ()),
    ("inhale", "exhale", ()),
    ("freeze", "melt", ("thaw",)),
    ("floor", "ceiling", ("roof",)),
    ("husband", "wife", ()),
    ("king", "queen", ()),
    ("boy", "girl", ()),
    ("forward", "backward", ("backwards",)),
    ("male", "female", ()),
    ("success", "failure", ("fail",)),
    ("visible", "invisible", ()),
    ("dawn", "dusk", ("sunset", "twilight", "nightfall")),
    ("top", "bottom", ()),
)

_COLORS: tuple[tuple[str, str], ...] = (
    ("a banana", "yellow"),
    ("a lemon", "yellow"),
    ("a school bus", "yellow"),
    ("a canary", "yellow"),
    ("an egg yolk", "yellow"),
    ("a sunflower", "yellow"),
    ("grass", "green"),
    ("a frog", "green"),
    ("a lime", "green"),
    ("a cucumber", "green"),
    ("a pea", "green"),
    ("an emerald", "green"),
    ("lettuce", "green"),
    ("broccoli", "green"),
    ("the sky", "blue"),
    ("the ocean", "blue"),
    ("a blueberry", "blue"),
    ("a sapphire", "blue"),
    ("snow", "white"),
    ("milk", "white"),
    ("a cloud", "white"),
    ("a polar bear", "white"),
    ("a swan", "white"),
    ("salt", "white"),
    ("sugar", "white"),
    ("coal", "black"),
    ("a crow", "black"),
    ("a raven", "black"),
    ("charcoal", "black"),
    ("a tire", "black"),
    ("a tomato", "red"),
    ("a strawberry", "red"),
    ("blood", "red"),
    ("a fire truck", "red"),
    ("a ruby", "red"),
    ("a cherry", "red"),
    ("chocolate", "brown"),
    ("cinnamon", "brown"),
    ("a chestnut", "brown"),
    ("a coconut", "brown"),
    ("a carrot", "orange"),
    ("a pumpkin", "orange"),
    ("a tangerine", "orange"),
    ("a flamingo", "pink"),
    ("a pig", "pink"),
    ("an eggplant", "purple"),
    ("lavender", "purple"),
    ("an amethyst", "purple"),
    ("a plum", "purple"),
    ("an elephant", "gray"),
    ("ash", "gray"),
    ("a koala", "gray"),
    ("a rhino", "gray"),
)

_COLOR_ALIASES: dict[str, tuple[str, ...]] = {"gray": ("grey",), "purple": ("violet",)}

_LEGS: tuple[tuple[str, int], ...] = (
    ("a spider", 8),
    ("a scorpion", 8),
    ("a tick", 8),
    ("an ant", 6),
    ("a bee", 6),
    ("a butterfly", 6),
    ("a beetle", 6),
    ("a fly", 6),
    ("a mosquito", 6),
    ("a ladybug", 6),
    ("a grasshopper", 6),
    ("a cockroach", 6),
    ("a crab", 10),
    ("a lobster", 10),
    ("a shrimp", 10),
    ("a dog", 4),
    ("a cat", 4),
    ("a horse", 4),
    ("a cow", 4),
    ("an elephant", 4),
    ("a lion", 4),
    ("a tiger", 4),
    ("a giraffe", 4),
    ("a zebra", 4),
    ("a pig", 4),
    ("a sheep", 4),
    ("a goat", 4),
    ("a rabbit", 4),
    ("a frog", 4),
    ("a lizard", 4),
    ("a turtle", 4),
    ("a crocodile", 4),
    ("a camel", 4),
    ("a bear", 4),
    ("a wolf", 4),
    ("a chicken", 2),
    ("a duck", 2),
    ("an ostrich", 2),
    ("a penguin", 2),
    ("an owl", 2),
    ("a parrot", 2),
    ("an eagle", 2),
    ("a person", 2),
    ("a flamingo", 2),
    ("a goose", 2),
    ("a snake", 0),
    ("a fish", 0),
    ("a worm", 0),
    ("a snail", 0),
    ("a whale", 0),
    ("a dolphin", 0),
    ("a shark", 0),
)

_LEG_WORDS: dict[int, tuple[str, ...]] = {
    0: (
        "zero",
        "none",
        "no legs",
        "legless",
        "does not have legs",
        "does not have any legs",
        "doesn't have legs",
        "doesn't have any legs",
        "do not have legs",
        "do not have any legs",
        "don't have legs",
        "don't have any legs",
    ),
    2: ("two",),
    4: ("four",),
    6: ("six",),
    8: ("eight",),
    10: ("ten",),
}


_LANGUAGES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("France", "French", ()),
    ("Germany", "German", ()),
    ("Spain", "Spanish", ()),
    ("Italy", "Italian", ()),
    ("Portugal", "Portuguese", ()),
    ("Brazil", "Portuguese", ()),
    ("Mexico", "Spanish", ()),
    ("Argentina", "Spanish", ()),
    ("Colombia", "Spanish", ()),
    ("Peru", "Spanish", ()),
    ("Chile", "Spanish", ()),
    ("Cuba", "Spanish", ()),
    ("Japan", "Japanese", ()),
    ("China", "Chinese", ("Mandarin",)),
    ("South Korea", "Korean", ()),
    ("Vietnam", "Vietnamese", ()),
    ("Thailand", "Thai", ()),
    ("Russia", "Russian", ()),
    ("Ukraine", "Ukrainian", ()),
    ("Poland", "Polish", ()),
    ("the Czech Republic", "Czech", ()),
    ("Slovakia", "Slovak", ("Slovakian",)),
    ("Hungary", "Hungarian", ()),
    ("Romania", "Romanian", ()),
    ("Bulgaria", "Bulgarian", ()),
    ("Greece", "Greek", ()),
    ("Turkey", "Turkish", ()),
    ("Sweden", "Swedish", ()),
    ("Norway", "Norwegian", ()),
    ("Denmark", "Danish", ()),
    ("Finland", "Finnish", ()),
    ("Iceland", "Icelandic", ()),
    ("the Netherlands", "Dutch", ()),
    ("Austria", "German", ()),
    ("Croatia", "Croatian", ()),
    ("Serbia", "Serbian", ()),
    ("Slovenia", "Slovenian", ("Slovene",)),
    ("Lithuania", "Lithuanian", ()),
    ("Latvia", "Latvian", ()),
    ("Estonia", "Estonian", ()),
    ("Albania", "Albanian", ()),
    ("Armenia", "Armenian", ()),
    ("Mongolia", "Mongolian", ()),
    ("Iran", "Persian", ("Farsi",)),
    ("Egypt", "Arabic", ()),
    ("Saudi Arabia", "Arabic", ()),
    ("Morocco", "Arabic", ()),
    ("Israel", "Hebrew", ()),
    ("Indonesia", "Indonesian", ()),
    ("Malaysia", "Malay", ("Malaysian",)),
    ("Pakistan", "Urdu", ()),
    ("Bangladesh", "Bengali", ("Bangla",)),
    ("Ethiopia", "Amharic", ()),
)

_CONTINENTS: tuple[tuple[str, str], ...] = (
    ("France", "Europe"),
    ("Germany", "Europe"),
    ("Italy", "Europe"),
    ("Spain", "Europe"),
    ("Poland", "Europe"),
    ("Sweden", "Europe"),
    ("Greece", "Europe"),
    ("Portugal", "Europe"),
    ("Norway", "Europe"),
    ("Hungary", "Europe"),
    ("Ireland", "Europe"),
    ("Belgium", "Europe"),
    ("Kenya", "Africa"),
    ("Nigeria", "Africa"),
    ("Ghana", "Africa"),
    ("Ethiopia", "Africa"),
    ("Morocco", "Africa"),
    ("South Africa", "Africa"),
    ("Senegal", "Africa"),
    ("Tanzania", "Africa"),
    ("Uganda", "Africa"),
    ("Zimbabwe", "Africa"),
    ("Algeria", "Africa"),
    ("Angola", "Africa"),
    ("Japan", "Asia"),
    ("China", "Asia"),
    ("India", "Asia"),
    ("Thailand", "Asia"),
    ("Vietnam", "Asia"),
    ("Indonesia", "Asia"),
    ("Pakistan", "Asia"),
    ("Mongolia", "Asia"),
    ("Nepal", "Asia"),
    ("South Korea", "Asia"),
    ("the Philippines", "Asia"),
    ("Malaysia", "Asia"),
    ("Canada", "North America"),
    ("Mexico", "North America"),
    ("the United States", "North America"),
    ("Guatemala", "North America"),
    ("Cuba", "North America"),
    ("Honduras", "North America"),
    ("Panama", "North America"),
    ("Jamaica", "North America"),
    ("Brazil", "South America"),
    ("Argentina", "South America"),
    ("Peru", "South America"),
    ("Chile", "South America"),
    ("Colombia", "South America"),
    ("Venezuela", "South America"),
    ("Bolivia", "South America"),
    ("Ecuador", "South America"),
    ("Uruguay", "South America"),
    ("Paraguay", "South America"),
)

_CONTINENT_ADJECTIVES: dict[str, tuple[str, ...]] = {
    "Europe": ("European",),
    "Africa": ("African",),
    "Asia": ("Asian",),
    "North America": ("North American",),
    "South America": ("South American",),
}

_PLURALS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("mouse", "mice", ()),
    ("goose", "geese", ()),
    ("man", "men", ()),
    ("woman", "women", ()),
    ("tooth", "teeth", ()),
    ("foot", "feet", ()),
    ("ox", "oxen", ()),
    ("louse", "lice", ()),
    ("cactus", "cacti", ("cactuses",)),
    ("fungus", "fungi", ("funguses",)),
    ("nucleus", "nuclei", ()),
    ("radius", "radii", ()),
    ("crisis", "crises", ()),
    ("analysis", "analyses", ()),
    ("thesis", "theses", ()),
    ("phenomenon", "phenomena", ()),
    ("criterion", "criteria", ()),
    ("leaf", "leaves", ()),
    ("knife", "knives", ()),
    ("wife", "wives", ()),
    ("wolf", "wolves", ()),
    ("half", "halves", ()),
    ("loaf", "loaves", ()),
    ("shelf", "shelves", ()),
    ("calf", "calves", ()),
    ("thief", "thieves", ()),
    ("potato", "potatoes", ()),
    ("tomato", "tomatoes", ()),
    ("hero", "heroes", ()),
    ("echo", "echoes", ()),
    ("volcano", "volcanoes", ("volcanos",)),
    ("city", "cities", ()),
    ("baby", "babies", ()),
    ("party", "parties", ()),
    ("story", "stories", ()),
    ("lady", "ladies", ()),
    ("cherry", "cherries", ()),
    ("box", "boxes", ()),
    ("fox", "foxes", ()),
    ("bus", "buses", ("busses",)),
    ("church", "churches", ()),
    ("dish", "dishes", ()),
    ("glass", "glasses", ()),
    ("watch", "watches", ()),
    ("brush", "brushes", ()),
    ("kiss", "kisses", ()),
    ("die", "dice", ()),
    ("index", "indices", ("indexes",)),
    ("matrix", "matrices", ("matrixes",)),
    ("appendix", "appendices", ("appendixes",)),
    ("bacterium", "bacteria", ()),
    ("medium", "media", ("mediums",)),
    ("alumnus", "alumni", ()),
)


# --- building families -----------------------------------------------------------------


def _slug(text: str) -> str:
    """Return a lower-case, dash-separated key for a task id."""
    words = re.sub(r"^(?:a|an|the)\s+", "", normalize(text))
    return re.sub(r"[^a-z0-9]+", "-", words).strip("-")


def _fact_family(name: str, description: str, rows: Sequence[FactRow]) -> TaskFamily:
    """Build a ``"fact"`` family whose distractors are the other rows' answers.

    A task's distractors are every answer and alias of the family except its own
    and those that occur in its prompt ("hot" is no wrong answer to the opposite
    of "hot").
    """
    all_forms = sorted({form for _, _, answer, aliases in rows for form in (answer, *aliases)})
    plain = {form: normalize(form) for form in all_forms}

    def make(index: int) -> Task:
        key, prompt, answer, aliases = rows[index]
        own = {plain[f] for f in (answer, *aliases)}
        plain_prompt = normalize(prompt)
        distractors = tuple(f for f in all_forms if plain[f] not in own and not word_pattern(f).search(plain_prompt))
        return Task(
            id=f"{name}/{key}",
            family=name,
            prompt=prompt,
            answer=answer,
            kind="fact",
            aliases=aliases,
            distractors=distractors,
        )

    return TaskFamily(name=name, description=description, size=len(rows), make=make)


def _add1(index: int) -> Task:
    """Build ``a + b`` for one-digit ``a, b`` in 1..9."""
    a, b = divmod(index, 9)
    a, b = a + 1, b + 1
    return Task(id=f"add1/{a}+{b}", family="add1", prompt=f"What is {a} + {b}?", answer=str(a + b))


def _add2(index: int) -> Task:
    """Build ``a + b`` for two-digit ``a, b`` in 10..99."""
    a, b = divmod(index, 90)
    a, b = a + 10, b + 10
    return Task(id=f"add2/{a}+{b}", family="add2", prompt=f"What is {a} + {b}?", answer=str(a + b))


_SUB1_PAIRS: tuple[tuple[int, int], ...] = tuple((a, b) for a in range(10) for b in range(a + 1))


def _sub1(index: int) -> Task:
    """Build ``a - b`` for one-digit ``b <= a``."""
    a, b = _SUB1_PAIRS[index]
    return Task(id=f"sub1/{a}-{b}", family="sub1", prompt=f"What is {a} - {b}?", answer=str(a - b))


def _mul1(index: int) -> Task:
    """Build ``a x b`` for one-digit ``a, b`` in 2..9."""
    a, b = divmod(index, 8)
    a, b = a + 2, b + 2
    return Task(id=f"mul1/{a}x{b}", family="mul1", prompt=f"What is {a} times {b}?", answer=str(a * b))


def _next_number(index: int) -> Task:
    """Build "what comes after ``n``" for ``n`` in 10..999."""
    n = index + 10
    return Task(id=f"next_number/{n}", family="next_number", prompt=f"What number comes after {n}?", answer=str(n + 1))


def _compare(index: int) -> Task:
    """Build "which is larger" for two different two-digit numbers, in either order."""
    a, rest = divmod(index, 89)
    a += 10
    b = rest + 10 if rest + 10 < a else rest + 11
    return Task(
        id=f"compare/{a}_vs_{b}",
        family="compare",
        prompt=f"Which is larger, {a} or {b}?",
        answer=str(max(a, b)),
        kind="larger",
        distractors=(str(min(a, b)),),
    )


FAMILIES: dict[str, TaskFamily] = {
    "add1": TaskFamily("add1", "One-digit addition.", 81, _add1),
    "add2": TaskFamily("add2", "Two-digit addition.", 90 * 90, _add2),
    "sub1": TaskFamily("sub1", "One-digit subtraction with a non-negative result.", len(_SUB1_PAIRS), _sub1),
    "mul1": TaskFamily("mul1", "One-digit multiplication.", 64, _mul1),
    "next_number": TaskFamily("next_number", "The number after a two- or three-digit number.", 990, _next_number),
    "compare": TaskFamily("compare", "The larger of two two-digit numbers.", 90 * 89, _compare),
    "capitals": _fact_family(
        "capitals",
        "The capital city of a country.",
        [(_slug(c), f"What is the capital of {c}?", cap, al) for c, cap, al in _CAPITALS],
    ),
    "opposites": _fact_family(
        "opposites",
        "The opposite of a common word.",
        [(_slug(w), f'What is the opposite of "{w}"?', ans, al) for w, ans, al in _OPPOSITES],
    ),
    "colors": _fact_family(
        "colors",
        "The usual color of a thing.",
        [(_slug(t), f"What color is {t}?", c, _COLOR_ALIASES.get(c, ())) for t, c in _COLORS],
    ),
    "animal_legs": _fact_family(
        "animal_legs",
        "How many legs an animal has.",
        [(_slug(a), f"How many legs does {a} have?", str(n), _LEG_WORDS[n]) for a, n in _LEGS],
    ),
    "languages": _fact_family(
        "languages",
        "The main language of a country.",
        [(_slug(c), f"What language is spoken in {c}?", lang, al) for c, lang, al in _LANGUAGES],
    ),
    "continents": _fact_family(
        "continents",
        "The continent a country is in.",
        [(_slug(c), f"On which continent is {c}?", cont, _CONTINENT_ADJECTIVES[cont]) for c, cont in _CONTINENTS],
    ),
    "plurals": _fact_family(
        "plurals",
        "The plural of an English noun.",
        [(_slug(w), f'What is the plural of "{w}"?', p, al) for w, p, al in _PLURALS],
    ),
}
"""The registry of synthetic families, by name."""


def get_family(name: str) -> TaskFamily:
    """Return a registered family, or raise :class:`UnknownTaskFamilyError` naming the valid ones."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise UnknownTaskFamilyError(name, list(FAMILIES)) from None


def build_suite(
    families: Sequence[str] | None = None, n_per_family: int = DEFAULT_N_PER_FAMILY, seed: int = 0
) -> Splits:
    """Draw a seeded synthetic suite and split it into disjoint train/dev/test.

    Args:
        families: Family names to include; ``None`` means all of :data:`FAMILIES`.
        n_per_family: Tasks drawn per family; a family with a smaller pool
            contributes its whole pool.
        seed: Seed of the draw and of the order inside each split. The same
            arguments always give the same splits.

    Returns:
        Per family, ``n // 6`` tasks to test, ``n // 6`` to dev and the rest to
        train, where ``n = min(n_per_family, pool size)``; each split is then
        shuffled with the seed so that families are interleaved.

    Raises:
        UnknownTaskFamilyError: A name is not in :data:`FAMILIES`.
        InvalidTaskError: ``families`` is empty or repeats a name, or
            ``n_per_family`` is not a positive integer.

    Example:
        >>> s = build_suite(["opposites"], n_per_family=1000, seed=3)
        >>> s.sizes()
        {'train': 44, 'dev': 10, 'test': 10}
        >>> build_suite(["cube_roots"])  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        langchain_capeval.errors.UnknownTaskFamilyError: unknown task family 'cube_roots'; valid families: add1, ...

    """
    names = list(FAMILIES) if families is None else list(families)
    if isinstance(families, str) or not names or len(set(names)) != len(names):
        raise InvalidTaskError(f"families must be a non-empty sequence of distinct names, got {families!r}")
    if not isinstance(n_per_family, int) or isinstance(n_per_family, bool) or n_per_family < 1:
        raise InvalidTaskError(f"n_per_family must be an integer >= 1, got {n_per_family!r}")
    chosen = [get_family(name) for name in names]
    train: list[Task] = []
    dev: list[Task] = []
    test: list[Task] = []
    for family in chosen:
        tasks = family.sample(n_per_family, seed)
        k = len(tasks) // 6
        test += tasks[:k]
        dev += tasks[k : 2 * k]
        train += tasks[2 * k :]
    rng = random.Random(f"{seed}:splits")
    for split in (train, dev, test):
        rng.shuffle(split)
    return Splits(train=tuple(train), dev=tuple(dev), test=tuple(test))
