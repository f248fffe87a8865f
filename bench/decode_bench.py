"""Decode-step time by batch size: packed linear layers, and a second OpenMP team.

Two CPU effects behind ``langchain_capeval.engines.cpu``, measured side by side in one
process on the engine's own model and scheduler thread:

1. one decode step (one token for each of B rows, on top of a 60-token cache) with the
   engine's default, ``packed`` (the output projection in oneDNN's blocked layout, the
   decoder's linear layers in MKL's packed GEMM: ``PackedLinear``), with ``head only``
   packed (the decoder's layers through ``F.linear``), and ``plain`` (everything through
   ``F.linear``), the layers swapped in turn on the same model (the same weight tensors),
   interleaved over ``--repeats`` rounds (best of each kept);
2. ``second team``: the same steps (packed) after the main thread has run one parallel
   op, which gives the process a second OpenMP team; libgomp then stops spin-waiting
   between ops. This one is measured last: the main thread's team cannot be undone.

Prints a table and writes JSON.

Usage:
    python bench/decode_bench.py [--batches 1,2,4,8,12,16 --steps 10 --out results/decode_bench.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from langchain_capeval.engines.cpu import PackedLinear
from langchain_capeval.engines.kv_batch import KVBatch
from langchain_capeval.engines.transformers import TransformersEngine, TransformersEngineConfig


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", default="1,2,4,8,12,16", help="comma-separated batch sizes")
    parser.add_argument("--steps", type=int, default=10, help="timed decode steps per measurement")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds; the best of each is kept")
    parser.add_argument("--adapter", default="default", help="self-evaluation adapter ('default', a path, 'none')")
    parser.add_argument("--out", default="results/decode_bench.json")
    return parser.parse_args()


def step_ms(engine: TransformersEngine, batch: int, steps: int) -> float:
    """Milliseconds per decode step of ``batch`` rows, timed on the engine's scheduler thread."""

    def run() -> float:
        gen = torch.Generator().manual_seed(batch)
        cache = KVBatch.empty(engine.model, list(range(batch)), 60 + steps + 4)
        cache.forward(engine.model, torch.randint(0, 1000, (batch, 60), generator=gen))
        ids = torch.randint(0, 1000, (batch, 1), generator=gen)
        for _ in range(2):  # warm-up
            cache.forward(engine.model, ids)
        start = time.perf_counter()
        for _ in range(steps):
            cache.forward(engine.model, ids)
        return (time.perf_counter() - start) / steps * 1e3

    result: float = engine.scheduler.run(run)
    return result


def unpacked(packed: PackedLinear) -> nn.Linear:
    """An ``nn.Linear`` on the same weight tensors: the layer through ``F.linear``."""
    plain = nn.Linear(packed.in_features, packed.out_features, bias=packed.bias is not None)
    plain.weight, plain.bias = packed.weight, packed.bias
    return plain


def main() -> None:
    args = parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    adapter = None if args.adapter == "none" else args.adapter
    engine = TransformersEngine.from_config(TransformersEngineConfig(adapter=adapter))
    model: Any = engine.model
    packed = model.get_output_embeddings()
    if not isinstance(packed, PackedLinear):
        raise SystemExit("the engine's output projection is not packed (no oneDNN in this torch build?)")
    decoder = [
        (parent, name, child, unpacked(child))
        for parent in model.modules()
        for name, child in parent.named_children()
        if isinstance(child, PackedLinear) and child.layout == "mkl"
    ]
    if not decoder:
        raise SystemExit("the engine's decoder layers are not packed (no MKL in this torch build?)")

    def use(head_packed: bool, decoder_packed: bool) -> None:
        model.set_output_embeddings(packed if head_packed else unpacked(packed))
        for parent, name, layer, plain in decoder:
            setattr(parent, name, layer if decoder_packed else plain)

    configs = {"packed": (True, True), "head_only": (True, False), "plain": (False, False)}
    times: dict[str, dict[int, list[float]]] = {name: {} for name in (*configs, "second_team")}
    for _ in range(args.repeats):
        for name, (head_packed, decoder_packed) in configs.items():
            use(head_packed, decoder_packed)
            for b in batches:
                times[name].setdefault(b, []).append(step_ms(engine, b, args.steps))
    use(True, True)
    big = torch.randn(1024, 1024)
    _ = big @ big  # on the main thread: the process now has a second OpenMP team
    for _ in range(args.repeats):
        for b in batches:
            times["second_team"].setdefault(b, []).append(step_ms(engine, b, args.steps))

    rows = []
    for b in batches:
        best = {name: min(times[name][b]) for name in times}
        rows.append(
            {
                "batch": b,
                "packed_ms": round(best["packed"], 2),
                "head_only_ms": round(best["head_only"], 2),
                "plain_ms": round(best["plain"], 2),
                "packed_speedup": round(best["plain"] / best["packed"], 3),
                "decoder_packing_speedup": round(best["head_only"] / best["packed"], 3),
                "second_team_ms": round(best["second_team"], 2),
                "second_team_slowdown": round(best["second_team"] / best["packed"], 3),
                "all_ms": {name: [round(x, 2) for x in times[name][b]] for name in times},
            }
        )
    result = {
        "benchmark": "decode_step",
        "model": engine.model_name,
        "packed_decoder_layers": len(decoder),
        "steps": args.steps,
        "repeats": args.repeats,
        "rows": rows,
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "load_avg": os.getloadavg(),
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
    }
    print(f"\n{engine.model_name}: ms per decode step (best of {args.repeats} x {args.steps} steps)")
    print(
        "| rows | packed (default) | head only packed | all F.linear | packed vs head only | packed vs all F.linear "
        "| after a 2nd OpenMP team | slowdown |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['batch']} | {r['packed_ms']} | {r['head_only_ms']} | {r['plain_ms']} "
            f"| {r['decoder_packing_speedup']:.2f}x | {r['packed_speedup']:.2f}x "
            f"| {r['second_team_ms']} | {r['second_team_slowdown']:.2f}x |"
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    engine.close()


if __name__ == "__main__":
    main()
