from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

import pytest

from langchain_capeval.errors import DataNotFoundError, InvalidTaskError, UnknownTaskFamilyError
from langchain_capeval.tasks import FAMILIES, Task, build_suite, check, extract_number, find_gsm8k_dir, load_gsm8k
from langchain_capeval.tasks.answers import PARTIAL_CREDIT_MAX, partial_credit
from langchain_capeval.tasks.gsm8k import GSM8K_DIR_ENV, final_answer
from langchain_capeval.tasks.synthetic import get_family


def task_of(family: str, key: str) -> Task:
    """The task of a family whose id is ``family/key``."""
    fam = FAMILIES[family]
    for i in range(fam.size):
        t = fam.task(i)
        if t.id == f"{family}/{key}":
            return t
    raise AssertionError(f"no task {family}/{key}")


# --- Task --------------------------------------------------------------------------------


def test_task_messages_and_validation() -> None:
    t = Task(id="add1/3+4", family="add1", prompt="What is 3 + 4?", answer="7")
    assert t.messages() == [{"role": "user", "content": "What is 3 + 4?"}]
    with pytest.raises(InvalidTaskError, match="prompt"):
        Task(id="x", family="add1", prompt="  ", answer="7")
    with pytest.raises(InvalidTaskError, match="kind"):
        Task(id="x", family="add1", prompt="q", answer="7", kind="essay")  # type: ignore[arg-type]
    with pytest.raises(InvalidTaskError, match="one distractor"):
        Task(id="x", family="compare", prompt="q", answer="7", kind="larger", distractors=("7",))
    with pytest.raises(InvalidTaskError, match="aliases"):
        Task(id="x", family="f", prompt="q", answer="a", kind="fact", aliases="b")  # type: ignore[arg-type]
    assert Task(id="x", family="f", prompt="q", answer="a", kind="fact", aliases=["b"]).aliases == ("b",)


# --- the synthetic suite -------------------------------------------------------------------


def test_registry_has_the_families() -> None:
    expected = {
        "add1",
        "add2",
        "sub1",
        "mul1",
        "next_number",
        "compare",
        "capitals",
        "opposites",
        "colors",
        "animal_legs",
    }
    expected |= {"languages", "continents", "plurals"}
    assert set(FAMILIES) == expected
    for name, fam in FAMILIES.items():
        tasks = [fam.task(i) for i in range(min(fam.size, 200))]
        assert all(t.family == name and t.id.startswith(f"{name}/") for t in tasks)
        assert len({t.prompt for t in tasks}) == len(tasks), name


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_whole_pool_has_distinct_prompts_and_ids(name: str) -> None:
    fam = FAMILIES[name]
    tasks = [fam.task(i) for i in range(fam.size)]
    assert len({t.prompt for t in tasks}) == fam.size
    assert len({t.id for t in tasks}) == fam.size


def test_arithmetic_answers_are_right() -> None:
    for name, op in (("add1", int.__add__), ("add2", int.__add__), ("sub1", int.__sub__)):
        fam = FAMILIES[name]
        for i in range(0, fam.size, 7):
            t = fam.task(i)
            a, sym, b = t.prompt.removeprefix("What is ").removesuffix("?").split()
            assert sym in "+-"
            assert int(t.answer) == op(int(a), int(b)) >= 0
    assert all(1 <= int(a) <= 9 for t in map(FAMILIES["add1"].task, range(81)) for a in t.id[5:].split("+"))
    products = [FAMILIES["mul1"].task(i) for i in range(FAMILIES["mul1"].size)]
    for t in products:
        a, b = (int(x) for x in t.prompt.removeprefix("What is ").removesuffix("?").split(" times "))
        assert 2 <= a <= 9 and 2 <= b <= 9 and int(t.answer) == a * b
    assert len({(t.prompt, t.answer) for t in products}) == 64
    cmp_ = FAMILIES["compare"]
    for i in range(0, cmp_.size, 97):
        t = cmp_.task(i)
        a, b = (int(x) for x in t.prompt.removeprefix("Which is larger, ").removesuffix("?").split(" or "))
        assert a != b and t.answer == str(max(a, b)) and t.distractors == (str(min(a, b)),)


def test_build_suite_is_deterministic_and_disjoint() -> None:
    a = build_suite(seed=0)
    b = build_suite(seed=0)
    c = build_suite(seed=1)
    assert a == b
    assert a != c
    prompts = {name: {t.prompt for t in tasks} for name, tasks in a.items()}
    assert not prompts["train"] & prompts["dev"]
    assert not prompts["train"] & prompts["test"]
    assert not prompts["dev"] & prompts["test"]
    for name, tasks in a.items():
        assert len(prompts[name]) == len(tasks)


def test_split_sizes_per_family() -> None:
    s = build_suite(n_per_family=60, seed=0)
    expected = {
        "add1": (40, 10, 10),
        "add2": (40, 10, 10),
        "sub1": (37, 9, 9),
        "next_number": (40, 10, 10),
        "compare": (40, 10, 10),
        "capitals": (40, 10, 10),
        "opposites": (40, 10, 10),
        "colors": (37, 8, 8),
        "animal_legs": (36, 8, 8),
        "mul1": (40, 10, 10),
        "languages": (37, 8, 8),
        "continents": (36, 9, 9),
        "plurals": (37, 8, 8),
    }
    got = {f: tuple(len(s.by_family(split).get(f, [])) for split in ("train", "dev", "test")) for f in FAMILIES}
    assert got == expected
    assert s.sizes() == {"train": 500, "dev": 120, "test": 120}


def test_build_suite_families_and_errors() -> None:
    s = build_suite(["capitals", "add2"], n_per_family=12, seed=5)
    assert {t.family for t in s.train + s.dev + s.test} == {"capitals", "add2"}
    assert s.sizes() == {"train": 16, "dev": 4, "test": 4}
    with pytest.raises(UnknownTaskFamilyError, match=r"'cube_roots'.*add1.*animal_legs") as err:
        build_suite(["add1", "cube_roots"])
    assert isinstance(err.value, ValueError)
    with pytest.raises(InvalidTaskError):
        build_suite(["add1", "add1"])
    with pytest.raises(InvalidTaskError):
        build_suite([])
    with pytest.raises(InvalidTaskError):
        build_suite("add1")
    with pytest.raises(InvalidTaskError):
        build_suite(n_per_family=0)
    with pytest.raises(UnknownTaskFamilyError):
        get_family("Add1")


def test_same_seed_same_tasks_whatever_else_is_in_the_suite() -> None:
    alone = build_suite(["capitals"], seed=4)
    mixed = build_suite(["add1", "capitals"], seed=4)
    assert {t.id for t in alone.test} == {t.id for t in mixed.test if t.family == "capitals"}


def test_fact_distractors_exclude_own_answer_and_prompt_words() -> None:
    hot = task_of("opposites", "hot")
    assert hot.answer == "cold"
    assert "cold" not in hot.distractors and "hot" not in hot.distractors
    loud = task_of("opposites", "loud")
    assert "soft" not in loud.distractors and "quiet" not in loud.distractors
    usa = task_of("capitals", "united-states")
    assert "Washington" in usa.aliases and "Paris" in usa.distractors


# --- answer checking: numbers ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("7", "7"),
        ("The answer is 7.", "7"),
        ("3 + 4 = 7", "7"),
        ("$1,234.50", "1234.5"),
        ("It costs -$5.", "-5"),
        ("9 - 12 = -3", "-3"),
        ("8-3=5", "5"),
        ("The answer is 7.0.", "7"),
        ("The answer is 12, not 7", "12"),
        ("The answer is 3 + 4 = 7.", "7"),
        ("The answer is:\n7", "7"),
        ("**The answer is 42**", "42"),
        ("So the final answer: 15 apples. Then 3 more.", "15"),
        ("#### 72", "72"),
        ("The answer is seven.", None),
        ("I am not sure.", None),
        ("Ratios 3,4,5 are small.", "5"),
        ("About 12,000 people.", "12000"),
    ],
)
def test_extract_number(text: str, expected: str | None) -> None:
    got = extract_number(text)
    assert (got is None) if expected is None else (got == Decimal(expected)), got


ADD_3_4 = Task(id="add1/3+4", family="add1", prompt="What is 3 + 4?", answer="7")


@pytest.mark.parametrize(
    ("response", "ok"),
    [
        ("7", True),
        ("7.", True),
        ("The answer is 7.", True),
        ("3 + 4 = 7", True),
        ("3 + 4 = 7.0", True),
        ("The sum of 3 and 4 is 7.", True),
        ("7 is the sum of 3 and 4.", True),
        ("To find the sum, add 3 and 4. 3 + 4 = 7. So the answer is 7.", True),
        ("The answer is 7, which is the sum of 3 and 4.", True),
        ("3 + 4 = 8", False),
        ("The answer is 8.", False),
        ("The answer is 12, not 7", False),
        ("7 or 8", False),
        ("It is 8. Some people say 7 but the answer is 8", False),
        ("3 + 4", False),
        ("The sum of 3 and 4 is seven.", False),
        ("17", False),
        ("-7", False),
        ("", False),
    ],
)
def test_check_addition(response: str, ok: bool) -> None:
    assert check(ADD_3_4, response) is ok


def test_check_answer_equal_to_an_operand() -> None:
    t = Task(id="sub1/5-0", family="sub1", prompt="What is 5 - 0?", answer="5")
    assert check(t, "5 - 0 = 5")
    assert check(t, "5")
    assert not check(t, "5 - 0 = 0")
    assert not check(t, "0")
    nxt = Task(id="next_number/41", family="next_number", prompt="What number comes after 41?", answer="42")
    assert check(nxt, "42 comes after 41.")
    assert check(nxt, "The number after 41 is 42.")
    assert not check(nxt, "41")
    assert not check(nxt, "43 comes after 41.")


COMPARE = Task(
    id="compare/37_vs_52", family="compare", prompt="Which is larger, 37 or 52?", answer="52", kind="larger",
    distractors=("37",),
)  # fmt: skip


@pytest.mark.parametrize(
    ("response", "ok"),
    [
        ("52", True),
        ("52 is larger.", True),
        ("52 is larger than 37.", True),
        ("52 is the larger number.", True),
        ("The larger number is 52.", True),
        ("The larger of the two is 52.", True),
        ("37 is smaller than 52.", True),
        ("52 > 37", True),
        ("37 < 52", True),
        ("Between 37 and 52, 52 is greater.", True),
        ("The answer is 52.", True),
        ("37", False),
        ("37 is larger than 52.", False),
        ("52 is smaller than 37.", False),
        ("37 > 52", False),
        ("37 or 52", False),
        ("The answer is 37.", False),
        ("Both are numbers: 37 and 52.", False),
        ("I don't know.", False),
    ],
)
def test_check_compare(response: str, ok: bool) -> None:
    assert check(COMPARE, response) is ok


# --- answer checking: facts ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("family", "key", "response", "ok"),
    [
        ("capitals", "france", "Paris", True),
        ("capitals", "france", "Paris is the capital of France.", True),
        ("capitals", "france", "The capital of France is paris!", True),
        ("capitals", "france", "The capital of France is Paris. It is known for the Eiffel Tower.", True),
        ("capitals", "france", "Paris, Rome, Berlin, Madrid", False),
        ("capitals", "france", "The capital of France is Lyon.", False),
        ("capitals", "france", "Parisian food is great.", False),
        ("capitals", "united-states", "The capital of the United States is Washington, D.C.", True),
        ("capitals", "united-states", "Washington DC", True),
        ("capitals", "united-states", "New York City", False),
        ("capitals", "brazil", "Brasilia is the capital of Brazil.", True),
        ("capitals", "brazil", "The capital is Brasília.", True),
        ("capitals", "australia", "Sydney", False),
        ("capitals", "australia", "Canberra, not Sydney.", True),
        ("capitals", "ukraine", "Kiev", True),
        ("capitals", "mexico", "Mexico City is the capital of Mexico.", True),
        ("capitals", "mexico", "Mexico", False),
        ("capitals", "india", "New Delhi", True),
        ("opposites", "hot", "Cold.", True),
        ("opposites", "hot", "The opposite of 'hot' is 'cold'.", True),
        ("opposites", "hot", "Hot and cold are opposites.", True),
        ("opposites", "hot", "hot", False),
        ("opposites", "hot", "warm", False),
        ("opposites", "hot", "cold, dry, slow, small", False),
        ("opposites", "big", "The opposite of big is little.", True),
        ("opposites", "big", "Small or tiny.", True),
        ("opposites", "happy", "unhappy", True),
        ("opposites", "kind", "The opposite of kind is unkind.", True),
        ("colors", "banana", "A banana is yellow.", True),
        ("colors", "banana", "Yellow", True),
        ("colors", "banana", "Bananas are yellow or green.", False),
        ("colors", "banana", "A banana is usually red.", False),
        ("colors", "elephant", "Elephants are grey.", True),
        ("colors", "sky", "The sky is blue.", True),
        ("animal_legs", "spider", "A spider has 8 legs.", True),
        ("animal_legs", "spider", "Spiders have eight legs.", True),
        ("animal_legs", "spider", "A spider has 6 legs.", False),
        ("animal_legs", "spider", "A spider has 18 legs.", False),
        ("animal_legs", "spider", "2, 4, 6 or 8", False),
        ("animal_legs", "dog", "A dog has four legs.", True),
        ("animal_legs", "dog", "Dogs have 4 legs and 2 ears.", False),
        ("animal_legs", "snake", "A snake has no legs.", True),
        ("animal_legs", "snake", "Snakes don't have legs.", True),
        ("animal_legs", "snake", "Snakes have 0 legs.", True),
        ("animal_legs", "snake", "A snake has four legs.", False),
        ("animal_legs", "chicken", "A chicken has two legs and two wings.", True),
        ("continents", "ireland", "Ireland is a European country located in the North Atlantic.", True),
        ("continents", "kenya", "Kenya is in East Africa.", True),
        ("continents", "kenya", "Kenya is an Asian country.", False),
        ("continents", "brazil", "Brazil is in South America.", True),
        ("continents", "brazil", "Brazil is in North America.", False),
        ("languages", "china", "Most people in China speak Mandarin.", True),
        ("languages", "brazil", "The official language of Brazil is Portuguese.", True),
        ("languages", "brazil", "People in Brazil speak Spanish.", False),
        ("plurals", "mouse", 'The plural of "mouse" is "mice".', True),
        ("plurals", "mouse", 'The plural of "mouse" is "mouses".', False),
        ("plurals", "cactus", "Both cacti and cactuses are used.", True),
        # a number family among the facts: the checker of each task's kind
        ("mul1", "6x7", "6 times 7 is 42.", True),
        ("mul1", "6x7", "6 times 7 is 36.", False),
    ],
)
def test_check_named_tasks(family: str, key: str, response: str, ok: bool) -> None:
    assert check(task_of(family, key), response) is ok


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_every_family_accepts_its_answer_in_typical_phrasings(name: str) -> None:
    splits = build_suite([name], n_per_family=30, seed=2)
    for t in splits.train + splits.dev + splits.test:
        for phrasing in (
            t.answer,
            f"The answer is {t.answer}.",
            f"{t.answer}.",
            f"I think it is {t.answer}.",
        ):
            assert check(t, phrasing), (t.id, phrasing)
        wrong = "The answer is 1000003." if t.kind != "fact" else "I do not know."
        assert not check(t, wrong), (t.id, wrong)
        if t.kind == "fact":
            assert not check(t, f"{t.answer} or {t.distractors[0]}"), t.id


# --- partial credit ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_partial_credit_is_one_exactly_when_the_checker_accepts(name: str) -> None:
    splits = build_suite([name], n_per_family=20, seed=3)
    for t in splits.train + splits.test:
        for response in (
            f"The answer is {t.answer}.",
            f"{t.answer} or {t.distractors[0]}" if t.distractors else "I do not know.",
            "The answer is 1000003.",
            "I do not know.",
            f"It is {t.distractors[-1]}." if t.distractors else "It is 12.",
        ):
            credit = partial_credit(t, response)
            assert (credit == 1.0) is check(t, response), (t.id, response, credit)
            assert credit == 1.0 or 0.0 <= credit < PARTIAL_CREDIT_MAX + 1e-12, (t.id, response, credit)


def test_partial_credit_ranks_near_misses_above_far_ones() -> None:
    add = Task(id="add1/3+9", family="add1", prompt="What is 3 + 9?", answer="12")
    credits = [partial_credit(add, r) for r in ("3 + 9 = 12", "3 + 9 = 11", "3 + 9 = 15", "3 + 9 = 99", "Hmm.")]
    assert credits[0] == 1.0 and credits[1] > credits[2] > credits[3] > credits[4] == 0.0
    # the distance is relative to the answer's size, so a GSM8K answer off by 1 is a near miss
    cot = Task(id="gsm8k/1", family="gsm8k", prompt="...", answer="1200", kind="cot_number")
    assert partial_credit(cot, "#### 1199") > partial_credit(add, "3 + 9 = 11")
    capital = task_of("capitals", "venezuela")
    near, far = partial_credit(capital, "It is Caracupem."), partial_credit(capital, "It is Lima.")
    assert 0.0 < far < near < PARTIAL_CREDIT_MAX
    legs = task_of("animal_legs", "dog")  # a fact whose answer is a number: graded by distance
    assert partial_credit(legs, "A dog has 3 legs.") > partial_credit(legs, "A dog has 10 legs.") > 0.0
    larger = get_family("compare").task(0)
    assert partial_credit(larger, f"{larger.distractors[0]} is larger.") == 0.0


# --- GSM8K ------------------------------------------------------------------------------------


def test_gsm8k_loads_from_shared() -> None:
    folder = find_gsm8k_dir()
    assert (folder / "test.jsonl").is_file()
    test = load_gsm8k("test")
    assert len(test) == 1319
    assert len({t.id for t in test}) == 1319
    first = load_gsm8k("train", limit=2, seed=None)
    assert first[0].id == "gsm8k-train/0"
    assert first[0].answer == "72"
    assert first[0].prompt.startswith("Natalia sold clips")
    assert first[0].prompt.endswith('"The answer is N." where N is a number.')
    assert first[1].answer == "10"
    assert first[0].kind == "cot_number"
    assert load_gsm8k("test", limit=5, seed=3) == load_gsm8k("test", limit=5, seed=3)
    assert load_gsm8k("test", limit=5, seed=3) != load_gsm8k("test", limit=5, seed=4)
    assert all("," not in t.answer for t in test)


def test_gsm8k_answers_and_extraction() -> None:
    assert final_answer("so 1,000 + 72 = 1072\n#### 1,072") == "1072"
    assert final_answer("#### -3") == "-3"
    assert final_answer("#### 0.5") == "0.5"
    with pytest.raises(InvalidTaskError):
        final_answer("no marker 42")
    t = load_gsm8k("train", limit=1, seed=None)[0]
    assert check(t, "In May she sold 48 / 2 = 24 clips. In total 48 + 24 = 72. The answer is 72.")
    assert check(t, "48 + 24 = 72 clips altogether.")
    assert check(t, "The answer is $72.00")
    assert not check(t, "In May she sold 48 / 2 = 24 clips. The answer is 24.")
    assert not check(t, "The answer is 72 + 24 = 96.")
    assert not check(t, "She sold 72 clips in April and 48 in May.")


def test_gsm8k_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(InvalidTaskError, match="split"):
        load_gsm8k("validation")
    with pytest.raises(InvalidTaskError, match="limit"):
        load_gsm8k(limit=-1)
    monkeypatch.setenv(GSM8K_DIR_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(DataNotFoundError, match="nowhere") as err:
        find_gsm8k_dir()
    assert isinstance(err.value, FileNotFoundError)
    monkeypatch.setenv(GSM8K_DIR_ENV, str(tmp_path))
    with pytest.raises(DataNotFoundError, match=r"test\.jsonl"):
        load_gsm8k("test")
    (tmp_path / "test.jsonl").write_text(json.dumps({"question": "1 + 1?", "answer": "#### 2"}) + "\n{oops\n")
    with pytest.raises(InvalidTaskError, match=r"test\.jsonl:2"):
        load_gsm8k("test")
    (tmp_path / "test.jsonl").write_text(json.dumps({"question": "1 + 1?", "answer": "1+1=2\n#### 2"}) + "\n")
    assert [t.answer for t in load_gsm8k("test")] == ["2"]


def test_gsm8k_dir_not_found_names_expected_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import langchain_capeval.tasks.gsm8k as gsm8k

    monkeypatch.delenv(GSM8K_DIR_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(gsm8k, "__file__", str(tmp_path / "pkg" / "gsm8k.py"))
    with pytest.raises(DataNotFoundError, match=r"shared/data/gsm8k"):
        find_gsm8k_dir()
    (tmp_path / "shared" / "data" / "gsm8k").mkdir(parents=True)
    (tmp_path / "repo").mkdir()
    monkeypatch.chdir(tmp_path / "repo")
    assert find_gsm8k_dir() == (tmp_path / "shared" / "data" / "gsm8k").resolve()
