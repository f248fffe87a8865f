"""How low the self-evaluation cost can go on this machine: its matrix products alone vs generation.

A self-evaluation pushes the pending token and the self-evaluation turn (28 tokens a row)
through every projection of the model: at batch 16 that is 448 tokens of compute-bound
matrix products, whatever the implementation. This program generates the benchmark's
16 x 128-token responses, times one engine self-evaluation of them, then times the same
projections alone (the model's own weights, on 448 rows of activations, all layers) and
a square SGEMM, and prints each as a share of the generation time. The projections'
share is a floor for issue #2's "self-evaluation cost" on this CPU at fp32: no exact
implementation can go below it.

Usage:
    python bench/selfeval_floor.py [--batch 16 --new-tokens 128 --out results/selfeval_floor.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from langchain_capeval.engines.transformers import TransformersEngine, TransformersEngineConfig
from langchain_capeval.sampling import SamplingParams

PROMPT = "Write a long story about a dragon."


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each measurement (best is kept)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--adapter", default="none", help="'none' (base model, as engine_bench), 'default' or a folder")
    parser.add_argument("--out", default="results/selfeval_floor.json")
    return parser.parse_args()


def best_of(fn: Callable[[], Any], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    adapter = None if args.adapter == "none" else args.adapter
    engine = TransformersEngine.from_config(TransformersEngineConfig(adapter=adapter))
    prompt = engine.chat_format.encode([{"role": "user", "content": PROMPT}])
    params = [SamplingParams(temperature=0.8, max_new_tokens=args.new_tokens, seed=s) for s in range(args.batch)]

    def generate() -> list[Any]:
        rows = engine.submit(prompt, params)
        engine.generate(rows)
        return rows

    generate_s = best_of(lambda: engine.release(generate()), 1)
    rows = generate()
    tokens = sum(engine.sample(r).num_tokens for r in rows)
    self_eval_s = best_of(lambda: engine.self_evaluate(rows), args.repeats)
    suffix = 1 + len(engine.chat_format.self_evaluation_suffix)  # the pending token + the turn
    engine.release(rows)

    model: Any = engine.model
    linears = [
        m
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and m is not model.get_output_embeddings()
    ]
    m_rows = args.batch * suffix
    inputs = {m.in_features: torch.randn(m_rows, m.in_features) for m in linears}
    flops = sum(2 * m_rows * m.in_features * m.out_features for m in linears)

    @torch.inference_mode()
    def projections() -> None:
        for m in linears:
            torch.nn.functional.linear(inputs[m.in_features], m.weight)

    # On the engine's scheduler thread, like the engine's own calls: one OpenMP team (engines.cpu).
    projections_s = best_of(lambda: engine.scheduler.run(projections), args.repeats)
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    sgemm_s = best_of(lambda: engine.scheduler.run(lambda: torch.mm(a, b)), args.repeats)

    result = {
        "model": engine.model_name,
        "batch": args.batch,
        "generated_tokens": tokens,
        "self_evaluation_tokens": m_rows,
        "generate_s": generate_s,
        "self_evaluate_s": self_eval_s,
        "projections_s": projections_s,
        "projections_gflop": flops / 1e9,
        "projections_gflops_per_s": flops / projections_s / 1e9,
        "sgemm_2048_gflops_per_s": 2 * 2048**3 / sgemm_s / 1e9,
        "self_eval_cost_pct": 100 * self_eval_s / generate_s,
        "floor_pct": 100 * projections_s / generate_s,
        "goal_pct": 3.0,
        "machine": {
            "torch_threads": torch.get_num_threads(),
            "cpus": os.cpu_count(),
            "load_avg": os.getloadavg(),
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
    }
    print(f"{engine.model_name}; batch {args.batch}, {args.new_tokens} new tokens; best of {args.repeats}")
    print("| measurement | seconds | share of generation |\n|---|---:|---:|")
    print(f"| generate {tokens} tokens | {generate_s:.2f} | 100% |")
    print(f"| engine self-evaluation ({m_rows} tokens) | {self_eval_s:.3f} | {result['self_eval_cost_pct']:.2f}% |")
    print(
        f"| its projections alone ({flops / 1e9:.1f} GFLOP at {result['projections_gflops_per_s']:.0f} GFLOP/s) "
        f"| {projections_s:.3f} | {result['floor_pct']:.2f}% |"
    )
    print(f"\nsquare SGEMM: {result['sgemm_2048_gflops_per_s']:.0f} GFLOP/s; goal <= 3%")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
