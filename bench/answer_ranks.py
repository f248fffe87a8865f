"""Where "No" and "Yes" rank in the full softmax after the self-evaluation turn: base model vs default adapter.

An OpenAI-compatible server (and vLLM without ``logprob_token_ids``) returns the top-20 logprobs only, and
an answer outside them reads as probability 0. On the committed on-policy samples (the first 8 samples of
every 4th prompt, 60 prompts, teacher-forced), this counts how often both answers are in the top 20.

    python bench/answer_ranks.py results/training/v11-default-full-vocab/answer_ranks.json  # 4 min, shipped default
    python bench/answer_ranks.py OUT.json runs/default-pc   # an adapter folder instead (v10: section 15's adapter)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from langchain_capeval.engines.transformers import TransformersEngine, TransformersEngineConfig

DATA = Path(__file__).parents[1] / "results/training/v5-suffix-lora/data/preferences.jsonl"


def answer_ranks(engine: TransformersEngine, records: list[dict]) -> dict[str, float]:
    """Share of responses whose two answers are in the top 20 (and top 5), the worst 0-based rank, the mean mass."""
    fmt = engine.chat_format
    no, yes = fmt.answer_token_ids
    ranks, mass = [], []
    for record in records:
        for sample in record["samples"][:8]:
            ids = record["prompt_ids"] + sample["token_ids"] + fmt.suffix_after(sample["token_ids"])
            with torch.inference_mode():
                p = engine.model(torch.tensor([ids])).logits[0, -1].softmax(-1)
            order = torch.argsort(p, descending=True).tolist()
            ranks.append((order.index(no), order.index(yes)))
            mass.append(float(p[no] + p[yes]))
    n = len(ranks)
    return {
        "n": n,
        "both_in_top20": sum(a < 20 and b < 20 for a, b in ranks) / n,
        "neither_in_top20": sum(a >= 20 and b >= 20 for a, b in ranks) / n,
        "both_in_top5": sum(a < 5 and b < 5 for a, b in ranks) / n,
        "worst_rank": max(max(a, b) for a, b in ranks),
        "mean_mass": sum(mass) / n,
    }


def main(out: str, adapter_path: str = "default") -> None:
    records = [json.loads(line) for line in DATA.read_text().splitlines()][::4][:60]
    report = {}
    for name, adapter in (("base", None), (adapter_path, adapter_path)):
        engine = TransformersEngine.from_config(TransformersEngineConfig(adapter=adapter))
        try:
            report[name] = answer_ranks(engine, records)
        finally:
            engine.close()
        print(name, report[name], flush=True)
    Path(out).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main(*sys.argv[1:3])
