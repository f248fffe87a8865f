"""Live runs: a few strategies end to end through the real graph, for wall time, beside their replay.

Replay gives exact accuracy, samples and tokens, but no seconds. On the first ``live_prompts``
prompts, :func:`run_live` runs each of ``live_strategies`` for real and times it:

- ``single_sample``: one sample at T straight from the engine (nothing to decide, so no graph);
- ``best_of_n``, ``adaptive``, ``prune``, ``adaptive_prune``: the compiled graph
  (:func:`~langchain_capeval.graph.build_graph`) with the policy the replay uses
  (:func:`~langchain_capeval.bench.replay.graph_policy`) and the prompt's ``prompt_seed``.

Because the pools were drawn on the seeds the graph uses, a live run draws the recorded samples
and must match its replay exactly (samples, generated and self-evaluation tokens, the sample
returned); :func:`summarize_live` counts the prompts where it does, next to the measured seconds.
Results are appended to ``live.jsonl`` per prompt, so an interrupted run resumes.

Example:
    >>> from langchain_capeval.bench.config import BenchConfig
    >>> sorted(live_policies(BenchConfig(live_strategies=("adaptive", "prune"))))
    ['adaptive/threshold=0.5', 'prune/checkpoint=16,keep=0.5']

"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from langchain_capeval.bench.collect import graph_sample_seed
from langchain_capeval.bench.config import BenchConfig
from langchain_capeval.bench.records import Outcome, PromptPool, repair_jsonl, settings_hash
from langchain_capeval.bench.replay import first_sample, graph_policy, replay_policy
from langchain_capeval.config import CapEvalConfig
from langchain_capeval.sampling import SamplingParams
from langchain_capeval.tasks.answers import check
from langchain_capeval.tasks.base import Task

if TYPE_CHECKING:
    from langchain_capeval.engines.base import Engine

LIVE_FILE = "live.jsonl"
"""Name of the live runs' file inside the output folder."""

SINGLE_SAMPLE = "single_sample"


def live_policies(config: BenchConfig) -> dict[str, CapEvalConfig | None]:
    """The live strategies by label; ``None`` for the single sample (run on the engine, not the graph)."""
    out: dict[str, CapEvalConfig | None] = {}
    c, k = config.prune_checkpoint, config.focus_keep_ratio
    t = config.live_accept_threshold
    for name in config.live_strategies:
        if name == SINGLE_SAMPLE:
            out[SINGLE_SAMPLE] = None
        elif name == "best_of_n":
            out[f"best_of_n_selfeval/n={config.pool_size}"] = graph_policy(config, "best_of_n")
        elif name == "adaptive":
            out[f"adaptive/threshold={t}"] = graph_policy(config, "adaptive", threshold=t)
        elif name == "prune":
            out[f"prune/checkpoint={c},keep={k}"] = graph_policy(config, "prune", checkpoint=c, keep_ratio=k)
        else:
            policy = graph_policy(config, "adaptive_prune", threshold=t, checkpoint=c, keep_ratio=k)
            out[f"adaptive_prune/threshold={t},checkpoint={c},keep={k}"] = policy
    return out


def _live_settings(config: BenchConfig, pools_hash: str) -> dict[str, Any]:
    policies = {k: (p.model_dump(mode="json") if p else None) for k, p in live_policies(config).items()}
    return {"pools": pools_hash, "policies": policies}


def run_single_sample(engine: Engine, task: Task, pool: PromptPool, config: BenchConfig) -> dict[str, Any]:
    """One sample at T, seeded as the graph's first sample, straight from the engine; timed."""
    params = SamplingParams(
        temperature=config.temperature,
        top_p=config.top_p,
        max_new_tokens=config.max_new_tokens,
        seed=graph_sample_seed(pool.prompt_seed, 0),
    )
    request_id = f"bench-live:{SINGLE_SAMPLE}:{task.id}"
    start = time.perf_counter()
    try:
        rows = engine.submit(engine.chat_format.encode(task.messages()), [params], request_id=request_id)
        [sample] = engine.generate(rows)
    finally:
        engine.close_request(request_id)
    seconds = time.perf_counter() - start
    return {
        "wall_time_s": seconds,
        "correct": float(check(task, sample.text)),
        "samples": 1,
        "generated_tokens": sample.num_tokens,
        "eval_tokens": 0,
        "pick": 0,
        "stop_reason": None,
    }


def run_graph(engine: Engine, task: Task, pool: PromptPool, policy: CapEvalConfig) -> dict[str, Any]:
    """One graph run with ``policy`` on the prompt's seed; timed."""
    from langchain_capeval.graph import build_graph

    graph = build_graph(engine, policy.merged({"seed": pool.prompt_seed}))
    start = time.perf_counter()
    final = graph.invoke({"messages": task.messages()})
    seconds = time.perf_counter() - start
    usage = final["usage"]
    return {
        "wall_time_s": seconds,
        "correct": float(check(task, final["answer"])),
        "samples": len(final["samples"]),
        "generated_tokens": int(usage["generated_tokens"]),
        "eval_tokens": int(usage["self_eval_tokens"]),
        "pick": final["answer_index"],
        "stop_reason": final["stop_reason"],
    }


def _load(path: Path, key: str) -> dict[str, dict[str, Any]]:
    """Live results already recorded with these settings, by task id."""
    out: dict[str, dict[str, Any]] = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                row = json.loads(line)
                if row.get("key") == key:
                    out[row["task_id"]] = row["runs"]
    return out


def run_live(
    engine_factory: Callable[[], Engine],
    tasks: Sequence[Task],
    pools: Mapping[str, PromptPool],
    config: BenchConfig,
    pools_hash: str,
) -> dict[str, dict[str, Any]]:
    """Run the live strategies on ``tasks`` (those not yet in ``live.jsonl``); return every task's results.

    Args:
        engine_factory: A callable returning the engine (called only if some prompt is not done yet).
        tasks: The live prompts.
        pools: Their recorded pools, by task id.
        config: The benchmark's settings.
        pools_hash: The pools' settings hash (live results are kept only for those pools and these policies).

    """
    from tqdm.auto import tqdm

    path = config.path / LIVE_FILE
    repair_jsonl(path)
    key = settings_hash(_live_settings(config, pools_hash))
    done = _load(path, key)
    todo = [t for t in tasks if t.id not in done]
    policies = live_policies(config)
    bar = tqdm(total=len(tasks), initial=len(tasks) - len(todo), desc="bench live", disable=not config.progress)
    engine = engine_factory() if todo else None
    for task in todo:
        assert engine is not None
        runs: dict[str, Any] = {}
        for label, policy in policies.items():
            pool = pools[task.id]
            if policy is None:
                runs[label] = run_single_sample(engine, task, pool, config)
            else:
                runs[label] = run_graph(engine, task, pool, policy)
        with path.open("a", encoding="utf-8") as f:
            f.write(json.dumps({"key": key, "task_id": task.id, "runs": runs}) + "\n")
        done[task.id] = runs
        bar.update(1)
    bar.close()
    return {t.id: done[t.id] for t in tasks}


def _replayed(policy: CapEvalConfig | None, pool: PromptPool) -> Outcome:
    return first_sample(pool) if policy is None else replay_policy(pool, policy)


def _same(live: Mapping[str, Any], replayed: Outcome) -> bool:
    return (
        live["samples"] == replayed.samples
        and live["generated_tokens"] == replayed.generated_tokens
        and live["eval_tokens"] == replayed.eval_tokens
        and live["pick"] == replayed.pick
        and live["correct"] == replayed.correct
    )


def summarize_live(
    results: Mapping[str, Mapping[str, Any]], pools: Mapping[str, PromptPool], config: BenchConfig
) -> dict[str, Any] | None:
    """Per live strategy: the measured means beside the replayed ones on the same prompts.

    Measured: seconds, samples, tokens and accuracy per prompt; replayed: the same from the pools;
    then how many prompts match their replay exactly, and seconds relative to a single sample.
    """
    if not results:
        return None
    ids = list(results)
    out: dict[str, Any] = {"prompts": len(ids), "strategies": {}}
    for label, policy in live_policies(config).items():
        live = [results[i][label] for i in ids]
        replayed = [_replayed(policy, pools[i]) for i in ids]

        def mean(xs: Sequence[float]) -> float:
            return round(sum(xs) / len(xs), 4)

        out["strategies"][label] = {
            "wall_time_s": mean([r["wall_time_s"] for r in live]),
            "accuracy": mean([r["correct"] for r in live]),
            "samples": mean([r["samples"] for r in live]),
            "generated_tokens": mean([r["generated_tokens"] for r in live]),
            "eval_tokens": mean([r["eval_tokens"] for r in live]),
            "replayed": {
                "accuracy": mean([o.correct for o in replayed]),
                "samples": mean([o.samples for o in replayed]),
                "generated_tokens": mean([o.generated_tokens for o in replayed]),
                "eval_tokens": mean([o.eval_tokens for o in replayed]),
            },
            "exact_matches": sum(_same(r, o) for r, o in zip(live, replayed, strict=True)),
        }
    base = out["strategies"].get(SINGLE_SAMPLE)
    if base and base["wall_time_s"] > 0:
        for s in out["strategies"].values():
            s["time_vs_single_sample"] = round(s["wall_time_s"] / base["wall_time_s"], 3)
    return out
