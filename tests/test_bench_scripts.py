"""The standalone benchmark programs in ``bench/`` run end to end at a tiny size and write their JSON.

Their figures are measured on a quiet machine, never here; these runs only keep the programs
from rotting (argument parsing, the engine calls they make, the report they write).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"

RUNS = {
    "decode_bench.py": ["--batches", "1,3", "--steps", "1", "--repeats", "1", "--adapter", "none"],
    "engine_bench.py": ["--batch", "2", "--new-tokens", "8", "--drop-at", "4", "--repeats", "1", "--adapter", "none"],
    "selfeval_floor.py": ["--batch", "2", "--new-tokens", "8", "--repeats", "1", "--adapter", "none"],
    "load_bench.py": ["throughput", "--requests", "2", "--max-tokens", "6", "--repeats", "1", "--adapter", "none"],
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
    result = json.loads((report / "selfeval_eval.json").read_text())
    assert result["trained"]["samples"] > 0 and result["heldout"]["samples"] > 0


def test_suffix_lora_dev_split_scores_held_out_prompts(tmp_path: Path) -> None:
    """``--dev-every``: held-out prompts, never trained on, scored as training goes; ``--prefixes``: truncations."""
    data = Path(__file__).resolve().parents[1] / "results/training/v2/data/preferences.jsonl"
    lines = data.read_text().splitlines()[:6]
    small = tmp_path / "preferences.jsonl"
    small.write_text("\n".join(lines) + "\n")
    adapter = tmp_path / "adapter"
    args = ["train", "--data", str(small), "--out", str(adapter), "--samples-per-prompt", "2"]
    args += ["--epochs", "1", "--learning-rate", "1e-2", "--dev-every", "3", "--eval-every", "1", "--prefixes"]
    proc = subprocess.run([sys.executable, str(BENCH / "suffix_lora.py"), *args], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = json.loads((adapter / "train_log.json").read_text())
    trained = [json.loads(lines[i])["samples"][:2] for i in (1, 2, 4, 5)]  # two samples each
    prefixes = sum(len(s["prefix_lengths"]) for samples in trained for s in samples)
    assert prefixes > 0 and log["examples"] == 4 * 2 + prefixes  # each full response and its truncations
    assert log["steps"] == math.ceil(log["examples"] / 16)  # one epoch of 16-sample batches
    assert log["dev_prompts"] == 2  # prompts 0 and 3, all 16 samples each
    assert [row["step"] for row in log["dev_log"]] == list(range(log["steps"] + 1))
    for row in log["dev_log"]:
        assert 0.0 < row["mean_p_win_or_tie"] < 1.0 and row["auroc_full"] is not None
        assert set(row["auroc_at"]) == {"16"}
    assert log["dev_log"][0]["mean_p_win_or_tie"] != log["dev_log"][-1]["mean_p_win_or_tie"]  # the step changed it


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
    else:
        assert result  # the program's own checks (equal tokens, exact P("No")) ran before it wrote
