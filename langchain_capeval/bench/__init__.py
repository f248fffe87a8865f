"""``capeval bench``: accuracy against compute for adaptive sampling, pruning and the baselines a user would pick.

The harness records, per prompt, on-policy sample pools drawn with any engine
(:mod:`.collect`), replays every strategy over them exactly with the graph's own decision
functions (:mod:`.replay`), computes the metrics (:mod:`.metrics`), times a few strategies
live through the real graph (:mod:`.live`), and writes JSON, Markdown and plots
(:mod:`.report`). Settings are one :class:`BenchConfig` (:mod:`.config`).

Example:
    >>> from langchain_capeval.bench import BenchConfig, run_benchmark
    >>> results = run_benchmark(BenchConfig(families=("add1",), max_prompts=4, live_prompts=1))  # doctest: +SKIP
    >>> results["reference"]  # doctest: +SKIP
    {'pass_at_1': 0.62, 'best_of_n': 0.81, 'n': 16}

"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from langchain_capeval.bench.config import BenchConfig

if TYPE_CHECKING:
    from langchain_capeval.engines.base import Engine

logger = logging.getLogger(__name__)


def run_benchmark(config: BenchConfig, *, engine: Engine | None = None) -> dict[str, Any]:
    """Run the benchmark: draw (or resume) the pools, run the live prompts, replay, measure, write the outputs.

    Args:
        config: What to measure.
        engine: A ready engine; ``None`` builds the one ``config`` names, and only if some prompt
            still needs sampling. The pools record the engine's ``model_name`` (and, for an engine built
            from ``config``, its adapter's hash); another engine may replay them but not add to them.

    Returns:
        The results, as written to ``results.json``.

    Raises:
        PoolFileMismatchError: ``output_dir`` holds pools drawn with other settings.

    """
    from langchain_capeval.bench.collect import adapter_fingerprint, collect_pools, load_tasks
    from langchain_capeval.bench.collect import build_engine as _build
    from langchain_capeval.bench.live import run_live, summarize_live
    from langchain_capeval.bench.metrics import summarize_runs
    from langchain_capeval.bench.records import PoolStore
    from langchain_capeval.bench.replay import STRATEGY_DESCRIPTIONS, replay_all
    from langchain_capeval.bench.report import family_counts, write_report

    start = time.perf_counter()
    store = PoolStore(config.path, config.collection_settings())
    held: list[Engine] = []

    def get_engine() -> Engine:
        """The engine, built (or taken) and checked against the pools' on first need."""
        if not held:
            if engine is None:
                logger.info("loading the engine")
            held.append(engine if engine is not None else _build(config))
            store.check_engine(held[0].model_name, adapter_fingerprint(config) if engine is None else None)
        return held[0]

    tasks = load_tasks(config)
    pools = collect_pools(get_engine, tasks, config, store)
    by_id = {p.task_id: p for p in pools}
    live_tasks = tasks[: config.live_prompts] if config.live_strategies else []
    live = run_live(get_engine, live_tasks, by_id, config, store.hash) if live_tasks else {}
    runs = replay_all(pools, config)
    summary = summarize_runs(runs, pools, config)
    results: dict[str, Any] = {
        "name": config.name,
        "engine": pools[0].model_name if pools else "",
        "config": config.model_dump(mode="json"),
        "prompts": len(pools),
        "families": family_counts([p.family for p in pools]),
        "pool_seconds": _mean_seconds(pools),
        "focus_prune": [config.prune_checkpoint, config.focus_keep_ratio],
        **summary,
        "live": summarize_live(live, by_id, config),
        "strategies": STRATEGY_DESCRIPTIONS,
        "seconds": round(time.perf_counter() - start, 1),
    }
    write_report(results, config.path)
    return results


def _mean_seconds(pools: Any) -> dict[str, float]:
    """Mean seconds per prompt spent on each pool and score."""
    totals: dict[str, float] = {}
    for p in pools:
        for k, v in p.seconds.items():
            totals[k] = totals.get(k, 0.0) + v
    return {k: round(v / max(len(pools), 1), 3) for k, v in totals.items()}


__all__ = ["BenchConfig", "run_benchmark"]
