"""The self-evaluation training pipeline: metrics, targets and prefixes, packing, data builder, trainer.

The end-to-end test runs the real embedded model: a few prompts, a few samples, a tiny LoRA
trained for a few steps at a high learning rate, saved, loaded back through the engine.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from langchain_capeval.adapters import adapter_scope, apply_adapter
from langchain_capeval.cli import main as capeval_main
from langchain_capeval.engines.decoding import answer_probabilities, win_or_tie_probability
from langchain_capeval.engines.transformers import TransformersEngine, TransformersEngineConfig
from langchain_capeval.models import load_model
from langchain_capeval.preferences import win_or_tie_targets
from langchain_capeval.rewards import PartialCreditReward
from langchain_capeval.sampling import SamplingParams
from langchain_capeval.tasks import Task, build_suite, check
from langchain_capeval.training.cli import add_training_commands, config_from_args
from langchain_capeval.training.config import PreferenceDataConfig, SelfEvalEvalConfig, SelfEvalTrainingConfig
from langchain_capeval.training.dataset import (
    PreferenceDataBuilder,
    choose_prefix_lengths,
    correctness_aurocs,
    extend_folder,
    label_samples,
    read_records,
)
from langchain_capeval.training.evaluate import (
    EvalSample,
    best_of_n,
    collect_self_evaluations,
    pass_at_1_difference,
    summarize,
)
from langchain_capeval.training.examples import (
    ChunkExample,
    collate,
    pack_sample,
    self_evaluation_sequence,
    tree_attention_mask,
)
from langchain_capeval.training.metrics import (
    auroc,
    auroc_interval,
    brier_score,
    expected_calibration_error,
    reliability_bins,
)
from langchain_capeval.training.trainer import (
    SelfEvalTrainer,
    build_examples,
    chunk_answer_logits,
    length_batches,
    shuffled_batches,
    soft_answer_loss,
)

# --- metrics -----------------------------------------------------------------------------


def test_auroc_hand_computed() -> None:
    # positives 0.9, 0.3; negatives 0.8, 0.1: (0.9 > 0.8, 0.9 > 0.1, 0.3 < 0.8, 0.3 > 0.1) = 3 / 4.
    assert auroc([0.9, 0.8, 0.3, 0.1], [1, 0, 1, 0]) == 0.75
    assert auroc([0.9, 0.1], [True, False]) == 1.0
    assert auroc([0.1, 0.9], [1, 0]) == 0.0
    # a tie between a positive and a negative counts half: (0.5 + 1) / 2.
    assert auroc([0.2, 0.2, 0.7], [0, 1, 1]) == 0.75
    assert auroc([0.5] * 4, [1, 0, 1, 0]) == 0.5
    assert auroc([0.1, 0.2], [1, 1]) is None
    with pytest.raises(ValueError, match="binary"):
        auroc([0.1, 0.2], [0.5, 1])
    with pytest.raises(ValueError, match="one target per score"):
        auroc([0.1], [1, 0])


def test_auroc_matches_pairwise_definition() -> None:
    rng = random.Random(0)
    scores = [round(rng.random(), 1) for _ in range(60)]  # many ties
    labels = [rng.random() < 0.4 for _ in range(60)]
    pos = [s for s, y in zip(scores, labels, strict=True) if y]
    neg = [s for s, y in zip(scores, labels, strict=True) if not y]
    brute = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg) / (len(pos) * len(neg))
    assert auroc(scores, labels) == pytest.approx(brute)


def test_auroc_interval_resamples_whole_groups() -> None:
    rng = random.Random(1)
    labels = [rng.random() < 0.4 for _ in range(120)]
    scores = [0.3 * y + rng.random() for y in labels]
    groups = [f"p{i // 6}" for i in range(120)]  # 20 prompts of 6 samples
    low, high = auroc_interval(scores, labels, groups, draws=500)
    assert low < auroc(scores, labels) < high
    # one group: every draw is the whole set, so the interval is the point
    point = auroc(scores, labels)
    assert auroc_interval(scores, labels, ["one"] * 120, draws=50) == (point, point)
    # seeded: the same call, the same interval; another seed, another
    assert auroc_interval(scores, labels, groups, draws=500) == (low, high)
    assert auroc_interval(scores, labels, groups, draws=500, seed=1) != (low, high)
    assert auroc_interval([0.1, 0.2], [1, 1], ["a", "b"]) is None
    with pytest.raises(ValueError, match="one group per score"):
        auroc_interval([0.1, 0.2], [1, 0], ["a"])
    with pytest.raises(ValueError, match="level"):
        auroc_interval([0.1, 0.2], [1, 0], ["a", "b"], level=95)


def test_brier_and_ece_hand_computed() -> None:
    assert brier_score([1.0, 0.5], [1, 0]) == 0.125
    assert brier_score([0.8, 0.2], [1.0, 0.5]) == pytest.approx((0.04 + 0.09) / 2)
    # two bins: [0.25, 0.25] vs targets 0, 1 -> |0.25 - 0.5|; [0.75, 0.75] vs 1, 1 -> |0.75 - 1|.
    assert expected_calibration_error([0.25, 0.25, 0.75, 0.75], [0, 1, 1, 1], bins=2) == 0.25
    assert expected_calibration_error([0.9, 0.9], [1, 1], bins=10) == pytest.approx(0.1)
    assert expected_calibration_error([0.0, 1.0], [0, 1], bins=10) == 0.0
    bins = reliability_bins([0.1, 0.3, 0.9, 1.0], [0, 1, 1, 1], bins=2)
    assert [(b.count, b.mean_score, b.mean_target) for b in bins] == [(2, 0.2, 0.5), (2, 0.95, 1.0)]


def test_data_card_reports_what_the_targets_can_rank(
    capsys: pytest.CaptureFixture[str], built_data_folder: Callable[[int], Path]
) -> None:
    """``capeval data-card``: the targets' correctness AUROC (the ceiling) and prompt difficulty's, per family."""
    tmp_path = built_data_folder(8)
    assert capeval_main(["data-card", str(tmp_path)]) == 0
    printed = json.loads(capsys.readouterr().out)
    card = json.loads((tmp_path / "data_card.json").read_text())
    assert printed["label_balance"] == card["label_balance"] and card["counts"]["prompts"] == 8
    records = read_records(tmp_path / "preferences.jsonl")

    def pairwise(score: dict[tuple[int, int], float]) -> float:  # P(a right sample outscores a wrong one), ties 1/2
        right = [k for k in score if records[k[0]].samples[k[1]].reward > 0]
        wrong = [k for k in score if records[k[0]].samples[k[1]].reward <= 0]
        wins = sum((score[r] > score[w]) + 0.5 * (score[r] == score[w]) for r in right for w in wrong)
        return round(wins / (len(right) * len(wrong)), 4)

    keys = [(i, j) for i, r in enumerate(records) for j in range(len(r.samples))]
    targets = {k: records[k[0]].samples[k[1]].target for k in keys}
    mean_target = [round(sum(s.target for s in r.samples) / len(r.samples), 4) for r in records]  # equal means tie
    difficulty = {k: mean_target[k[0]] for k in keys}
    lb = card["label_balance"]
    assert lb["auroc_target_for_correctness"] == pairwise(targets)
    assert lb["auroc_difficulty_for_correctness"] == pairwise(difficulty)
    assert set(card["per_family"]) == {r.family for r in records}
    for fam, row in card["per_family"].items():
        assert row | correctness_aurocs([r for r in records if r.family == fam]) == row
    assert "AUROC of targets" in (tmp_path / "DATA_CARD.md").read_text()
    assert capeval_main(["data-card", str(tmp_path / "missing")]) == 2  # a clear error, not a traceback
    assert "has no preferences.jsonl" in capsys.readouterr().err


def test_relabel_scores_the_same_samples_with_another_reward(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], built_data_folder: Callable[[int], Path]
) -> None:
    """``capeval relabel``: same samples, graded rewards and their targets, a card and settings that say so."""
    src = built_data_folder(8)
    out = tmp_path / "graded"
    assert capeval_main(["relabel", str(src), "--output-dir", str(out), "--reward", "partial_credit"]) == 0
    assert json.loads(capsys.readouterr().out)["reward"].startswith("partial_credit")
    before, after = read_records(src / "preferences.jsonl"), read_records(out / "preferences.jsonl")
    assert [r.task for r in after] == [r.task for r in before]
    for old, new in zip(before, after, strict=True):
        task = Task(**new.task)
        texts = [x.text for x in new.samples]
        rewards = PartialCreditReward().score([task.prompt] * len(texts), texts, [task] * len(texts))
        assert [x.reward for x in new.samples] == rewards
        assert [x.target for x in new.samples] == win_or_tie_targets(rewards, 0.0)
        assert [x.correct for x in new.samples] == [x.reward > 0 for x in old.samples]  # the 0/1 checker's verdict
        assert [(x.token_ids, x.text, x.seed, x.prefix_lengths) for x in new.samples] == [
            (x.token_ids, x.text, x.seed, x.prefix_lengths) for x in old.samples
        ]
    card = json.loads((out / "data_card.json").read_text())
    old_card = correctness_aurocs(before)
    old_rewards = [x.reward for r in before for x in r.samples]
    assert card["label_balance"]["accuracy"] == round(sum(old_rewards) / len(old_rewards), 4)
    assert card["label_balance"]["auroc_target_for_correctness"] >= old_card["auroc_target_for_correctness"]  # type: ignore[operator]
    settings = json.loads((out / "build_config.json").read_text())
    assert (settings["reward"], settings["epsilon"], settings["seed"]) == ("partial_credit", 0.0, 0)
    assert capeval_main(["data-card", str(out)]) == 0  # the card is rebuilt from the recorded reward
    assert json.loads(capsys.readouterr().out)["label_balance"] == card["label_balance"]
    assert capeval_main(["relabel", str(src), "--output-dir", str(out), "--reward", "verifiable"]) == 2
    assert "already holds preference data" in capsys.readouterr().err
    assert (
        capeval_main(["relabel", str(tmp_path / "none"), "--output-dir", str(tmp_path / "x"), "--reward", "verifiable"])
        == 2
    )
    assert "has no preferences.jsonl" in capsys.readouterr().err
    assert (
        capeval_main(
            ["relabel", str(src), "--output-dir", str(tmp_path / "y"), "--reward", "partial_credit", "--epsilon", "0.5"]
        )
        == 2
    )
    assert "would tie near misses" in capsys.readouterr().err


def test_relabel_draws_prefix_lengths_anew_for_more_mid_generation_examples(
    engine: TransformersEngine,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    built_data_folder: Callable[[int], Path],
) -> None:
    """``capeval relabel --prefix-lengths/--prefixes-per-sample``: same samples and targets, every eligible length."""
    src = built_data_folder(8)
    kept, dense = tmp_path / "kept", tmp_path / "dense"
    assert capeval_main(["relabel", str(src), "--output-dir", str(kept), "--reward", "partial_credit"]) == 0
    capsys.readouterr()
    lengths = ["--reward", "partial_credit", "--prefix-lengths", "4,8,12,16"]
    assert capeval_main(["relabel", str(src), "--output-dir", str(dense), *lengths, "--prefixes-per-sample", "4"]) == 0
    printed = json.loads(capsys.readouterr().out)
    before, after = read_records(kept / "preferences.jsonl"), read_records(dense / "preferences.jsonl")
    moved = 0
    for old, new in zip(before, after, strict=True):
        for x, y in zip(old.samples, new.samples, strict=True):
            assert (y.token_ids, y.reward, y.target, y.correct) == (x.token_ids, x.reward, x.target, x.correct)
            assert y.prefix_lengths == [n for n in (4, 8, 12, 16) if n < len(y.token_ids)]  # all four eligible ones
            moved += y.prefix_lengths != x.prefix_lengths
    assert moved > 0  # the kept folder has the source's lengths, drawn from (8, 16, 32, 64) two at a time
    card = json.loads((dense / "data_card.json").read_text())
    assert card["counts"]["prefix_examples"] == sum(len(x.prefix_lengths) for r in after for x in r.samples)
    assert printed["prefixes"] == card["counts"]["prefix_examples_by_length"]
    settings = json.loads((dense / "build_config.json").read_text())
    assert (settings["prefix_lengths"], settings["prefixes_per_sample"]) == ([4, 8, 12, 16], 4)
    same = {k: v for k, v in settings.items() if k != "engine_model"} | {"output_dir": str(dense)}
    PreferenceDataBuilder(engine, PreferenceDataConfig.model_validate(same)).build(tasks=[], progress=False)
    other = PreferenceDataConfig.model_validate(same | {"prefixes_per_sample": 2})  # build-data resuming it keeps them
    with pytest.raises(ValueError, match="'prefixes_per_sample': \\(4, 2\\)"):
        PreferenceDataBuilder(engine, other).build(tasks=[], progress=False)
    drawn = []  # one length a sample: drawn from the eligible ones, seeded, so the same on a rerun
    for name in ("one", "one-again"):
        one = ["relabel", str(src), "--output-dir", str(tmp_path / name), *lengths, "--prefixes-per-sample", "1"]
        assert capeval_main(one) == 0
        drawn.append([x.prefix_lengths for r in read_records(tmp_path / name / "preferences.jsonl") for x in r.samples])
    assert capeval_main(one) == 2  # into a folder that holds data: refused
    assert drawn[0] == drawn[1] and all(len(k) <= 1 for k in drawn[0]) and len({k[0] for k in drawn[0] if k}) > 1
    capsys.readouterr()
    bad = ["relabel", str(src), "--reward", "partial_credit", "--output-dir"]
    assert capeval_main([*bad, str(tmp_path / "b1"), "--prefixes-per-sample", "-1"]) == 2
    assert "prefixes_per_sample" in capsys.readouterr().err
    assert capeval_main([*bad, str(tmp_path / "b2"), "--prefix-lengths", "0,8"]) == 2
    assert "prefix_lengths" in capsys.readouterr().err
    assert not (tmp_path / "b1").exists() and not (tmp_path / "b2").exists()


def test_extend_continues_cut_short_samples_to_the_longer_decoding(
    engine: TransformersEngine,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    built_data_folder: Callable[[int], Path],
) -> None:
    """``capeval extend``: samples cut at 48 tokens decode on from their own tokens to 64; the rest stay; new labels."""
    src = built_data_folder(2)
    out = tmp_path / "longer"
    card = extend_folder(src, out, engine, 64, prefix_lengths=(8, 16, 32), progress=False)
    before, after = read_records(src / "preferences.jsonl"), read_records(out / "preferences.jsonl")
    assert [r.task for r in after] == [r.task for r in before] and engine.live_rows == 0
    eos = engine.chat_format.eos_token_ids
    kinds = {"continued": 0, "kept": 0, "ended_on_the_way": 0}
    for old, new in zip(before, after, strict=True):
        assert new.prompt_ids == old.prompt_ids
        for a, b in zip(old.samples, new.samples, strict=True):
            assert b.token_ids[: len(a.token_ids)] == a.token_ids and b.seed == a.seed
            assert b.text == engine.chat_format.decode([t for t in b.token_ids if t not in eos])
            assert b.correct == check(Task(**new.task), b.text)
            assert all(k < len(b.token_ids) for k in b.prefix_lengths)
            if a.finish_reason != "length":
                assert (b.token_ids, b.text, b.finish_reason) == (a.token_ids, a.text, a.finish_reason)
                kinds["kept"] += 1
                continue
            kinds["continued"] += 1
            assert 48 < len(b.token_ids) <= 64
            assert (b.finish_reason == "length") == (len(b.token_ids) == 64 and b.token_ids[-1] not in eos)
            kinds["ended_on_the_way"] += b.finish_reason == "eos"
        assert [s.target for s in new.samples] == win_or_tie_targets([s.reward for s in new.samples], 0.0)
    assert kinds["continued"] and kinds["kept"] and kinds["ended_on_the_way"], kinds
    settings = json.loads((out / "build_config.json").read_text())
    assert settings["max_new_tokens"] == card["decoding"]["max_new_tokens"] == 64 and settings["seed"] == 0
    assert card["extended_from"] == str(src)
    assert max(k for r in after for s in r.samples for k in s.prefix_lengths) == 32  # a length only 64 allows
    # Resumable: a second run finds every prompt done and draws nothing.
    lines = (out / "preferences.jsonl").read_text()
    assert extend_folder(src, out, engine, 64, prefix_lengths=(8, 16, 32), progress=False)["counts"] == card["counts"]
    assert (out / "preferences.jsonl").read_text() == lines
    with pytest.raises(ValueError, match=r"max_new_tokens=48 does not extend .* max_new_tokens=48"):
        extend_folder(src, tmp_path / "same", engine, 48)
    with pytest.raises(ValueError, match="not into itself"):
        extend_folder(src, src, engine, 64)
    with pytest.raises(FileNotFoundError, match=r"has no preferences\.jsonl"):
        extend_folder(tmp_path / "none", tmp_path / "x", engine, 64)
    other = tmp_path / "other-model"
    other.mkdir()
    (other / "preferences.jsonl").write_text((src / "preferences.jsonl").read_text())
    (other / "build_config.json").write_text(json.dumps(settings | {"max_new_tokens": 48, "engine_model": "gpt2"}))
    with pytest.raises(ValueError, match="sampled from 'gpt2'"):
        extend_folder(other, tmp_path / "y", engine, 64)
    assert capeval_main(["extend", str(src), "--output-dir", str(tmp_path / "z"), "--max-new-tokens", "32"]) == 2
    assert "does not extend" in capsys.readouterr().err


def test_best_of_n_and_summary() -> None:
    s = [
        EvalSample("a", "f", False, 3, 0.2, 0.1, 0.4, {"8": 0.3}),
        EvalSample("a", "f", True, 9, 0.9, 0.5, 0.05, {"8": 0.6}),
        EvalSample("b", "f", False, 3, 0.7, 0.3, 0.1),
        EvalSample("b", "f", False, 3, 0.4, 0.3, 0.4),
    ]
    assert best_of_n(s) == {"pass_at_1": 0.25, "best_of_n_selfeval": 0.5, "oracle": 0.5, "prompts": 2}
    out = summarize(s, (8, 16))
    assert out["auroc_full"] == 1.0
    assert out["auroc_at"] == {"8": 1.0, "16": None}
    assert out["samples_at"] == {"8": 2, "16": 0}
    assert out["auroc_checker_at"] == {"8": None, "16": None}, "no verdicts recorded: no reference"
    # The reference: the task's checker on the paused text, here already stating the right answer in the
    # right response only (1.0), then in neither (0.5: the prefix says nothing yet).
    s[0].right_at, s[1].right_at = {"8": False}, {"8": True}
    assert summarize(s, (8, 16))["auroc_checker_at"] == {"8": 1.0, "16": None}
    s[1].right_at = {"8": False}
    assert summarize(s, (8,))["auroc_checker_at"] == {"8": 0.5}
    s[1].right_at = {}
    assert summarize(s, (8,))["auroc_checker_at"] == {"8": None}, "a verdict missing: no reference"
    # win-or-tie targets: prompt a's wrong answer loses to its right one (0), its right one wins (1);
    # prompt b's two wrong answers tie each other (1 each), like a right answer: 1 win + 2 ties of 3 pairs.
    for sample, target in zip(s, (0.0, 1.0, 1.0, 1.0), strict=True):
        sample.target = target
    assert summarize(s, ())["auroc_win_or_tie_target"] == pytest.approx(2 / 3, abs=1e-4)


def test_pass_at_1_difference_is_paired_over_prompts() -> None:
    """Adapted minus base pass@1 per prompt, averaged; the bootstrap interval resamples prompts."""

    def samples(rights: dict[str, list[bool]]) -> list[EvalSample]:
        return [EvalSample(t, "f", r, 4, 0.5, 0.5, 0.5) for t, rs in rights.items() for r in rs]

    base = samples({"a": [True, True], "b": [True, False], "c": [False, False], "d": [True, True]})
    same = pass_at_1_difference(base, base)
    assert same == {"difference": 0.0, "ci_low": 0.0, "ci_high": 0.0}
    # One right answer fewer on every prompt where there was one to lose: -0.5, -0.5, 0, -0.5 -> -0.375.
    worse = samples({"a": [True, False], "b": [False, False], "c": [False, False], "d": [False, True]})
    d = pass_at_1_difference(base, worse)
    assert d["difference"] == -0.375
    # Three of four prompts lost 0.5: a resample of only those (p = 0.32) is the low end; all four
    # resampled from the one unchanged prompt (p = 0.004) is too rare to reach the high end.
    assert d["ci_low"] == -0.5 and d["difference"] < d["ci_high"] < 0.0
    # Prompts only one side scored are left out (the pairing is by prompt).
    assert pass_at_1_difference(base, worse[:2])["difference"] == -0.5


# --- targets, prefixes, packing ----------------------------------------------------------------


def test_targets_and_prefixes_hand_example() -> None:
    cfg = PreferenceDataConfig(prefix_lengths=(4, 8, 16), prefixes_per_sample=2)
    # rewards 1, 0, 0, 1: right answers beat or tie all 3 others; wrong ones tie 1 of 3 (the other wrong one).
    targets, prefixes = label_samples([1.0, 0.0, 0.0, 1.0], [20, 9, 3, 5], cfg, random.Random(0))
    assert targets == [1.0, 1 / 3, 1 / 3, 1.0]
    assert prefixes[0] in ([4, 8], [4, 16], [8, 16])  # two of the three (all shorter than 20)
    assert prefixes[1] == [4, 8]  # 16 is not shorter than 9
    assert prefixes[2] == []  # 3 tokens: no prefix length fits
    assert prefixes[3] == [4]
    assert choose_prefix_lengths(8, (8,), 1, random.Random(0)) == []  # a prefix must be shorter than the response
    # epsilon 0.5: 0.0 ties 0.5 but loses to 1.0; 0.5 ties both; 1.0 ties 0.5 and beats 0.0.
    eps = PreferenceDataConfig(epsilon=0.5, prefixes_per_sample=0)
    assert label_samples([0.0, 0.5, 1.0], [3, 3, 3], eps, random.Random(0))[0] == [0.5, 1.0, 1.0]


def test_pack_sample_hand_example() -> None:
    prompt, response, suffix, eos = [10, 11], [20, 21, 22, 2], [2, 30, 31], {2}
    packed = pack_sample(prompt, response, suffix, lengths=[4, 2], targets=[0.25, 0.25], eos_ids=eos)
    # trunk; the finished response skips the suffix's end-of-turn; the 2-token prefix keeps it.
    assert packed.input_ids == [10, 11, 20, 21, 22, 2, 30, 31, 2, 30, 31]
    assert packed.position_ids == [0, 1, 2, 3, 4, 5, 6, 7, 4, 5, 6]
    assert packed.branch == [0] * 6 + [1, 1, 2, 2, 2]
    assert packed.cut == [6, 4]
    assert packed.answer_positions == [7, 10]
    assert packed.response_span == (2, 6)
    # each branch's answer row sees exactly the tokens of its own unpacked sequence, in order.
    mask = tree_attention_mask(torch.tensor(packed.branch), torch.tensor([0, *packed.cut]))
    for b, k in enumerate([4, 2]):
        row = mask[packed.answer_positions[b]]
        seen = [packed.input_ids[j] for j in range(len(packed)) if row[j]]
        assert seen == self_evaluation_sequence(prompt, response, k, suffix, eos)
    batch = collate([packed, pack_sample(prompt, response[:1], suffix, [1], [1.0], eos)])
    assert batch.input_ids.shape == (2, 11)
    assert batch.targets.tolist() == [0.25, 0.25, 1.0]
    assert batch.answer_index.tolist() == [7, 10, 11 + 5]  # [10, 11, 20, 2, 30, 31]: the full suffix
    assert batch.response_labels.tolist() == [20, 21, 22, 2, 20]
    assert batch.response_index.tolist() == [1, 2, 3, 4, 11 + 1]
    with pytest.raises(ValueError, match="out of range"):
        pack_sample(prompt, response, suffix, [5], [1.0], eos)


def test_soft_answer_loss_and_batches() -> None:
    logits = torch.tensor([[2.0, 0.0, -1.0]])
    logp = torch.log_softmax(logits, -1)[0]
    expected = -(0.75 * logp[0] + 0.25 * logp[1])
    assert float(soft_answer_loss(logits, torch.tensor([0.75]), 0, 1)) == pytest.approx(float(expected))
    two = torch.log_softmax(logits[:, :2], -1)[0]
    got = float(soft_answer_loss(logits, torch.tensor([0.75]), 0, 1, two_way=True))
    assert got == pytest.approx(float(-(0.75 * two[0] + 0.25 * two[1])))
    lengths = [5, 3, 9, 4, 3]
    for make in (length_batches, shuffled_batches):
        batches = make(lengths, batch_tokens=10, rng=random.Random(1))
        assert sorted(i for b in batches for i in b) == [0, 1, 2, 3, 4]
        assert all(max(lengths[i] for i in b) * len(b) <= 10 or len(b) == 1 for b in batches)
    # length batches sort; shuffled ones mix lengths (so families): on 40 lengths in two groups, most batches mix
    two_groups = [10] * 20 + [30] * 20
    mixed = lambda bs: sum(len({two_groups[i] for i in b}) > 1 for b in bs)  # noqa: E731
    assert mixed(length_batches(two_groups, 120, random.Random(0))) <= 1
    assert mixed(shuffled_batches(two_groups, 120, random.Random(0))) >= 5


# --- on the real model -------------------------------------------------------------------------


def _answer_logits(model: torch.nn.Module, sequences: list[list[int]], batch: int = 16) -> list[torch.Tensor]:
    """The next-token logits after each of ``sequences``: the self-evaluation answer's distribution.

    A plain forward pass (not the engine's code), ``batch`` sequences at a time, right-padded (masked
    keys, positions from 0 as unpadded), the output projection applied at each last token only.
    """
    out: list[torch.Tensor] = []
    with torch.inference_mode():
        for i in range(0, len(sequences), batch):
            chunk = sequences[i : i + batch]
            width = max(map(len, chunk))
            ids = torch.tensor([[*seq, *[0] * (width - len(seq))] for seq in chunk])
            mask = torch.tensor([[1] * len(seq) + [0] * (width - len(seq)) for seq in chunk])
            hidden = model.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state
            last = hidden[torch.arange(len(chunk)), torch.tensor([len(seq) - 1 for seq in chunk])]
            out.extend(model.get_output_embeddings()(last))
    return out


def _p_win_or_tie(model: torch.nn.Module, sequences: list[list[int]], no_id: int, yes_id: int) -> list[float]:
    return [_win_or_tie(logits, no_id, yes_id) for logits in _answer_logits(model, sequences)]


def _win_or_tie(logits: torch.Tensor, no_id: int, yes_id: int) -> float:
    """P(win or tie) from one self-evaluation's logits, as the engines read it."""
    p_no, p_yes = answer_probabilities(logits[None], no_id, yes_id)
    return win_or_tie_probability(float(p_no[0]), float(p_yes[0]))


def _worst_answer_rank(all_logits: list[torch.Tensor], no_id: int, yes_id: int) -> int:
    """The lowest rank (0 = most likely) either answer takes in the full softmax over ``all_logits``."""
    return max(int((logits > logits[token]).sum()) for logits in all_logits for token in (no_id, yes_id))


def test_packed_sequence_matches_the_engine(engine: TransformersEngine) -> None:
    """The tree-packed training sequence gives the engine's own P("No"), at a prefix and at the end."""
    fmt = engine.chat_format
    prompt = fmt.encode([{"role": "user", "content": "What is 3 + 5?"}])
    rows = engine.submit(prompt, [SamplingParams(temperature=0.8, max_new_tokens=14, seed=s) for s in (1, 2)])
    try:
        engine.generate(rows, until=4)
        mid = engine.self_evaluate(rows)
        samples = engine.generate(rows)
        end = engine.self_evaluate(rows)
    finally:
        engine.close_request(samples[0].request_id)
    no_id, yes_id = fmt.answer_token_ids
    packs = [
        pack_sample(prompt, s.token_ids, fmt.self_evaluation_suffix, [s.num_tokens, 4], [1.0, 1.0], fmt.eos_token_ids)
        for s in samples
    ]
    batch = collate(packs)
    with torch.inference_mode():
        model: torch.nn.Module = engine.model  # type: ignore[assignment]
        hidden = model.model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids
        ).last_hidden_state
        logits = model.lm_head(hidden.reshape(-1, hidden.shape[-1])[batch.answer_index]).double()
    p = torch.softmax(logits, -1)
    packed = (p[:, no_id] / (p[:, no_id] + p[:, yes_id])).tolist()
    expected = [x for pair in zip(end, mid, strict=True) for x in (pair[0].p_win_or_tie, pair[1].p_win_or_tie)]
    assert packed == pytest.approx(expected, abs=2e-4)


def _build(engine: TransformersEngine, out: Path, prompts: int, **settings: object) -> PreferenceDataBuilder:
    tiny: dict[str, object] = {
        "output_dir": str(out),
        "families": ("add1", "capitals"),
        "max_prompts_per_family": prompts,
        "num_samples": 4,
        "max_new_tokens": 12,
        "prefix_lengths": (4, 8),
        "prefixes_per_sample": 2,
        "prompts_per_batch": 2,
    }
    cfg = PreferenceDataConfig.model_validate(tiny | settings)
    return PreferenceDataBuilder(engine, cfg)


def test_data_builder_resumes_without_duplicates(engine: TransformersEngine, tmp_path: Path) -> None:
    first = _build(engine, tmp_path, prompts=1)
    card = first.build(progress=False)
    assert card["counts"]["prompts"] == 2 and card["counts"]["samples"] == 8
    before = read_records(first.path)
    # an interrupted write leaves a torn last line: the next run drops it and goes on.
    with first.path.open("a") as f:
        f.write('{"task": {"id": "torn')
    second = _build(engine, tmp_path, prompts=2)
    card = second.build(progress=False)
    records = read_records(second.path)
    ids = [r.task_id for r in records]
    assert len(ids) == len(set(ids)) == 4
    assert [r.to_json() for r in records[:2]] == [r.to_json() for r in before]  # done prompts kept as they were
    again = _build(engine, tmp_path, prompts=2).build(progress=False)
    assert again["counts"] == card["counts"]
    assert len(read_records(second.path)) == 4
    for r in records:
        assert all(0.0 <= s.target <= 1.0 and all(k < len(s.token_ids) for k in s.prefix_lengths) for s in r.samples)
        rewards = [s.reward for s in r.samples]
        assert [s.target for s in r.samples] == win_or_tie_targets(rewards, 0.0)
        assert [s.correct for s in r.samples] == [check(Task(**r.task), s.text) for s in r.samples]
        assert [s.is_correct for s in r.samples] == [s.reward > 0 for s in r.samples]
    assert engine.live_rows == 0
    with_prefixes = build_examples(records, engine.chat_format)
    full_only = build_examples(records, engine.chat_format, prefixes=False)
    assert len(with_prefixes) == len(full_only) == 16  # one tree-packed sequence per sample
    assert [e.num_tokens for e in full_only] == [[len(s.token_ids)] for r in records for s in r.samples]
    lengths = [[len(s.token_ids), *s.prefix_lengths] for r in records for s in r.samples]
    assert [e.num_tokens for e in with_prefixes] == lengths
    assert sum(len(e.targets) for e in with_prefixes) > len(full_only)
    written = json.loads((tmp_path / "data_card.json").read_text())
    assert {"model", "seed", "counts", "tie_rate", "label_balance", "decoding"} <= set(written)
    assert (tmp_path / "DATA_CARD.md").read_text().startswith("# Data card")
    other = PreferenceDataConfig(output_dir=str(tmp_path), temperature=0.3)
    with pytest.raises(ValueError, match="other settings"):
        PreferenceDataBuilder(engine, other).build(tasks=[], progress=False)
    with pytest.raises(ValueError, match="'reward': \\('verifiable', 'partial_credit'\\)"):  # labels too
        _build(engine, tmp_path, prompts=2, reward="partial_credit").build(tasks=[], progress=False)


def test_data_builder_with_partial_credit(engine: TransformersEngine, tmp_path: Path) -> None:
    """``reward="partial_credit"``: graded rewards give the targets; accuracy is still the checker's."""
    builder = _build(engine, tmp_path, prompts=2, reward="partial_credit", max_new_tokens=16)
    assert isinstance(builder.reward, PartialCreditReward) and builder.reward_name == "partial_credit"
    card = builder.build(progress=False)
    records = read_records(builder.path)
    samples = [s for r in records for s in r.samples]
    for r in records:
        task = Task(**r.task)
        assert [s.reward for s in r.samples] == PartialCreditReward().score(
            [task.prompt] * 4, [s.text for s in r.samples], [task] * 4
        )
        assert [s.target for s in r.samples] == win_or_tie_targets([s.reward for s in r.samples], 0.0)
        assert [s.correct for s in r.samples] == [s.reward == 1.0 for s in r.samples]
    assert any(0.0 < s.reward < 1.0 for s in samples)  # graded wrong answers, which 0/1 would tie
    accuracy = round(sum(bool(s.correct) for s in samples) / len(samples), 4)
    assert card["label_balance"]["accuracy"] == accuracy != round(sum(s.reward for s in samples) / len(samples), 4)
    assert card["reward"].startswith("partial_credit")
    assert json.loads((tmp_path / "build_config.json").read_text())["reward"] == "partial_credit"
    custom = PreferenceDataBuilder(engine, builder.config, reward=PartialCreditReward())
    assert custom.reward_name == "partial_credit"
    with pytest.raises(ValueError, match=r"epsilon=0\.5 would tie near misses"):
        PreferenceDataConfig(reward="partial_credit", epsilon=0.5)


def test_collect_self_evaluations_scores_through_a_given_scorer(engine: TransformersEngine) -> None:
    """``score=``: called with the rows paused at each checkpoint, then with every row; its answers are the figures.

    A scorer that records what it scored, then reverses the engine's answers: the samples are the
    same draws (seeded), every checkpoint's rows are paused at it, the last call has every row
    finished, and each figure is the reversed one, so a scorer that was not used fails.
    """
    cfg = SelfEvalEvalConfig(num_samples=2, max_new_tokens=10, checkpoints=(4,), prompts_per_batch=2)
    tasks = list(build_suite(["add1"], n_per_family=12, seed=0).test[:2])
    calls: list[list[tuple[int, bool]]] = []

    def reversed_score(rows):
        calls.append([(s.num_tokens, s.finished) for s in map(engine.sample, rows)])
        return [
            dataclasses.replace(e, p_win_or_tie=1 - e.p_win_or_tie, p_no=e.p_yes, p_yes=e.p_no)
            for e in engine.self_evaluate(rows)
        ]

    plain = collect_self_evaluations(engine, tasks, cfg, progress=False)
    hooked = collect_self_evaluations(engine, tasks, cfg, score=reversed_score, progress=False)
    drawn = lambda xs: [(s.task_id, s.num_tokens, s.correct) for s in xs]  # noqa: E731
    assert drawn(hooked) == drawn(plain)
    assert len(calls) == 2  # one batch: the checkpoint, then the end
    assert calls[0] and all(n == 4 and not done for n, done in calls[0])
    assert len(calls[1]) == 4 and all(done for _, done in calls[1])
    for h, p in zip(hooked, plain, strict=True):
        assert (h.p_no, h.p_yes) == pytest.approx((p.p_yes, p.p_no), abs=1e-5)
        assert h.p_full == pytest.approx(1 - p.p_full, abs=1e-5)
        assert h.p_at.keys() == p.p_at.keys()
        assert all(h.p_at[k] == pytest.approx(1 - p.p_at[k], abs=1e-5) for k in h.p_at)


def test_end_to_end_tiny_pipeline(engine: TransformersEngine, tmp_path: Path) -> None:
    """Build data, train a tiny LoRA to say "No" (p = 1), save, load it in the engine: P(win or tie) rises."""
    builder = _build(engine, tmp_path / "data", prompts=1)
    builder.build(progress=False)
    records = read_records(builder.path)
    for r in records:
        for s in r.samples:
            s.target = 1.0
    config = SelfEvalTrainingConfig(
        data=str(builder.path),
        output_dir=str(tmp_path / "adapter"),
        lora_r=4,
        lora_alpha=8,
        target_modules=("q_proj", "v_proj", "down_proj"),
        layers_to_transform=(27, 28, 29),  # backward stops at layer 27: fast
        learning_rate=2e-2,
        warmup_steps=0,
        max_steps=5,
        batch_tokens=100_000,
        regularizer="sft",
        regularizer_weight=0.1,
        log_every=1,
        save_every=2,
        keep_checkpoints=True,
    )
    loaded = load_model(None)
    layer = loaded.model.model.layers[29].self_attn.q_proj
    base_weight = layer.weight.detach().clone()
    trainer = SelfEvalTrainer(loaded.model, loaded.tokenizer, config, records=records)
    assert len(trainer.examples) == 8  # one packed sequence per sample
    result = trainer.train(progress=False)
    losses = [row["answer_loss"] for row in result.history]
    assert result.steps == 5 and losses[-1] < losses[0] * 0.5, losses
    # the KL regularizer's base logits come from the trunks only, with the adapter off: same as a full pass
    batch = collate(trainer.examples[:3])
    with torch.no_grad(), trainer.model.disable_adapter():
        full = trainer._lm_head(trainer._hidden(batch)[batch.response_index])
    assert torch.allclose(trainer._base_response_logits(batch), full, atol=1e-4)
    trainer.config = config.model_copy(update={"regularizer": "kl"})
    _, parts = trainer.compute_loss(batch)
    assert parts["regularizer"] > 0  # the trained LoRA moved the response-token distribution
    # steps 2 and 4 were kept as checkpoints beside the latest save; each a loadable adapter, the two apart
    kept = sorted(p.name for p in (tmp_path / "adapter").glob("checkpoint-*"))
    assert kept == ["checkpoint-2", "checkpoint-4"], kept
    step_weights = [load_file(str(tmp_path / "adapter" / k / "adapter_model.safetensors")) for k in kept]
    assert step_weights[0].keys() == step_weights[1].keys()
    assert any(not torch.equal(step_weights[0][k], step_weights[1][k]) for k in step_weights[0])
    assert json.loads((tmp_path / "adapter" / "checkpoint-4" / "train_log.json").read_text())["steps"] == 4
    saved = trainer.save()
    assert (saved / "adapter_model.safetensors").is_file()
    adapter_config = json.loads((saved / "adapter_config.json").read_text())
    assert set(adapter_config["target_modules"]) == {"q_proj", "v_proj", "down_proj"}
    assert not adapter_config.get("modules_to_save")
    peft_layer = trainer.model.get_base_model().model.layers[29].self_attn.q_proj
    assert torch.equal(peft_layer.base_layer.weight, base_weight)  # base weights untouched
    assert peft_layer.lora_B["default"].weight.abs().sum() > 0  # LoRA weights moved (B starts at zero)

    # the saved adapter merges into a fresh copy of the model and runs in the engine
    fresh = load_model(None)
    adapted = TransformersEngine(apply_adapter(fresh.model, saved), fresh.tokenizer, name="adapted")
    fmt = engine.chat_format
    no_id, yes_id = fmt.answer_token_ids
    seqs = [
        self_evaluation_sequence(r.prompt_ids, s.token_ids, n, fmt.self_evaluation_suffix, fmt.eos_token_ids)
        for r in records
        for s in r.samples[:2]
        for n in (len(s.token_ids), 4)
    ]
    before = _p_win_or_tie(engine.model, seqs, no_id, yes_id)
    after = _p_win_or_tie(adapted.model, seqs, no_id, yes_id)
    assert sum(after) / len(after) > sum(before) / len(before) + 0.1
    assert all(a > b for a, b in zip(after, before, strict=True))
    # through the inference path (engine.self_evaluate), on fresh held-out prompts
    cfg = SelfEvalEvalConfig(adapter=None, num_samples=2, max_new_tokens=8, checkpoints=(4,), prompts_per_batch=2)
    tasks = list(build_suite(["add1"], n_per_family=12, seed=0).test[:2])
    base_scores = collect_self_evaluations(engine, tasks, cfg, progress=False)
    adapted_scores = collect_self_evaluations(adapted, tasks, cfg, progress=False)
    mean = lambda xs: sum(x.p_full for x in xs) / len(xs)  # noqa: E731
    assert mean(adapted_scores) > mean(base_scores)
    assert all("4" in x.p_at for x in adapted_scores if x.num_tokens > 4)


def test_self_evaluation_scoped_training_runs_as_the_engine_does(
    engine: TransformersEngine, built_data_folder: Callable[[int], Path], tmp_path: Path
) -> None:
    """``scope="self_evaluation"``: the chunk trains over the base weights' cache; the engine runs the same function.

    A tiny LoRA trained to say "No" (p = 1) on two prompts of committed data: the loss falls, the folder
    records the scope, the engine built from it decodes the base model's tokens, and its P(win or tie)
    is the trainer's own over the base cache (``chunk_answer_logits``), higher than the base model's.
    """
    records = read_records(built_data_folder(2) / "preferences.jsonl")
    for r in records:
        for s in r.samples:
            s.target = 1.0
    config = SelfEvalTrainingConfig(
        data="unused: records are given",
        output_dir=str(tmp_path / "adapter"),
        scope="self_evaluation",
        samples_per_prompt=2,
        lora_r=4,
        lora_alpha=8,
        target_modules=("q_proj", "v_proj", "down_proj"),
        layers_to_transform=(27, 28, 29),
        answer_loss="two_way",
        learning_rate=2e-2,
        warmup_steps=0,
        max_steps=5,
        batch_tokens=100_000,
        log_every=1,
    )
    assert (config.regularizer, config.batch_order) == ("none", "shuffled")  # the scope's defaults
    loaded = load_model(None)
    trainer = SelfEvalTrainer(loaded.model, loaded.tokenizer, config, records=records)
    fmt = engine.chat_format
    assert all(isinstance(e, ChunkExample) for e in trainer.examples)  # full response, then each prefix
    assert len(trainer.examples) == sum(1 + len(s.prefix_lengths) for r in records for s in r.samples[:2]) > 4
    first = trainer.examples[0]
    sample = records[0].samples[0]
    assert first.trunk + first.chunk == self_evaluation_sequence(
        records[0].prompt_ids, sample.token_ids, len(sample.token_ids), fmt.self_evaluation_suffix, fmt.eos_token_ids
    )
    result = trainer.train(progress=False)
    losses = [row["answer_loss"] for row in result.history]
    assert result.steps == 5 and losses[-1] < losses[0] * 0.5, losses
    assert all(row["regularizer"] == 0.0 for row in result.history)
    saved = trainer.save()
    assert adapter_scope(saved) == "self_evaluation"
    assert json.loads((saved / "training_config.json").read_text())["regularizer"] == "none"

    no_id, yes_id = fmt.answer_token_ids
    prompt = fmt.encode([{"role": "user", "content": "What is 4 + 3?"}])
    params = [SamplingParams(temperature=0.8, max_new_tokens=12, seed=s) for s in (3, 4)]
    scoped = TransformersEngine.from_config(TransformersEngineConfig(adapter=str(saved), cache_merged=False))
    outputs = []
    for e in (engine, scoped):
        rows = e.submit(prompt, params)
        try:
            samples = e.generate(rows)
            outputs.append(([s.token_ids for s in samples], [x.p_win_or_tie for x in e.self_evaluate(rows)]))
        finally:
            e.close_request(samples[0].request_id)
    (base_tokens, base_p), (tokens, p) = outputs
    assert tokens == base_tokens, "a self-evaluation-scoped adapter leaves generation the base model's"
    assert all(a > b + 0.05 for a, b in zip(p, base_p, strict=True)), (p, base_p)
    chunks = [ChunkExample.of(prompt, t, len(t), fmt.self_evaluation_suffix, 1.0, fmt.eos_token_ids) for t in tokens]
    with torch.no_grad():
        two_way = chunk_answer_logits(trainer.model, chunks)[:, [no_id, yes_id]].double().softmax(-1)[:, 0]
    assert two_way.tolist() == pytest.approx(p, abs=2e-3), "training scores what the engine scores"
    scoped.close()
    with pytest.raises(ValueError, match=r"regularizer='sft'.*scope='self_evaluation'"):
        SelfEvalTrainingConfig(scope="self_evaluation", regularizer="sft")


# --- configs and CLI ---------------------------------------------------------------------------


def test_cli_flags_come_from_the_configs() -> None:
    parser = argparse.ArgumentParser(prog="capeval")
    add_training_commands(parser.add_subparsers(dest="command"))
    ns = parser.parse_args(
        ["build-data", "--families", "add1,sub1", "--max-prompts-per-family", "3", "--epsilon", "0.1"]
    )
    cfg = config_from_args(PreferenceDataConfig, ns)
    assert (cfg.families, cfg.max_prompts_per_family, cfg.epsilon) == (("add1", "sub1"), 3, 0.1)
    assert config_from_args(
        PreferenceDataConfig, parser.parse_args(["build-data", "--reward", "partial_credit"])
    ).reward == ("partial_credit")
    ns = parser.parse_args(["train", "--no-pack-prefixes", "--regularizer", "kl", "--target-modules", "q_proj,v_proj"])
    train = config_from_args(SelfEvalTrainingConfig, ns)
    assert (train.pack_prefixes, train.regularizer, train.target_modules) == (False, "kl", ("q_proj", "v_proj"))
    scoped = config_from_args(SelfEvalTrainingConfig, parser.parse_args(["train", "--scope", "self_evaluation"]))
    assert (scoped.scope, scoped.regularizer) == ("self_evaluation", "none")
    ns = parser.parse_args(["eval-selfeval", "--adapter", "none", "--checkpoints", "8,16"])
    ev = config_from_args(SelfEvalEvalConfig, ns)
    assert (ev.adapter, ev.checkpoints) == (None, (8, 16))
    help_text = parser._subparsers._group_actions[0].choices["train"].format_help()  # type: ignore[union-attr]
    assert "Soft cross-entropy on the answer token" in help_text
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--answer-loss", "mse"])


def test_configs_validate() -> None:
    with pytest.raises(ValueError, match="strictly increasing"):
        PreferenceDataConfig(prefix_lengths=(16, 8))
    with pytest.raises(ValueError, match="also in families"):
        SelfEvalEvalConfig(heldout_family="add1")
    with pytest.raises(ValueError, match="extra"):
        SelfEvalTrainingConfig(lr=1.0)  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="keep_checkpoints: give save_every"):
        SelfEvalTrainingConfig(keep_checkpoints=True)


# -- the shipped adapter --------------------------------------------------------------------------


def test_shipped_adapter_is_a_vllm_valid_lora_and_loads_by_default(engine: TransformersEngine) -> None:
    """The adapter in the package is a plain PEFT LoRA, ``adapter="default"`` loads it, and it moved P(No).

    On samples it was trained on (the committed on-policy data: two prompts of each of the six families with
    right and wrong answers among their first 8 samples, 96 responses), the base model's P(win or tie) ranks
    the right answers below the wrong ones (AUROC ~0.39) and the adapter's ranks them above (~0.83).
    """
    from langchain_capeval.adapters import default_adapter_path, resolve_adapter
    from langchain_capeval.engines.transformers import TransformersEngineConfig

    shipped = default_adapter_path()
    assert shipped is not None, "no adapter ships in langchain_capeval/data/adapters/"
    cfg = json.loads((shipped / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 16 and not cfg.get("modules_to_save")
    assert set(cfg["target_modules"]) <= {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert (shipped / "adapter_model.safetensors").stat().st_size < 25 * 2**20
    assert resolve_adapter(None, "default") == shipped and adapter_scope(shipped) == "every_token"

    data = Path(__file__).parents[1] / "results/training/v5-suffix-lora/data/preferences.jsonl"
    picked: list[dict] = []
    per_family: dict[str, int] = {}
    for line in data.read_text().splitlines():
        record = json.loads(line)
        family, correct = record["task"]["family"], [s["reward"] > 0 for s in record["samples"][:8]]
        if any(correct) and not all(correct) and per_family.get(family, 0) < 2:
            per_family[family] = per_family.get(family, 0) + 1
            picked.append(record)
    assert len(picked) == 12, per_family

    fmt = engine.chat_format
    seqs = [
        [*r["prompt_ids"], *s["token_ids"], *fmt.suffix_after(s["token_ids"])] for r in picked for s in r["samples"][:8]
    ]
    right = [s["reward"] > 0 for r in picked for s in r["samples"][:8]]
    no_id, yes_id = fmt.answer_token_ids

    adapted = TransformersEngine.from_config(TransformersEngineConfig(adapter="default"))
    try:
        assert adapted.model_name.endswith("+selfeval")
        adapted_logits = _answer_logits(adapted.model, seqs)
        adapted_p = [_win_or_tie(logits, no_id, yes_id) for logits in adapted_logits]
        aurocs = [auroc(_p_win_or_tie(engine.model, seqs, no_id, yes_id), right), auroc(adapted_p, right)]
        base_auroc, adapted_auroc = aurocs
        assert base_auroc < 0.5 and adapted_auroc > 0.65, aurocs
        # Trained with the full-vocabulary loss, its two answers are the two most likely tokens: a server's
        # top-k logprobs (k >= 2) hold both (the two-way loss left one outside the top 20 in 11% of cases).
        assert _worst_answer_rank(adapted_logits, no_id, yes_id) <= 1
    finally:
        adapted.close()


def test_merged_adapter_is_saved_once_and_loads_the_same_weights(tmp_path: Path) -> None:
    """``cache_merged`` loads the base + adapter merge from a copy saved once, equal to merging in memory.

    The copy's key covers the adapter's bytes: a retrained adapter gets a copy of its own.
    """
    import shutil

    from langchain_capeval import models
    from langchain_capeval.adapters import default_adapter_path

    shipped = default_adapter_path()
    assert shipped is not None
    cached = models.load_model(None, adapter=shipped, cache_merged=True)
    again = models.load_model(None, adapter=shipped, cache_merged=True)
    in_memory = models.load_model(None, adapter=shipped, cache_merged=False)
    base_folder, _ = models.ensure_model_folder(None)
    assert again.report.from_cache and again.report.path == cached.report.path
    assert Path(cached.report.path).parent == models.cache_dir() / "merged"
    assert in_memory.report.path == str(base_folder)
    ids = torch.tensor([in_memory.tokenizer.encode("What is 4 + 3? The answer is 7.")])
    with torch.inference_mode():
        got, want = cached.model(ids).logits, in_memory.model(ids).logits
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()

    retrained = tmp_path / shipped.name
    shutil.copytree(shipped, retrained)
    assert models._merged_dir(base_folder, retrained) == models._merged_dir(base_folder, shipped)
    cfg = retrained / "adapter_config.json"
    cfg.write_text(cfg.read_text() + "\n")
    assert models._merged_dir(base_folder, retrained) != models._merged_dir(base_folder, shipped)


def test_a_checkpoint_saved_by_another_process_first_is_kept(tmp_path: Path) -> None:
    """Two processes building the same cached copy: the one that renames second keeps the first one's folder."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from langchain_capeval import models

    folder, _ = models.ensure_model_folder(None)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tiny = LlamaForCausalLM(
        LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    )
    target = tmp_path / "merged" / "copy"
    models._save_checkpoint(tiny, tokenizer, target)
    first = (target / "config.json").stat().st_mtime_ns
    models._save_checkpoint(tiny, tokenizer, target)  # the target exists: os.replace cannot replace it
    assert (target / "config.json").stat().st_mtime_ns == first
    assert [p.name for p in target.parent.iterdir()] == ["copy"]  # the loser's temporary folder is gone
    squatter = tmp_path / "merged" / "other"  # a folder that is not a checkpoint: a real error, raised
    squatter.mkdir()
    (squatter / "junk").touch()
    with pytest.raises(OSError):
        models._save_checkpoint(tiny, tokenizer, squatter)
    assert sorted(p.name for p in target.parent.iterdir()) == ["copy", "other"]
