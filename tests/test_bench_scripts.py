"""The standalone benchmark programs in ``bench/`` run end to end at a tiny size and write their JSON.

Their figures are measured on a quiet machine, never here; these runs only keep the programs
from rotting (argument parsing, the engine calls they make, the report they write).
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from langchain_capeval.adapters import adapter_scope
from langchain_capeval.chat_format import ChatFormat
from langchain_capeval.training.dataset import relabel_folder

BENCH = Path(__file__).resolve().parents[1] / "bench"

RUNS = {
    "decode_bench.py": ["--batches", "1,3", "--steps", "1", "--repeats", "1", "--adapter", "none"],
    "engine_bench.py": ["--batch", "2", "--new-tokens", "8", "--drop-at", "4", "--repeats", "1", "--adapter", "none"],
    "selfeval_floor.py": ["--batch", "2", "--new-tokens", "8", "--repeats", "1", "--adapter", "none"],
    "load_bench.py": ["throughput", "--requests", "2", "--max-tokens", "6", "--repeats", "1", "--adapter", "none"],
    "adapter_bench.py": ["--repeats", "1", "--new-tokens", "4"],
    "prefix_answers.py": ["--lengths", "8,16"],
}


def test_suffix_lora_trains_and_evaluates(tmp_path: Path) -> None:
    """One training step of the chunk-only LoRA, then the evaluation at its smallest size."""
    data = Path(__file__).resolve().parents[1] / "results/training/v2/data/preferences.jsonl"
    adapter, report = tmp_path / "adapter", tmp_path / "eval"
    train = ["train", "--data", str(data), "--out", str(adapter), "--epochs", "0.01", "--samples-per-prompt", "1"]
    evaluate = ["eval", "--adapter", str(adapter), "--out", str(report), "--n-per-family", "6"]
    evaluate += ["--max-prompts-per-family", "1", "--num-samples", "2", "--max-new-tokens", "8"]
    for args in (train, evaluate):
        proc = subprocess.run([sys.executable, str(BENCH / "suffix_lora.py"), *args], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-3000:]
    log = json.loads((adapter / "train_log.json").read_text())
    assert log["steps"] == len(log["loss"]) >= 1 and (adapter / "adapter_model.safetensors").is_file()
    assert adapter_scope(adapter) == "self_evaluation", "engines must decode with the base weights"
    result = json.loads((report / "selfeval_eval.json").read_text())
    assert result["trained"]["samples"] > 0 and result["heldout"]["samples"] > 0


def test_suffix_lora_dev_split_scores_held_out_prompts(tmp_path: Path) -> None:
    """``--dev-every``/``--heldout-family``: prompts never trained on, scored as training goes; ``--prefixes``."""
    data = Path(__file__).resolve().parents[1] / "results/training/v2/data/preferences.jsonl"
    records = [json.loads(line) for line in data.read_text().splitlines()[:6]]
    for record in records:  # 8 of each prompt's 16 samples: the dev split scores every sample of its prompts
        record["samples"] = record["samples"][:8]
    small = tmp_path / "preferences.jsonl"
    small.write_text("".join(json.dumps(record) + "\n" for record in records))
    adapter = tmp_path / "adapter"
    args = ["train", "--data", str(small), "--out", str(adapter), "--samples-per-prompt", "2"]
    args += ["--epochs", "1", "--learning-rate", "1e-2", "--dev-every", "3", "--eval-every", "1", "--prefixes"]
    args += ["--heldout-family", "opposites"]  # prompt 5 (prompt 3, also opposites, is held out by --dev-every)
    proc = subprocess.run(
        [sys.executable, str(BENCH / "suffix_lora.py"), *args], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = json.loads((adapter / "train_log.json").read_text())
    trained = [records[i]["samples"][:2] for i in (1, 2, 4)]  # two samples each
    prefixes = sum(len(s["prefix_lengths"]) for samples in trained for s in samples)
    assert prefixes > 0 and log["examples"] == 3 * 2 + prefixes  # each full response and its truncations
    assert log["steps"] == math.ceil(log["examples"] / 16)  # one epoch of 16-sample batches
    assert log["dev_prompts"] == 3  # prompts 0, 3 and 5, all 8 samples each
    assert log["dev_families"] == sorted(records[i]["task"]["family"] for i in (0, 3)) == ["add1", "opposites"]
    assert [row["step"] for row in log["dev_log"]] == list(range(log["steps"] + 1))
    for row in log["dev_log"]:
        assert 0.0 < row["mean_p_win_or_tie"] < 1.0 and row["auroc_full"] is not None
        assert set(row["auroc_at"]) == {"16"} and set(row["auroc_full_by_family"]) == {"add1", "opposites"}
        assert row["auroc_win_or_tie_target"] == log["dev_log"][0]["auroc_win_or_tie_target"]  # the data's, fixed
    assert log["dev_log"][0]["mean_p_win_or_tie"] != log["dev_log"][-1]["mean_p_win_or_tie"]  # the step changed it


def test_suffix_lora_correctness_target_is_the_reward(chat_format: ChatFormat) -> None:
    """``--target correctness`` trains on the 0/1 reward; the dev split keeps the win-or-tie target."""
    spec = importlib.util.spec_from_file_location("suffix_lora", BENCH / "suffix_lora.py")
    assert spec is not None and spec.loader is not None
    suffix_lora = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(suffix_lora)
    data = Path(__file__).resolve().parents[1] / "results/training/v2/data/preferences.jsonl"
    records = [json.loads(line) for line in data.read_text().splitlines()[:6]]
    kept = [s for i, r in enumerate(records) if i % 3 for s in r["samples"][:4]]  # prompts 0 and 3 held out
    by_target: dict[str, tuple[list[float], list[float]]] = {}
    for target in ("win_or_tie", "correctness"):
        examples, dev = suffix_lora.load_examples(str(data), chat_format, 4, dev_every=3, target=target)
        examples = examples[: len(kept)]  # the first six prompts' examples come first
        by_target[target] = ([e.target for e in examples], [row[0].target for row in dev[:8]])
    assert by_target["win_or_tie"][0] == [s["target"] for s in kept]
    assert by_target["correctness"][0] == [float(s["reward"] > 0) for s in kept]
    assert by_target["correctness"][0] != by_target["win_or_tie"][0]  # wrong answers with a high target
    assert by_target["correctness"][1] == by_target["win_or_tie"][1]  # dev rows keep the win-or-tie target
    with pytest.raises(ValueError, match="target must be one of"):
        suffix_lora.load_examples(str(data), chat_format, 4, target="reward")


def test_suffix_lora_trains_on_relabelled_targets(
    chat_format: ChatFormat, tmp_path: Path, built_data_folder: Callable[[int], Path]
) -> None:
    """Data relabelled with partial credit: graded win-or-tie targets, correctness still the checker's."""
    spec = importlib.util.spec_from_file_location("suffix_lora", BENCH / "suffix_lora.py")
    assert spec is not None and spec.loader is not None
    suffix_lora = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(suffix_lora)
    src = built_data_folder(12)
    relabel_folder(src, tmp_path / "graded", "partial_credit")
    graded = [json.loads(line) for line in (tmp_path / "graded/preferences.jsonl").read_text().splitlines()]
    examples, dev = suffix_lora.load_examples(str(tmp_path / "graded/preferences.jsonl"), chat_format, 4, dev_every=3)
    plain, plain_dev = suffix_lora.load_examples(str(src / "preferences.jsonl"), chat_format, 4, dev_every=3)
    kept = [s for i, r in enumerate(graded) if i % 3 for s in r["samples"][:4]]
    same = [(e.trunk, e.chunk) for e in examples] == [(e.trunk, e.chunk) for e in plain]
    assert same, "the same examples, other targets"
    assert [e.target for e in examples] == [s["target"] for s in kept] != [e.target for e in plain]
    assert any(0.0 < s["reward"] < 1.0 for s in kept)  # wrong answers with partial credit: not counted right
    assert [row[1].correct for row in dev] == [row[1].correct for row in plain_dev]
    examples, _ = suffix_lora.load_examples(
        str(tmp_path / "graded/preferences.jsonl"), chat_format, 4, dev_every=3, target="correctness"
    )
    assert [e.target for e in examples] == [float(s["correct"]) for s in kept]


@pytest.mark.parametrize("script", sorted(RUNS))
def test_bench_program_runs_and_writes_json(script: str, tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH / script), *RUNS[script], "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert out.is_file(), proc.stderr[-3000:]
    result = json.loads(out.read_text())
    # load_bench exits 1 when its goal is not met, which two short requests never meet
    assert proc.returncode == (0 if result.get("met", True) else 1), proc.stderr[-3000:]
    assert "|" in proc.stdout, "prints a table"
    if script == "decode_bench.py":
        assert [r["batch"] for r in result["rows"]] == [1, 3]
        assert all(r["packed_ms"] > 0 and r["plain_ms"] > 0 and r["second_team_ms"] > 0 for r in result["rows"])
    elif script == "load_bench.py":
        assert result["runs"]["sequential"]["generated_tokens"] == result["runs"]["concurrent"]["generated_tokens"]
    elif script == "adapter_bench.py":
        assert set(result["memory"]) == {"base", "lora", "merged_copy"}
        assert 15 < result["lora_mib"] < 25  # the adapter's own tensors (19.6 MB on disk)
        assert all(t["decode_s"] > 0 and t["selfeval_s"] > 0 for t in result["time"].values())
    elif script == "prefix_answers.py":  # the committed training data: what its first 8 and 16 tokens have stated
        assert [r["tokens"] for r in result["rows"]] == [8, 16]
        assert all(r["stated_if_ends_right"] > 5 * r["stated_if_ends_wrong"] for r in result["rows"])
        assert 0.5 < result["rows"][0]["auroc_checker"] < result["rows"][1]["auroc_checker"] < 1.0
    else:
        assert result  # the program's own checks (equal tokens, exact P("No")) ran before it wrote
