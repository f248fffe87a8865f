"""Drawing the on-policy sample pools that every strategy is replayed over, through the Engine protocol only.

For each prompt, :func:`collect_pools` draws, with any :class:`~langchain_capeval.engines.base.Engine`:

- a **greedy** sample (temperature 0), self-evaluated at the end;
- a **fixed** pool of ``pool_size`` samples at temperature T;
- an **annealed** pool of ``pool_size`` samples, sample i at ``anneal_temperature(i)``: exactly the
  temperatures the graph gives the i-th sample it draws. A sample whose annealed temperature is T
  is the fixed pool's sample with the same seed (the graph would draw exactly it), so only the
  others are decoded.

Sample i of a prompt is seeded as the graph seeds its i-th sample when run with the prompt's
``prompt_seed`` (:func:`graph_sample_seed`), so a live graph run on that seed draws the very
samples recorded. A pool's rows decode together, pausing (``engine.generate(rows, until=c)``)
at each checkpoint c to self-evaluate the rows still generating; every sample is
self-evaluated at the end. Each sample is checked against the task, its answer extracted
(majority vote), rated 0-10 by the same model in a new chat (LLM-as-judge; fixed pool), and
scored for self-certainty where the engine exposes full next-token distributions (the
transformers engine; fixed pool).

One JSON line per prompt is appended to ``pools.jsonl`` as soon as the prompt is done; a rerun
skips the prompts already there (see :class:`~langchain_capeval.bench.records.PoolStore`).

Example:
    >>> from langchain_capeval.bench.config import BenchConfig
    >>> from langchain_capeval.bench.collect import load_tasks, graph_sample_seed
    >>> [t.id for t in load_tasks(BenchConfig(families=("add1",), max_prompts=2))]
    ['add1/2+4', 'add1/3+7']
    >>> graph_sample_seed(5, 0), graph_sample_seed(5, 2)
    (5, 15843)

"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeGuard

from langchain_capeval.bench.baselines import answer_key, judge_messages, parse_judge_score, self_certainty_from_logits
from langchain_capeval.bench.config import BenchConfig
from langchain_capeval.bench.records import PoolSample, PoolStore, PromptPool
from langchain_capeval.bench.replay import graph_policy
from langchain_capeval.errors import MissingExtraError
from langchain_capeval.policy import anneal_temperature
from langchain_capeval.sampling import SamplingParams
from langchain_capeval.tasks.answers import check
from langchain_capeval.tasks.base import Task
from langchain_capeval.tasks.gsm8k import load_gsm8k
from langchain_capeval.tasks.synthetic import build_suite

if TYPE_CHECKING:
    from langchain_capeval.engines.base import Engine, Sample, SelfEvaluation
    from langchain_capeval.engines.transformers import TransformersEngine

SELF_CERTAINTY_CHUNK = 4
"""Responses scored per forward pass for self-certainty (bounds the logits' memory)."""


def load_tasks(config: BenchConfig) -> list[Task]:
    """The prompts of the benchmark: the split of the synthetic suite or of GSM8K, the first ``max_prompts``."""
    if config.task == "gsm8k":
        return load_gsm8k(config.split, limit=config.max_prompts, seed=config.suite_seed)
    suite = build_suite(config.families, n_per_family=config.n_per_family, seed=config.suite_seed)
    tasks: list[Task] = list(getattr(suite, config.split))
    return tasks if config.max_prompts is None else tasks[: config.max_prompts]


def prompt_seed(seed: int, task_id: str) -> int:
    """The graph seed of a prompt: stable per benchmark seed and task, whatever else is benchmarked."""
    digest = hashlib.sha256(f"bench:{seed}:{task_id}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def graph_sample_seed(prompt_seed: int, index: int) -> int:
    """The seed the graph gives its ``index``-th sample when run with ``seed=prompt_seed`` (see ``graph.py``)."""
    return (prompt_seed + 7919 * index) % 2**31


def adapter_fingerprint(config: BenchConfig) -> str | None:
    """Hash of the self-evaluation adapter weights the transformers engine of ``config`` loads; ``None`` if none.

    An adapter scoped to the self-evaluation chunk gets its scope appended: the same weights run that way
    draw other pools.
    """
    if config.base_url is not None:
        return None
    from langchain_capeval.adapters import adapter_scope, resolve_adapter

    adapter = resolve_adapter(config.model, config.adapter)
    weights = adapter / "adapter_model.safetensors" if adapter else None
    if adapter is None or weights is None or not weights.is_file():
        return None
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()[:16]
    scope = adapter_scope(adapter)
    return digest if scope == "every_token" else f"{digest}:{scope}"


def build_engine(config: BenchConfig) -> Engine:
    """The engine ``config`` names: an OpenAI-compatible server if ``base_url`` is set, else the transformers engine.

    Raises:
        MissingExtraError: The server engine's HTTP client (httpx) is not installed.
        CapEvalInputError: ``api_key_env`` names an unset variable.

    """
    if config.base_url is not None:
        from pydantic import SecretStr

        from langchain_capeval.errors import CapEvalInputError

        try:
            from langchain_capeval.engines.openai_client import OpenAICompatibleEngine, OpenAIEngineConfig
        except ImportError as e:
            raise MissingExtraError(
                "benchmarking an OpenAI-compatible server needs httpx: pip install 'langchain-capeval[serve]'"
            ) from e
        api_key = None
        if config.api_key_env is not None:
            token = os.environ.get(config.api_key_env)
            if not token:
                raise CapEvalInputError(f"api_key_env: the environment variable {config.api_key_env} is not set")
            api_key = SecretStr(token)
        assert config.served_model is not None  # validated with base_url
        return OpenAICompatibleEngine.from_config(
            OpenAIEngineConfig(
                base_url=config.base_url, model=config.served_model, tokenizer=config.tokenizer, api_key=api_key
            )
        )
    from langchain_capeval.engines.transformers import TransformersEngine, TransformersEngineConfig

    return TransformersEngine.from_config(
        TransformersEngineConfig(
            model=config.model,
            adapter=config.adapter,
            device=config.device,
            dtype=config.dtype,
            num_threads=config.num_threads,
        )
    )


# -- decoding ------------------------------------------------------------------------------------


@dataclass
class _Job:
    """One request: its prompt and one SamplingParams per row."""

    request_id: str
    prompt_ids: list[int]
    params: list[SamplingParams]


@dataclass
class _Drawn:
    """One decoded row: its final snapshot and self-evaluation, and both at each checkpoint it was paused at."""

    sample: Sample
    final: SelfEvaluation | None
    paused: dict[int, tuple[Sample, SelfEvaluation]] = field(default_factory=dict)


def _decode(
    engine: Engine, jobs: Sequence[_Job], checkpoints: Sequence[int], *, self_evaluate: bool = True
) -> list[list[_Drawn]]:
    """Decode every job's rows together, self-evaluating the unfinished ones at each checkpoint and all at the end.

    Returns one list of :class:`_Drawn` per job, in row order. Every request is closed afterwards.
    """
    rows_of: list[list[int]] = []
    opened: list[str] = []
    try:
        for job in jobs:
            rows_of.append(engine.submit(job.prompt_ids, job.params, request_id=job.request_id))
            opened.append(job.request_id)
        rows = [r for rs in rows_of for r in rs]
        paused: dict[int, dict[int, tuple[Sample, SelfEvaluation]]] = {r: {} for r in rows}
        going = list(rows)
        for c in checkpoints if self_evaluate else ():
            if not going:
                break
            live = [s for s in engine.generate(going, until=c) if not s.finished]
            for s, e in zip(live, engine.self_evaluate([s.row for s in live]), strict=True):
                paused[s.row][c] = (s, e)
            going = [s.row for s in live]
        samples = {s.row: s for s in engine.generate(rows)}
        finals = {e.row: e for e in engine.self_evaluate(rows)} if self_evaluate else {}
        return [[_Drawn(samples[r], finals.get(r), paused[r]) for r in rs] for rs in rows_of]
    finally:
        for request_id in opened:
            engine.close_request(request_id)


def _pool_sample(task: Task, index: int, params: SamplingParams, drawn: _Drawn, engine: Engine) -> PoolSample:
    s, e = drawn.sample, drawn.final
    assert e is not None, "pool samples are self-evaluated"
    return PoolSample(
        index=index,
        temperature=params.temperature,
        seed=params.seed,
        text=s.text,
        num_tokens=s.num_tokens,
        finish_reason=s.finish_reason,
        correct=check(task, s.text),
        p_final=e.p_win_or_tie,
        final_eval_tokens=1 + len(engine.chat_format.suffix_after(s.token_ids)),
        p_at={c: e_c.p_win_or_tie for c, (_, e_c) in drawn.paused.items()},
        tokens_at={c: s_c.num_tokens for c, (s_c, _) in drawn.paused.items()},
        text_at={c: s_c.text for c, (s_c, _) in drawn.paused.items()},
        p_no=e.p_no,
        p_yes=e.p_yes,
        answer=answer_key(task, s.text),
    )


def has_distributions(engine: Engine) -> TypeGuard[TransformersEngine]:
    """Whether self-certainty can be computed: the transformers engine, whose model gives full distributions."""
    from langchain_capeval.engines.transformers import TransformersEngine

    return isinstance(engine, TransformersEngine)


def self_certainty_scores(model: Any, prompt_ids: Sequence[int], responses: Sequence[Sequence[int]]) -> list[float]:
    """Self-certainty of each response to ``prompt_ids``: a from-scratch forward of prompt + response."""
    import torch

    device = next(model.parameters()).device
    p = len(prompt_ids)
    out: list[float] = []
    for i in range(0, len(responses), SELF_CERTAINTY_CHUNK):
        part = responses[i : i + SELF_CERTAINTY_CHUNK]
        longest = max(len(r) for r in part)
        ids = torch.zeros(len(part), p + longest, dtype=torch.long)
        attention = torch.zeros(len(part), p + longest, dtype=torch.long)
        mask = torch.zeros(len(part), longest, dtype=torch.bool)
        for j, r in enumerate(part):  # right-padded: every real token keeps its position
            ids[j, :p] = torch.tensor(list(prompt_ids))
            ids[j, p : p + len(r)] = torch.tensor(list(r))
            attention[j, : p + len(r)] = 1
            mask[j, : len(r)] = True
        with torch.inference_mode():
            # the last longest + 1 positions: position p - 1 + t predicts response token t
            logits = model(
                input_ids=ids.to(device), attention_mask=attention.to(device), logits_to_keep=longest + 1
            ).logits
        out += self_certainty_from_logits(logits[:, :longest], mask.to(device)).tolist()
    return out


def _collect_chunk(engine: Engine, tasks: Sequence[Task], config: BenchConfig) -> list[PromptPool]:
    """Draw, score and assemble the pools of a few prompts, decoded together."""
    fmt = engine.chat_format
    n, temp = config.pool_size, config.temperature
    ids = {t.id: fmt.encode(t.messages()) for t in tasks}
    seeds = {t.id: prompt_seed(config.seed, t.id) for t in tasks}
    annealing = graph_policy(config, "adaptive")
    anneal_temps = [anneal_temperature(i, annealing) for i in range(n)]
    own = [i for i, t in enumerate(anneal_temps) if t != temp]  # the others are the fixed pool's samples

    def params(temperature: float, seed: int, max_new: int = config.max_new_tokens) -> SamplingParams:
        return SamplingParams(temperature=temperature, top_p=config.top_p, max_new_tokens=max_new, seed=seed)

    seconds: dict[str, float] = {}

    def timed(name: str, jobs: list[_Job], checkpoints: Sequence[int], evaluate: bool = True) -> list[list[_Drawn]]:
        start = time.perf_counter()
        out = _decode(engine, jobs, checkpoints, self_evaluate=evaluate) if jobs else [[] for _ in tasks]
        seconds[name] = (time.perf_counter() - start) / len(tasks)
        return out

    greedy = timed("greedy", [_Job(f"bench-greedy:{t.id}", ids[t.id], [params(0.0, seeds[t.id])]) for t in tasks], ())
    fixed_params = {t.id: [params(temp, graph_sample_seed(seeds[t.id], i)) for i in range(n)] for t in tasks}
    fixed = timed(
        "fixed",
        [_Job(f"bench-fixed:{t.id}", ids[t.id], fixed_params[t.id]) for t in tasks],
        config.collected_checkpoints,
    )
    anneal_params = {t.id: [params(anneal_temps[i], graph_sample_seed(seeds[t.id], i)) for i in own] for t in tasks}
    annealed = timed(
        "annealed",
        [_Job(f"bench-annealed:{t.id}", ids[t.id], anneal_params[t.id]) for t in tasks] if own else [],
        config.collected_checkpoints,
    )
    pools_fixed = {
        t.id: [_pool_sample(t, i, fixed_params[t.id][i], d, engine) for i, d in enumerate(fixed[k])]
        for k, t in enumerate(tasks)
    }
    if config.judge:
        rated_pairs = [(t, i) for t in tasks for i in range(n)]
        jobs = [
            _Job(
                f"bench-judge:{t.id}:{i}",
                fmt.encode(judge_messages(t, pools_fixed[t.id][i].text)),
                [params(0.0, 0, config.judge_max_new_tokens)],
            )
            for t, i in rated_pairs
        ]
        ratings = timed("judge", jobs, (), evaluate=False)
        for (t, i), job, [verdict] in zip(rated_pairs, jobs, ratings, strict=True):
            pools_fixed[t.id][i] = pools_fixed[t.id][i].with_changes(
                judge_score=parse_judge_score(verdict.sample.text),
                judge_tokens=len(job.prompt_ids) + verdict.sample.num_tokens,
            )
    if config.self_certainty and has_distributions(engine):
        start = time.perf_counter()
        for k, t in enumerate(tasks):
            scores = self_certainty_scores(engine.model, ids[t.id], [d.sample.token_ids for d in fixed[k]])
            pools_fixed[t.id] = [
                s.with_changes(self_certainty=x) for s, x in zip(pools_fixed[t.id], scores, strict=True)
            ]
        seconds["self_certainty"] = (time.perf_counter() - start) / len(tasks)
    out = []
    for k, t in enumerate(tasks):
        decoded = dict(zip(own, annealed[k], strict=True)) if own else {}
        annealed_pool = []
        for i in range(n):
            if i in decoded:
                annealed_pool.append(_pool_sample(t, i, anneal_params[t.id][own.index(i)], decoded[i], engine))
            else:
                annealed_pool.append(
                    pools_fixed[t.id][i].with_changes(judge_score=None, judge_tokens=None, self_certainty=None)
                )
        g = greedy[k][0]
        out.append(
            PromptPool(
                task_id=t.id,
                model_name=engine.model_name,
                family=t.family,
                kind=t.kind,
                prompt_seed=seeds[t.id],
                eval_tokens=len(fmt.self_evaluation_suffix) + 1,
                max_new_tokens=config.max_new_tokens,
                checkpoints=config.collected_checkpoints,
                greedy=_pool_sample(t, 0, params(0.0, seeds[t.id]), g, engine),
                fixed=tuple(pools_fixed[t.id]),
                annealed=tuple(annealed_pool),
                seconds={k2: round(v, 4) for k2, v in seconds.items()},
            )
        )
    return out


def collect_pools(
    get_engine: Callable[[], Engine], tasks: Sequence[Task], config: BenchConfig, store: PoolStore
) -> list[PromptPool]:
    """The pools of every task: read back from ``store`` where recorded, else drawn and appended.

    Args:
        get_engine: Returns the engine; called only if some task is not recorded yet.
        tasks: The prompts, in order.
        config: The benchmark's settings.
        store: The output folder's pools file.

    Returns:
        One :class:`PromptPool` per task, in order.

    """
    from tqdm.auto import tqdm

    done = store.load()
    todo = [t for t in tasks if t.id not in done]
    bar = tqdm(total=len(tasks), initial=len(tasks) - len(todo), desc="bench pools", disable=not config.progress)
    engine = get_engine() if todo else None
    step = config.prompts_per_batch
    for i in range(0, len(todo), step):
        assert engine is not None
        for pool in _collect_chunk(engine, todo[i : i + step], config):
            store.append(pool)
            done[pool.task_id] = pool
            bar.update(1)
    bar.close()
    return [done[t.id] for t in tasks]
