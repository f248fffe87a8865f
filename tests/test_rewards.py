from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from langchain_capeval.errors import InvalidRewardError, ModelNotInstalledError
from langchain_capeval.preferences import outcome, pairwise_preferences, tie_rate, win_or_tie_targets
from langchain_capeval.rewards import (
    CallableReward,
    PartialCreditReward,
    RewardModel,
    RewardModelConfig,
    RewardSource,
    VerifiableReward,
)
from langchain_capeval.tasks import Task, build_suite

# --- preferences ---------------------------------------------------------------------------


def test_win_or_tie_hand_computed() -> None:
    # 0.1 < 0.5 == 0.5 < 0.9, no epsilon: 0.1 beats nobody; each 0.5 ties the other and beats 0.1.
    assert win_or_tie_targets([0.1, 0.5, 0.5, 0.9], epsilon=0.0) == [0.0, 2 / 3, 2 / 3, 1.0]
    # epsilon 0.45 makes 0.1 tie both 0.5s (gap 0.4) but still lose to 0.9 (gap 0.8).
    assert win_or_tie_targets([0.1, 0.5, 0.5, 0.9], epsilon=0.45) == [2 / 3, 1.0, 1.0, 1.0]
    # the gap equal to epsilon is a tie.
    assert win_or_tie_targets([0.0, 0.25], epsilon=0.25) == [1.0, 1.0]
    assert win_or_tie_targets([0.0, 0.25], epsilon=0.2) == [0.0, 1.0]
    # verifiable rewards: right answers get 1, wrong ones the share of the others also wrong.
    assert win_or_tie_targets([1, 0, 0, 0, 1], epsilon=0.0) == [1.0, 0.5, 0.5, 0.5, 1.0]
    # nobody solves it: everything ties, every target is 1.
    assert win_or_tie_targets([0.0] * 4, epsilon=0.0) == [1.0] * 4
    assert win_or_tie_targets([-3.5], epsilon=0.1) == [1.0]
    assert win_or_tie_targets([], epsilon=0.1) == []


def test_pairwise_preferences_and_tie_rate() -> None:
    prefs = pairwise_preferences([0.3, 0.1, 0.32], epsilon=0.05)
    assert prefs == [(0, 1, "win"), (0, 2, "tie"), (1, 2, "loss")]
    assert tie_rate([0.3, 0.1, 0.32], epsilon=0.05) == pytest.approx(1 / 3)
    assert tie_rate([0.3, 0.1, 0.32], epsilon=0.0) == 0.0
    assert tie_rate([1.0, 1.0], epsilon=0.0) == 1.0
    assert tie_rate([1.0], epsilon=0.0) == 0.0
    assert outcome(1.0, 0.0, 0.5) == "win"


def test_targets_agree_with_pairwise_preferences() -> None:
    rng = np.random.default_rng(0)
    for _ in range(50):
        rewards = rng.choice([0.0, 0.1, 0.15, 0.5, 1.0], size=int(rng.integers(2, 7))).tolist()
        eps = float(rng.choice([0.0, 0.05, 0.1]))
        n = len(rewards)
        not_lost = [0] * n
        for i, j, result in pairwise_preferences(rewards, eps):
            not_lost[i] += result != "loss"
            not_lost[j] += result != "win"
        assert win_or_tie_targets(rewards, eps) == [k / (n - 1) for k in not_lost]


@pytest.mark.parametrize("bad_eps", [-0.1, math.nan, math.inf, True, "0.1"])
def test_bad_epsilon(bad_eps: object) -> None:
    with pytest.raises(InvalidRewardError, match="epsilon"):
        win_or_tie_targets([0.0, 1.0], epsilon=bad_eps)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [[0.0, math.nan], [0.0, "1"], [None], [True, 0.0]])
def test_bad_rewards(bad: list[object]) -> None:
    with pytest.raises(InvalidRewardError, match=r"rewards\["):
        pairwise_preferences(bad, epsilon=0.0)  # type: ignore[arg-type]


# --- verifiable and callable rewards -----------------------------------------------------------


def test_verifiable_reward() -> None:
    tasks = list(build_suite(["add1", "capitals"], n_per_family=12, seed=0).test)
    responses = [f"The answer is {t.answer}." for t in tasks]
    source = VerifiableReward()
    assert isinstance(source, RewardSource)
    assert source.score([t.prompt for t in tasks], responses, tasks) == [1.0] * len(tasks)
    assert source.score([t.prompt for t in tasks], ["I do not know."] * len(tasks), tasks) == [0.0] * len(tasks)
    with pytest.raises(InvalidRewardError, match="tasks="):
        source.score(["q"], ["a"])
    with pytest.raises(InvalidRewardError, match=r"tasks\[0\]"):
        source.score(["q"], ["a"], [None])
    with pytest.raises(InvalidRewardError, match="one task per prompt"):
        source.score(["q", "q"], ["a", "b"], tasks[:1])


def test_callable_reward() -> None:
    source = CallableReward(lambda p, r: len(r) / (1 + len(p)))
    assert isinstance(source, RewardSource)
    assert source.score(["ab", "c"], ["xyz", ""]) == [1.0, 0.0]
    assert CallableReward(lambda p, r: np.float32(0.5)).score(["q"], ["a"]) == [0.5]
    assert CallableReward(lambda p, r: 3).score(["q"], ["a"]) == [3.0]


@pytest.mark.parametrize(
    ("value", "match"),
    [("1.0", "str"), (None, "NoneType"), (True, "bool"), (math.nan, "finite"), (-math.inf, "finite"), ([1.0], "list")],
)
def test_callable_reward_rejects_non_finite_or_non_numbers(value: object, match: str) -> None:
    source = CallableReward(lambda p, r: value)  # type: ignore[arg-type, return-value]
    with pytest.raises(InvalidRewardError, match=match) as err:
        source.score(["q", "q"], ["a", "b"])
    assert "pair 0" in str(err.value)
    assert isinstance(err.value, ValueError)


def test_callable_reward_input_errors() -> None:
    with pytest.raises(InvalidRewardError, match="callable"):
        CallableReward("not a function")  # type: ignore[arg-type]
    source = CallableReward(lambda p, r: 0.0)
    with pytest.raises(InvalidRewardError, match="2 prompts but 1 responses"):
        source.score(["a", "b"], ["x"])
    with pytest.raises(InvalidRewardError, match="sequence of strings"):
        source.score("ab", "xy")
    with pytest.raises(InvalidRewardError, match=r"responses\[1\]"):
        source.score(["a", "b"], ["x", 3])  # type: ignore[list-item]


def test_callable_reward_does_not_swallow_errors() -> None:
    def broken(prompt: str, response: str) -> float:
        raise KeyError("boom")

    with pytest.raises(KeyError):
        CallableReward(broken).score(["q"], ["a"])


# --- a tiny reward model built from a config -----------------------------------------------------

CORPUS = [
    "what is 3 + 4 ? the answer is 7 .",
    "paris is the capital of france",
    "user assistant : hello world",
    "which is larger , 37 or 52 ?",
]


def _save_tiny_reward_model(folder: Path, *, chat_template: str | None, pad_in_config: bool = True) -> None:
    import torch
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import LlamaConfig, LlamaForSequenceClassification, PreTrainedTokenizerFast

    words = sorted({w for line in CORPUS for w in line.split()} | {"\n", "?", ".", ":"})
    vocab = {"[PAD]": 0, "[UNK]": 1, "[EOS]": 2} | {w: i + 3 for i, w in enumerate(words)}
    backend = Tokenizer(WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]"
    )
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=64,
        num_labels=2,
        pad_token_id=0 if pad_in_config else None,
        max_position_embeddings=256,
    )
    model = LlamaForSequenceClassification(config)
    with torch.no_grad():  # a visible, non-zero head
        model.score.weight.normal_(0.0, 1.0)
    model.save_pretrained(folder)


TEMPLATE = "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }}\n{% endfor %}"

PROMPTS = ["what is 3 + 4 ?", "which is larger , 37 or 52 ?", "hello", "paris ?", "what is 3 + 4 ?"]
RESPONSES = ["the answer is 7 .", "52", "hello world hello world hello world", "paris is the capital of france", "7"]


@pytest.fixture(scope="module")
def tiny_rm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny_rm")
    _save_tiny_reward_model(folder, chat_template=TEMPLATE)
    return folder


def test_reward_model_scores_batched_equal_unbatched(tiny_rm_dir: Path) -> None:
    batched = RewardModel.from_pretrained(tiny_rm_dir, batch_size=8, dtype="float32")
    single = RewardModel.from_pretrained(tiny_rm_dir, batch_size=1, dtype="float32")
    assert isinstance(batched, RewardSource)
    a = batched.score(PROMPTS, RESPONSES)
    b = single.score(PROMPTS, RESPONSES)
    assert len(a) == len(PROMPTS) and all(isinstance(x, float) and math.isfinite(x) for x in a)
    assert a == pytest.approx(b, abs=1e-5)
    assert len(set(a)) > 1, "different pairs should score differently"
    other_head = RewardModel.from_pretrained(tiny_rm_dir, head_index=1, batch_size=3).score(PROMPTS, RESPONSES)
    assert other_head != pytest.approx(a, abs=1e-3)
    assert batched.score([], []) == []


def test_reward_model_uses_chat_template(tiny_rm_dir: Path) -> None:
    rm = RewardModel.from_pretrained(tiny_rm_dir)
    assert rm.render("hello", "world") == "user : hello\nassistant : world\n"
    ids = rm.encode("hello", "world")
    assert rm.tokenizer.convert_ids_to_tokens(ids)[:3] == ["user", ":", "hello"]
    short = RewardModel.from_pretrained(tiny_rm_dir, max_length=4)
    assert short.tokenizer.convert_ids_to_tokens(short.encode("hello", "hello world")) == [
        "assistant",
        ":",
        "hello",
        "world",
    ]


def test_reward_model_without_template_or_pad_id(tmp_path: Path) -> None:
    _save_tiny_reward_model(tmp_path, chat_template=None, pad_in_config=False)
    rm = RewardModel.from_pretrained(tmp_path, batch_size=4)
    assert rm.render("hello", "world") == "hello\n\nworld"
    assert rm.pad_id == rm.tokenizer.pad_token_id == 0
    a = rm.score(PROMPTS, RESPONSES)
    b = RewardModel.from_pretrained(tmp_path, batch_size=1).score(PROMPTS, RESPONSES)
    assert a == pytest.approx(b, abs=1e-5)


def test_reward_model_config_errors(tiny_rm_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelNotInstalledError, match="not found"):
        RewardModel.from_pretrained(tmp_path / "missing")
    with pytest.raises(InvalidRewardError, match="head_index=2"):
        RewardModel.from_pretrained(tiny_rm_dir, head_index=2)
    for bad in ({"head_index": -1}, {"batch_size": 0}, {"max_length": 1}, {"output": "probs"}, {"dtype": "int8"}):
        with pytest.raises(InvalidRewardError):
            RewardModelConfig(path=tiny_rm_dir, **bad)  # type: ignore[arg-type]
    rm = RewardModel.from_pretrained(tiny_rm_dir)
    with pytest.raises(InvalidRewardError, match="responses"):
        rm.score(["a"], ["b", "c"])


def test_prompts_sharing_a_batch_do_not_change_each_others_scores(tiny_rm_dir: Path) -> None:
    rm = RewardModel.from_pretrained(tiny_rm_dir, batch_size=8)
    alone = rm.score(PROMPTS[:1], RESPONSES[:1])
    with_long = rm.score([PROMPTS[0], PROMPTS[2]], [RESPONSES[0], RESPONSES[2] * 4])
    assert with_long[0] == pytest.approx(alone[0], abs=1e-5)


def test_verifiable_targets_end_to_end() -> None:
    task = Task(id="add1/3+4", family="add1", prompt="What is 3 + 4?", answer="7")
    responses = ["3 + 4 = 7", "It is 8.", "The answer is 7.", "3 + 4 = 6"]
    rewards = VerifiableReward().score([task.prompt] * 4, responses, [task] * 4)
    assert rewards == [1.0, 0.0, 1.0, 0.0]
    assert win_or_tie_targets(rewards, epsilon=0.0) == [1.0, 1 / 3, 1.0, 1 / 3]


def test_partial_credit_reward_separates_wrong_answers_that_the_checker_ties() -> None:
    task = Task(id="add1/3+9", family="add1", prompt="What is 3 + 9?", answer="12")
    responses = ["3 + 9 = 13", "3 + 9 = 27", "I can't say.", "3 + 9 = 12."]
    graded = PartialCreditReward().score([task.prompt] * 4, responses, [task] * 4)
    assert isinstance(PartialCreditReward(), RewardSource)
    assert graded[3] == 1.0 and graded[0] > graded[1] > graded[2] == 0.0
    # on a prompt no sample solves, the 0/1 reward gives every sample target 1; graded, they spread
    wrong = responses[:3]
    assert win_or_tie_targets(VerifiableReward().score([task.prompt] * 3, wrong, [task] * 3), 0.0) == [1.0] * 3
    assert win_or_tie_targets(PartialCreditReward().score([task.prompt] * 3, wrong, [task] * 3), 0.0) == [1.0, 0.5, 0.0]
    with pytest.raises(InvalidRewardError, match=r"PartialCreditReward needs the task"):
        PartialCreditReward().score(["q"], ["a"])
