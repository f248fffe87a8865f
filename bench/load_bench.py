"""Load benchmarks of one shared engine: concurrent vs sequential throughput, and a soak run.

``throughput`` (issue #8, goal >= 3x on 2 cores): the same N ``ChatCapEval`` requests (fixed
seeds, so both runs generate the same tokens), first one after another, then all at once
from N threads on the same engine, whose scheduler batches the rows of every pending
request into each decode step. Both runs are timed in this process, interleaved over
``--repeats`` rounds (the best of each is reported), and must produce identical answers.
The engine's prefix cache is emptied before each run, so a run reuses only what its own
requests share (the system turn of the chat template), never a whole prompt of an earlier run.
Throughput = every token the requests generated / wall seconds.

``soak``: a warm-up (``--warmup`` requests one after another, then as many from ``--workers``
threads), then ``--sequential`` requests one after another, then ``--concurrent`` requests from
``--workers`` threads, prompts cycling over a fixed list with varied policies. Resident
memory (RSS) is read after the warm-up and at the end; the run fails on any error, on rows
left in the engine, or on RSS growth over ``--max-growth`` (5%).

Both print a table and write JSON.

Usage:
    python bench/load_bench.py throughput [--requests 8 --max-tokens 64 --out results/load_throughput.json]
    python bench/load_bench.py soak [--sequential 500 --concurrent 200 --out results/load_soak.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from langchain_capeval import ChatCapEval
from langchain_capeval.engines.transformers import TransformersEngine, TransformersEngineConfig

PROMPTS = [
    "What is 3 + 4?",
    "Name three colors.",
    "What is the capital of Italy?",
    "Write one sentence about the sea.",
    "What is 9 - 2?",
    "Name an animal that can fly.",
    "What is 5 + 5?",
    "Name a fruit and its color.",
]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("throughput", help="N concurrent requests vs the same N one after another")
    t.add_argument("--requests", type=int, default=8, help="requests per run")
    t.add_argument("--max-tokens", type=int, default=64, help="max_tokens of each sample")
    t.add_argument("--max-samples", type=int, default=1, help="max_samples of each request")
    t.add_argument("--repeats", type=int, default=2, help="interleaved rounds; the best of each side is kept")
    t.add_argument("--out", default="results/load_throughput.json")
    s = sub.add_parser("soak", help="many sequential then concurrent requests; memory must not grow")
    s.add_argument("--sequential", type=int, default=500)
    s.add_argument("--concurrent", type=int, default=200)
    s.add_argument("--workers", type=int, default=8, help="threads of the concurrent phase")
    s.add_argument("--warmup", type=int, default=50, help="requests before the baseline RSS is read")
    s.add_argument("--max-tokens", type=int, default=16)
    s.add_argument("--max-growth", type=float, default=0.05, help="largest allowed RSS growth after warm-up")
    s.add_argument("--out", default="results/load_soak.json")
    for p in (t, s):
        p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
        p.add_argument("--adapter", default="default", help="self-evaluation adapter ('default', a path, 'none')")
        p.add_argument(
            "--no-cache-merged",
            action="store_true",
            help="merge the adapter in memory at load instead of loading the merge saved in the cache folder",
        )
        p.add_argument("--no-prefix-caching", action="store_true", help="prefill every prompt in full")
        p.add_argument("--no-packing", action="store_true", help="every linear layer through F.linear")
    return parser.parse_args()


def load(args: argparse.Namespace) -> TransformersEngine:
    adapter = None if args.adapter == "none" else args.adapter
    return TransformersEngine.from_config(
        TransformersEngineConfig(
            adapter=adapter,
            num_threads=args.threads,
            cache_merged=not args.no_cache_merged,
            prefix_caching=not args.no_prefix_caching,
            pack_output_projection=not args.no_packing,
            pack_linear_layers=not args.no_packing,
        )
    )


def engine_settings(args: argparse.Namespace) -> dict[str, bool]:
    """The engine options a run was measured with."""
    return {
        "adapter_merged_in_memory": args.no_cache_merged and args.adapter != "none",
        "prefix_caching": not args.no_prefix_caching,
        "packed_linear_layers": not args.no_packing,
    }


def rss_bytes() -> int:
    """Resident set size of this process (Linux ``/proc``)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def machine() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_avg": os.getloadavg(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def generated(messages: list[Any]) -> int:
    return sum(m.usage_metadata["output_tokens"] for m in messages)


def prompt_tokens(messages: list[Any]) -> tuple[int, int]:
    """Prompt tokens of the requests, and how many of them came from the prefix cache."""
    compute = [m.response_metadata["compute"] for m in messages]
    return sum(int(c["prompt_tokens"]) for c in compute), sum(int(c.get("cached_prompt_tokens", 0)) for c in compute)


def throughput(args: argparse.Namespace) -> dict[str, Any]:
    engine = load(args)
    llm = ChatCapEval(engine=engine, max_tokens=args.max_tokens, max_samples=args.max_samples)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.requests)]

    def one(i: int) -> Any:
        return llm.invoke(prompts[i], seed=1000 + i)

    def sequential() -> list[Any]:
        return [one(i) for i in range(args.requests)]

    def concurrent() -> list[Any]:
        with ThreadPoolExecutor(args.requests) as pool:
            return list(pool.map(one, range(args.requests)))

    one(0)  # warm-up
    runs: dict[str, list[float]] = {"sequential": [], "concurrent": []}
    answers: dict[str, list[str]] = {}
    tokens: dict[str, int] = {}
    prompts_cached: dict[str, tuple[int, int]] = {}
    steps: dict[str, int] = {}
    for _ in range(args.repeats):
        for name, fn in (("sequential", sequential), ("concurrent", concurrent)):
            if engine.prefix_cache is not None:  # each run meets its prompts for the first time
                engine.scheduler.run(engine.prefix_cache.clear)
            before = engine.scheduler.steps
            seconds, out = timed(fn)
            runs[name].append(seconds)
            answers[name] = [str(m.content) for m in out]
            tokens[name] = generated(out)
            prompts_cached[name] = prompt_tokens(out)
            steps[name] = engine.scheduler.steps - before
    if answers["sequential"] != answers["concurrent"]:
        raise SystemExit("concurrent answers differ from sequential ones: results crossed between requests")
    rows: dict[str, dict[str, Any]] = {}
    for name in runs:
        best = min(runs[name])
        rows[name] = {
            "seconds": round(best, 3),
            "generated_tokens": tokens[name],
            "tokens_per_s": round(tokens[name] / best, 2),
            "decode_steps": steps[name],
            "prompt_tokens": prompts_cached[name][0],
            "cached_prompt_tokens": prompts_cached[name][1],
            "all_seconds": [round(x, 3) for x in runs[name]],
        }
    speedup = (tokens["concurrent"] / min(runs["concurrent"])) / (tokens["sequential"] / min(runs["sequential"]))
    result = {
        "benchmark": "throughput",
        "requests": args.requests,
        "max_tokens": args.max_tokens,
        "max_samples": args.max_samples,
        "model": engine.model_name,
        "loaded_from": engine.load_report.path if engine.load_report else None,
        **engine_settings(args),
        "runs": rows,
        "speedup": round(speedup, 3),
        "goal": ">= 3x",
        "met": speedup >= 3.0,
        "max_requests_per_step": engine.scheduler.max_calls_per_step,
        "machine": machine(),
    }
    print(
        f"\n{args.requests} requests, max_tokens={args.max_tokens}, max_samples={args.max_samples}, {engine.model_name}"
    )
    print(
        "| run | seconds | generated tokens | tokens/s | decode steps | prompt tokens (from the prefix cache) |\n"
        "|---|---:|---:|---:|---:|---:|"
    )
    for name, r in rows.items():
        print(
            f"| {name} | {r['seconds']} | {r['generated_tokens']} | {r['tokens_per_s']} | {r['decode_steps']} "
            f"| {r['prompt_tokens']} ({r['cached_prompt_tokens']}) |"
        )
    print(f"\nconcurrent / sequential throughput: {speedup:.2f}x (goal >= 3x: {'met' if result['met'] else 'NOT met'})")
    return result


def soak(args: argparse.Namespace) -> dict[str, Any]:
    engine = load(args)
    llm = ChatCapEval(engine=engine, max_tokens=args.max_tokens, max_samples=2)
    policies: list[dict[str, Any]] = [
        {},
        {"strategy": "best_of_n", "num_samples": 2},
        {"strategy": "adaptive_prune", "prune_checkpoints": (4,), "max_samples": 4},
        {"accept_threshold": 1.0, "max_samples": 3},
    ]
    errors: list[str] = []

    def one(i: int) -> int:
        try:
            msg = llm.invoke(PROMPTS[i % len(PROMPTS)], seed=i, **policies[i % len(policies)])
            return int(msg.usage_metadata["output_tokens"]) if msg.usage_metadata else 0
        except Exception as e:  # counted and reported: a soak run must see every failure
            errors.append(f"request {i}: {type(e).__name__}: {e}")
            return 0

    rss_start = rss_bytes()
    start = time.perf_counter()
    # Warm-up exercises both paths (one request at a time, and batches of concurrent requests), so that the
    # allocator's high-water marks for both batch shapes are reached before the baseline is read.
    for i in range(args.warmup):
        one(i)
    with ThreadPoolExecutor(args.workers) as pool:
        list(pool.map(one, range(args.warmup, 2 * args.warmup)))
    gc.collect()
    rss_warm = rss_bytes()
    seq_s, seq_tokens = timed(lambda: sum(one(i) for i in range(2 * args.warmup, 2 * args.warmup + args.sequential)))
    gc.collect()
    rss_seq = rss_bytes()
    with ThreadPoolExecutor(args.workers) as pool:
        base = 2 * args.warmup + args.sequential
        con_s, con_tokens = timed(lambda: sum(pool.map(one, range(base, base + args.concurrent))))
    gc.collect()
    rss_end = rss_bytes()
    growth = (rss_end - rss_warm) / rss_warm
    result = {
        "benchmark": "soak",
        "model": engine.model_name,
        "loaded_from": engine.load_report.path if engine.load_report else None,
        **engine_settings(args),
        "prefix_cache_bytes_after": engine.prefix_cache.nbytes if engine.prefix_cache else 0,
        "requests": {
            "warmup_sequential": args.warmup,
            "warmup_concurrent": args.warmup,
            "sequential": args.sequential,
            "concurrent": args.concurrent,
        },
        "workers": args.workers,
        "errors": errors[:20],
        "error_count": len(errors),
        "live_rows_after": engine.live_rows,
        "live_requests_after": engine.live_requests,
        "kv_cache_bytes_after": engine.kv_cache_bytes,
        "rss_mib": {
            "start": round(rss_start / 2**20, 1),
            "after_warmup": round(rss_warm / 2**20, 1),
            "after_sequential": round(rss_seq / 2**20, 1),
            "end": round(rss_end / 2**20, 1),
        },
        "rss_growth_after_warmup": round(growth, 4),
        "seconds": {"sequential": round(seq_s, 1), "concurrent": round(con_s, 1)},
        "tokens_per_s": {"sequential": round(seq_tokens / seq_s, 1), "concurrent": round(con_tokens / con_s, 1)},
        "total_seconds": round(time.perf_counter() - start, 1),
        "met": not errors and growth <= args.max_growth and engine.live_rows == 0,
        "machine": machine(),
    }
    print(f"\nsoak: {args.sequential} sequential + {args.concurrent} concurrent ({args.workers} threads)")
    print("| phase | requests | seconds | tokens/s | RSS after (MiB) |\n|---|---:|---:|---:|---:|")
    print(f"| warm-up | {args.warmup} + {args.warmup} concurrent | - | - | {result['rss_mib']['after_warmup']} |")
    print(
        f"| sequential | {args.sequential} | {result['seconds']['sequential']} | "
        f"{result['tokens_per_s']['sequential']} | {result['rss_mib']['after_sequential']} |"
    )
    print(
        f"| concurrent | {args.concurrent} | {result['seconds']['concurrent']} | "
        f"{result['tokens_per_s']['concurrent']} | {result['rss_mib']['end']} |"
    )
    print(
        f"\nerrors: {len(errors)}; rows left: {result['live_rows_after']}; RSS growth after warm-up: "
        f"{growth:+.2%} (limit {args.max_growth:.0%}): {'met' if result['met'] else 'NOT met'}"
    )
    return result


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    result = throughput(args) if args.command == "throughput" else soak(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    if not result["met"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
