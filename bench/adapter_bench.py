"""Benchmark of a self-evaluation-scoped adapter in the transformers engine: memory and time.

A ``self_evaluation``-scoped adapter (``capeval_adapter.json``) runs on the self-evaluation
chunk only. The engine holds it as a :class:`~langchain_capeval.engines.lora.SelfEvaluationLoRA`
beside the base weights (forward hooks add the low-rank update during the self-evaluation
forward); before, it held a second, merged copy of the model for that forward. Measured on
the embedded default with the shipped ``smollm2-135m-selfeval-partial-credit`` adapter:

1. memory: resident set size of a fresh process that builds the engine and serves one request
   (16 rows, decode, self-evaluate), for the base model alone, the adapter held as a LoRA
   (what the engine does), and the base engine plus a merged copy that has run a forward
   (what it did before; the copy is memory-mapped from the cache folder, so only a forward makes
   its pages resident); freed heap is handed back (``malloc_trim``) before each reading;
2. time, side by side in one process, interleaved, best of ``--repeats``: decoding
   ``--new-tokens`` tokens for 16 rows, and one self-evaluation of the 16 rows, with the
   base engine and with the adapter's engine (the hooks cost only in the second).

Usage:
    python bench/adapter_bench.py [--repeats 3 --new-tokens 48 --out results/adapter_bench.json]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from load_bench import machine, rss_bytes  # a sibling script: bench/ is on the path when run

from langchain_capeval.adapters import PARTIAL_CREDIT_ADAPTER, shipped_adapter_path
from langchain_capeval.engines.cpu import run_in_own_thread
from langchain_capeval.engines.transformers import TransformersEngine, TransformersEngineConfig
from langchain_capeval.models import load_model
from langchain_capeval.sampling import SamplingParams

PROMPT = [{"role": "user", "content": "What is the capital of Peru?"}]
ROWS = 16
VARIANTS = ("base", "lora", "merged_copy")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="interleaved timing rounds; the best is kept")
    parser.add_argument("--new-tokens", type=int, default=48, help="tokens decoded per row")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", default="results/adapter_bench.json")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)  # one memory measurement
    return parser.parse_args()


def engine(adapter: str | None, threads: int | None) -> TransformersEngine:
    return TransformersEngine.from_config(TransformersEngineConfig(adapter=adapter, num_threads=threads))


def serve_once(e: TransformersEngine, new_tokens: int) -> tuple[float, float]:
    """Decode 16 rows and self-evaluate them once; the seconds of each."""
    prompt = e.chat_format.encode(PROMPT)
    params = [SamplingParams(temperature=0.8, max_new_tokens=new_tokens, seed=s) for s in range(ROWS)]
    rows = e.submit(prompt, params)
    try:
        start = time.perf_counter()
        samples = e.generate(rows)
        decode = time.perf_counter() - start
        start = time.perf_counter()
        e.self_evaluate(rows)
        selfeval = time.perf_counter() - start
    finally:
        e.close_request(samples[0].request_id)
    return decode, selfeval


def child(variant: str, args: argparse.Namespace) -> None:
    """One memory measurement in a fresh process: build, serve one request, print the RSS."""
    adapter = {"base": None, "lora": PARTIAL_CREDIT_ADAPTER, "merged_copy": None}[variant]
    e = engine(adapter, args.threads)
    held: list[Any] = []
    if variant == "merged_copy":  # what the engine held before: the merged model, beside the base one
        merged = run_in_own_thread(
            lambda: load_model(None, adapter=shipped_adapter_path(PARTIAL_CREDIT_ADAPTER), cache_merged=True)
        ).model
        with torch.inference_mode():  # it ran every self-evaluation forward: all its pages are resident
            e.scheduler.run(lambda: merged(torch.tensor([e.chat_format.encode(PROMPT)])))
        held.append(merged)
    serve_once(e, args.new_tokens)
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed heap back to the system, alike for every variant
    print(
        json.dumps({"variant": variant, "rss_bytes": rss_bytes(), "lora_bytes": getattr(e.selfeval_lora, "nbytes", 0)})
    )


def memory(args: argparse.Namespace) -> dict[str, Any]:
    rows = {}
    for variant in VARIANTS:
        cmd = [sys.executable, __file__, "--child", variant, "--new-tokens", str(args.new_tokens)]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        rows[variant] = json.loads(out.strip().splitlines()[-1])
    return rows


def timing(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    engines = {"base": engine(None, args.threads), "lora": engine(PARTIAL_CREDIT_ADAPTER, args.threads)}
    for e in engines.values():
        serve_once(e, 8)  # warm-up
    best: dict[str, dict[str, float]] = {name: {"decode_s": 1e9, "selfeval_s": 1e9} for name in engines}
    for _ in range(args.repeats):
        for name, e in engines.items():
            decode, selfeval = serve_once(e, args.new_tokens)
            best[name]["decode_s"] = min(best[name]["decode_s"], decode)
            best[name]["selfeval_s"] = min(best[name]["selfeval_s"], selfeval)
    for e in engines.values():
        e.close()
    return best


def main() -> None:
    args = parse_args()
    if args.child:
        child(args.child, args)
        return
    mem = memory(args)
    times = timing(args)
    base_rss = mem["base"]["rss_bytes"]
    report = {
        "adapter": PARTIAL_CREDIT_ADAPTER,
        "rows": ROWS,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "memory": {
            v: {
                "rss_mib": round(m["rss_bytes"] / 2**20, 1),
                "over_base_mib": round((m["rss_bytes"] - base_rss) / 2**20, 1),
            }
            for v, m in mem.items()
        },
        "lora_mib": round(mem["lora"]["lora_bytes"] / 2**20, 1),
        "time": {k: {kk: round(vv, 4) for kk, vv in v.items()} for k, v in times.items()},
        "ratios": {
            "decode_lora_over_base": round(times["lora"]["decode_s"] / times["base"]["decode_s"], 3),
            "selfeval_lora_over_base": round(times["lora"]["selfeval_s"] / times["base"]["selfeval_s"], 3),
        },
        "machine": machine(),
    }
    print(f"| engine | RSS MiB | over base MiB | decode s (16 x {args.new_tokens}) | self-evaluation s (16 rows) |")
    print("|---|---|---|---|---|")
    for v in VARIANTS:
        t = times.get(v)
        cells = (f"{t['decode_s']:.3f}", f"{t['selfeval_s']:.4f}") if t else ("-", "-")
        m = report["memory"][v]
        print(f"| {v} | {m['rss_mib']} | {m['over_base_mib']} | {cells[0]} | {cells[1]} |")
    print(f"LoRA tensors held: {report['lora_mib']} MiB; ratios (lora / base): {report['ratios']}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
