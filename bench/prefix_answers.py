"""How much of its answer a response has stated after its first k tokens (docs/training.md, section 18).

The issue asks self-evaluation to rank correctness at AUROC >= 0.80 from the first 16 tokens. This reads
on-policy samples (a ``preferences.jsonl`` of ``capeval build-data``) and asks the task's own checker
about each prefix: does the text of the first k tokens already state the right answer? Per prefix length
it prints, over the samples still generating there, the share of responses that end right (and of those
that end wrong) whose prefix the checker already accepts, and the AUROC of that 0/1 verdict for the final
correctness: what a reader that checked the stated answer perfectly, and knew nothing else, would score.

    python bench/prefix_answers.py                     # the committed training data (269 prompts), ~10 s
    python bench/prefix_answers.py runs/data/preferences.jsonl --lengths 8,16,32,64 --out runs/prefix.json
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from langchain_capeval.chat_format import ChatFormat
from langchain_capeval.models import ensure_model_folder
from langchain_capeval.tasks import Task, check
from langchain_capeval.training.dataset import PromptRecord, read_records
from langchain_capeval.training.metrics import auroc

DATA = Path(__file__).parents[1] / "results/training/v5-suffix-lora/data/preferences.jsonl"


def prefix_answers(records: list[PromptRecord], fmt: ChatFormat, lengths: list[int]) -> list[dict]:
    """One row per prefix length: samples, share stating the right answer by final outcome, the checker's AUROC."""
    verdicts: dict[int, list[tuple[bool, bool]]] = {k: [] for k in lengths}  # (ends right, prefix states it)
    for record in records:
        task = Task(**record.task)
        for sample in record.samples:
            for k in lengths:
                if len(sample.token_ids) > k:  # still generating at k tokens, as the engine pauses it
                    verdicts[k].append((sample.is_correct, check(task, fmt.decode(sample.token_ids[:k]))))
    rows = []
    for k in lengths:
        ends_right = [stated for right, stated in verdicts[k] if right]
        ends_wrong = [stated for right, stated in verdicts[k] if not right]
        score = auroc([float(stated) for _, stated in verdicts[k]], [float(right) for right, _ in verdicts[k]])
        rows.append(
            {
                "tokens": k,
                "samples": len(verdicts[k]),
                "end_right": len(ends_right),
                "stated_if_ends_right": round(sum(ends_right) / len(ends_right), 4) if ends_right else None,
                "stated_if_ends_wrong": round(sum(ends_wrong) / len(ends_wrong), 4) if ends_wrong else None,
                "auroc_checker": None if score is None else round(score, 4),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", nargs="?", default=str(DATA), help="a preferences.jsonl (default: committed data)")
    parser.add_argument("--lengths", default="8,16,32", help="prefix lengths in tokens, comma separated")
    parser.add_argument("--out", default=None, help="write the rows here as JSON")
    args = parser.parse_args(argv)
    from transformers import AutoTokenizer

    folder, _ = ensure_model_folder(None)
    fmt = ChatFormat(AutoTokenizer.from_pretrained(folder))
    records = read_records(args.data)
    rows = prefix_answers(records, fmt, [int(x) for x in args.lengths.split(",")])
    print(
        "| tokens | samples still generating | of them end right | states the right answer: ends right / ends wrong "
        "| AUROC of the checker on the prefix |"
    )
    print("|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['tokens']} | {r['samples']} | {r['end_right']} | "
            f"{r['stated_if_ends_right']} / {r['stated_if_ends_wrong']} | {r['auroc_checker']} |"
        )
    if args.out:
        data = os.path.relpath(args.data) if Path(args.data).is_relative_to(Path.cwd()) else args.data
        Path(args.out).write_text(json.dumps({"data": data, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
