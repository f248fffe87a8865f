"""Benchmark of the transformers engine on the embedded default model (base weights).

Measures, side by side in one process, at batch 16 with 128-token responses:

1. self-evaluation cost: one ``self_evaluate`` over the 16 finished rows, as a share of
   the time it took to generate them (goal <= 3%);
2. speed-up of that self-evaluation over scoring the same texts from scratch: one padded
   batch forward of prompt + response + self-evaluation suffix, no cache, reading only the
   last position's logits (``logits_to_keep=1``) (goal >= 5x);
3. decode throughput of the engine vs ``model.generate`` on the same prompt, batch,
   temperature 0.8, top-p 1.0 (top-k off), same number of new tokens (goal >= 1.0x);
4. decode time saved when 8 of the 16 rows are released at token 32.

Fairness. The engine cannot suppress EOS, so the 16 seeds are screened first: only seeds
whose row runs to the full 128 tokens are kept, and ``model.generate`` gets
``min_new_tokens = max_new_tokens``: both sides then produce exactly 16 x 128 tokens. The
engine prefills the shared prompt once, ``model.generate`` once per row; to compare pure
decoding, prefill + first token is timed separately on both sides (``submit`` for the
engine, ``max_new_tokens=1`` for ``generate``) and subtracted. Every timing is the best of
``--repeats`` runs after one warm-up, the measurements interleaved so that load on the
machine hits all of them alike (the short ones, self-evaluation and the from-scratch
forward, are also timed three times within each run); the load average is recorded. On a
machine shared with other jobs, ``--threads 1 --clock cpu`` times the process's own CPU
seconds, which other processes do not inflate.

One thread for all model work. The engine runs its model calls on its scheduler thread;
the baselines (``model.generate``, the from-scratch forward) run there too, through
``engine.scheduler.run``. A second thread running parallel torch ops would give the process
a second OpenMP team, and libgomp then stops spin-waiting between ops, which slows every
side's small ops (see :mod:`langchain_capeval.engines.cpu`).

Usage:
    python bench/engine_bench.py [--batch 16 --new-tokens 128 --out results/engine_bench.json]
    python bench/engine_bench.py --threads 1 --clock cpu  # on a busy machine
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
import transformers

from langchain_capeval.engines.decoding import answer_probabilities
from langchain_capeval.engines.kv_batch import left_padded_chunk
from langchain_capeval.engines.transformers import TransformersEngine, TransformersEngineConfig
from langchain_capeval.sampling import SamplingParams

PROMPT = "Write a long story about a dragon."


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=16, help="rows per batch")
    parser.add_argument("--new-tokens", type=int, default=128, help="tokens generated per row")
    parser.add_argument("--drop-at", type=int, default=32, help="checkpoint at which half the rows are released")
    parser.add_argument("--temperature", type=float, default=0.8, help="sampling temperature of every row")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (best is reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="what is timed: wall-clock seconds, or the process's CPU seconds (with --threads 1, insensitive "
        "to other processes sharing the cores)",
    )
    parser.add_argument(
        "--adapter", default="none", help="self-evaluation adapter: 'none' (the base model), 'default', or a folder"
    )
    parser.add_argument(
        "--no-cache-merged",
        action="store_true",
        help="merge the adapter in memory at load instead of loading the merge saved in the cache folder",
    )
    parser.add_argument("--prompt", default=PROMPT, help="user message that makes long answers")
    parser.add_argument("--out", default="results/engine_bench.json", help="where to write the JSON results")
    return parser.parse_args()


def clock(args: argparse.Namespace) -> Callable[[], float]:
    """Wall time, or this process's CPU time (robust to other load on the machine at ``--threads 1``)."""
    return time.process_time if args.clock == "cpu" else time.perf_counter


def timed(fn: Callable[[], Any], args: argparse.Namespace) -> tuple[float, Any]:
    now = clock(args)
    start = now()
    out = fn()
    return now() - start, out


def screen_seeds(engine: TransformersEngine, prompt: list[int], args: argparse.Namespace) -> list[int]:
    """Seeds whose rows run to ``new_tokens`` without EOS (so both sides generate equal token counts)."""
    seeds: list[int] = []
    start = 0
    while len(seeds) < args.batch and start < 20 * args.batch:
        cand = list(range(start, start + args.batch))
        rows = engine.submit(prompt, [params(args, s) for s in cand])
        out = engine.generate(rows)
        engine.close_request(out[0].request_id)
        seeds += [s for s, o in zip(cand, out, strict=True) if o.num_tokens == args.new_tokens]
        start += args.batch
    return seeds[: args.batch]


def params(args: argparse.Namespace, seed: int) -> SamplingParams:
    return SamplingParams(temperature=args.temperature, top_p=1.0, max_new_tokens=args.new_tokens, seed=seed)


def engine_generate(engine: TransformersEngine, prompt: list[int], seeds: list[int], args: argparse.Namespace) -> dict:
    """Submit (prefill + first token), generate to the end, then self-evaluate the finished rows."""
    t_submit, rows = timed(lambda: engine.submit(prompt, [params(args, s) for s in seeds]), args)
    t_decode, samples = timed(lambda: engine.generate(rows), args)
    evals_s = []
    for _ in range(3):  # short, so timed three times (the cache is rolled back each time)
        seconds, evals = timed(lambda: engine.self_evaluate(rows), args)
        evals_s.append(seconds)
    engine.close_request(samples[0].request_id)
    return {
        "submit_s": t_submit,
        "decode_s": t_decode,
        "generate_s": t_submit + t_decode,
        "self_evaluate_s": min(evals_s),
        "self_evaluate_all_s": evals_s,
        "tokens": sum(s.num_tokens for s in samples),
        "token_ids": [s.token_ids for s in samples],
        "p_no": [e.p_no for e in evals],
    }


def engine_prune(engine: TransformersEngine, prompt: list[int], seeds: list[int], args: argparse.Namespace) -> dict:
    """Generate to ``drop_at``, release half the rows, finish the rest."""
    now = clock(args)
    start = now()
    rows = engine.submit(prompt, [params(args, s) for s in seeds])
    engine.generate(rows, until=args.drop_at)
    engine.release(rows[len(rows) // 2 :])
    samples = engine.generate(rows[: len(rows) // 2])
    seconds = now() - start
    engine.close_request(samples[0].request_id)
    return {
        "generate_s": seconds,
        "tokens": sum(s.num_tokens for s in samples) + len(rows[len(rows) // 2 :]) * args.drop_at,
    }


def scratch_score(
    engine: TransformersEngine, prompt: list[int], token_ids: list[list[int]], args: argparse.Namespace
) -> dict:
    """Score every response from scratch: one left-padded batch forward, last-position logits only."""
    fmt = engine.chat_format
    ids, real = left_padded_chunk([prompt + t + fmt.suffix_after(t) for t in token_ids])
    mask = real.long()
    pos = (mask.cumsum(dim=1) - 1).clamp_min(0)
    no_id, yes_id = fmt.answer_token_ids

    @torch.inference_mode()
    def forward() -> torch.Tensor:
        logits = engine.model(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=1).logits
        return answer_probabilities(logits[:, -1], no_id, yes_id)[0]

    times = []
    for _ in range(3):  # short, so timed three times
        seconds, p_no = timed(lambda: engine.scheduler.run(forward), args)
        times.append(seconds)
    return {
        "score_s": min(times),
        "score_all_s": times,
        "tokens": int(mask.sum()),
        "padded_tokens": mask.numel(),
        "p_no": p_no.tolist(),
    }


def hf_generate(engine: TransformersEngine, prompt: list[int], args: argparse.Namespace, new_tokens: int) -> dict:
    """``model.generate`` on the same prompt, batch, temperature, top-p 1, top-k off; EOS suppressed."""
    ids = torch.tensor([prompt] * args.batch)
    torch.manual_seed(0)
    seconds, out = timed(
        lambda: engine.scheduler.run(
            lambda: engine.model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                do_sample=True,
                temperature=args.temperature,
                top_p=1.0,
                top_k=0,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                pad_token_id=engine.tokenizer.eos_token_id,
            )
        ),
        args,
    )
    return {"generate_s": seconds, "tokens": int(out.shape[0] * (out.shape[1] - len(prompt)))}


def best(runs: list[dict], key: str) -> float:
    return min(r[key] for r in runs)


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    adapter = None if args.adapter == "none" else args.adapter
    engine = TransformersEngine.from_config(
        TransformersEngineConfig(adapter=adapter, cache_merged=not args.no_cache_merged)
    )
    prompt = engine.chat_format.encode([{"role": "user", "content": args.prompt}])

    seeds = screen_seeds(engine, prompt, args)  # doubles as the engine's warm-up
    if len(seeds) < args.batch:
        raise SystemExit(f"only {len(seeds)} seeds run to {args.new_tokens} tokens; use a prompt with longer answers")
    hf_generate(engine, prompt, args, 8)  # warm-up

    runs: dict[str, list[dict]] = {"engine": [], "scratch": [], "hf": [], "hf_prefill": [], "prune": []}
    for _ in range(args.repeats):
        runs["engine"].append(engine_generate(engine, prompt, seeds, args))
        runs["scratch"].append(scratch_score(engine, prompt, runs["engine"][-1]["token_ids"], args))
        runs["hf"].append(hf_generate(engine, prompt, args, args.new_tokens))
        runs["hf_prefill"].append(hf_generate(engine, prompt, args, 1))
        runs["prune"].append(engine_prune(engine, prompt, seeds, args))

    eng = runs["engine"]
    tokens = eng[0]["tokens"]
    gen_s, eval_s = best(eng, "generate_s"), best(eng, "self_evaluate_s")
    scratch_s = best(runs["scratch"], "score_s")
    hf_s, hf_first_s = best(runs["hf"], "generate_s"), best(runs["hf_prefill"], "generate_s")
    eng_decode_s, eng_first_s = best(eng, "decode_s"), best(eng, "submit_s")
    decode_tokens = tokens - args.batch  # the first token of each row comes with the prefill
    prune_s = best(runs["prune"], "generate_s")
    max_diff = max(abs(a - b) for a, b in zip(eng[0]["p_no"], runs["scratch"][0]["p_no"], strict=True))

    summary = {
        "self_eval_cost_pct": 100 * eval_s / gen_s,
        "self_eval_speedup_vs_scratch": scratch_s / eval_s,
        "decode_speedup_vs_hf_generate": (decode_tokens / eng_decode_s) / (decode_tokens / (hf_s - hf_first_s)),
        "end_to_end_speedup_vs_hf_generate": (tokens / gen_s) / (runs["hf"][0]["tokens"] / hf_s),
        "prune_saved_fraction": 1 - prune_s / gen_s,
    }
    rows = [
        (
            "self-evaluation cost / generation",
            f"{eval_s:.3f} s / {gen_s:.2f} s",
            f"{summary['self_eval_cost_pct']:.2f}%",
            "<= 3%",
        ),
        (
            "self-evaluation vs from scratch",
            f"{eval_s:.3f} s vs {scratch_s:.3f} s",
            f"{summary['self_eval_speedup_vs_scratch']:.1f}x",
            ">= 5x",
        ),
        (
            "decode tok/s: engine vs generate",
            f"{decode_tokens / eng_decode_s:.0f} vs {decode_tokens / (hf_s - hf_first_s):.0f}",
            f"{summary['decode_speedup_vs_hf_generate']:.2f}x",
            ">= 1.0x",
        ),
        (
            "end-to-end tok/s: engine vs generate",
            f"{tokens / gen_s:.0f} vs {runs['hf'][0]['tokens'] / hf_s:.0f}",
            f"{summary['end_to_end_speedup_vs_hf_generate']:.2f}x",
            "",
        ),
        (
            f"decode, {args.batch // 2} rows released at {args.drop_at}",
            f"{prune_s:.2f} s vs {gen_s:.2f} s ({runs['prune'][0]['tokens']} vs {tokens} tokens)",
            f"{100 * summary['prune_saved_fraction']:.0f}% time saved",
            "",
        ),
    ]
    load_after = os.getloadavg()
    loaded_from = engine.load_report.path if engine.load_report else "memory"
    if args.adapter != "none" and args.no_cache_merged:
        loaded_from += " + adapter merged in memory"
    print(
        f"{engine.model_name} (loaded from {loaded_from}); "
        f"batch {args.batch}, {args.new_tokens} new tokens, T={args.temperature}, top-p 1.0; {args.clock} seconds, "
        f"best of {args.repeats} after a warm-up; torch threads {torch.get_num_threads()}, cpus {os.cpu_count()}, "
        f"load avg {load_before[0]:.1f} -> {load_after[0]:.1f}"
    )
    print(
        f"tokens: engine {tokens}, generate {runs['hf'][0]['tokens']}; max |p_no engine - scratch| = {max_diff:.2e}\n"
    )
    print("| measurement | times | result | goal |\n|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")

    for r in eng:
        del r["token_ids"]
    report = {
        "settings": vars(args) | {"seeds": seeds, "prompt_tokens": len(prompt)},
        "model": engine.model_name,
        "loaded_from": loaded_from,
        "summary": summary,
        "best": {
            "engine_generate_s": gen_s,
            "engine_submit_s": eng_first_s,
            "engine_decode_s": eng_decode_s,
            "engine_self_evaluate_s": eval_s,
            "scratch_score_s": scratch_s,
            "hf_generate_s": hf_s,
            "hf_prefill_first_token_s": hf_first_s,
            "engine_prune_s": prune_s,
        },
        "max_abs_p_no_diff_engine_vs_scratch": max_diff,
        "runs": runs,
        "machine": {
            "torch_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "processor": platform.processor(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "load_avg_before": load_before,
            "load_avg_after": load_after,
        },
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
