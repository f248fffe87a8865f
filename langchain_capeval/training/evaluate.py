"""Evaluating self-evaluation: does P(win or tie) know which samples are right, even mid-generation.

On held-out prompts, :func:`collect_self_evaluations` draws ``num_samples`` responses per
prompt with the engine, pausing at each checkpoint (8, 16, 32, 64 tokens) to
self-evaluate the rows still generating, then self-evaluates every finished response:
the inference path, on the live KV cache. :func:`summarize` turns the scores into

- discrimination: AUROC of P(win or tie) for correctness, on full responses and at each
  checkpoint (over the samples still generating there);
- calibration: Brier score and expected calibration error, against correctness and against
  the empirical win-or-tie target (the quantity the model is trained to predict);
- the use of it: accuracy of best-of-N selected by self-evaluation, against pass@1 and the
  oracle (any sample right).

:func:`evaluate_self_evaluation` runs the zero-shot base model and the base + adapter
side by side, on the trained families' test split and on a family left out of training,
writes ``selfeval_eval.json`` and a reliability diagram ``reliability.png``.

Example:
    >>> from langchain_capeval.training import SelfEvalEvalConfig, evaluate_self_evaluation
    >>> report = evaluate_self_evaluation(SelfEvalEvalConfig(max_prompts_per_family=2))  # doctest: +SKIP
    >>> report["models"]["adapted"]["trained"]["auroc_full"]  # doctest: +SKIP
    0.93

"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from langchain_capeval.adapters import adapter_scope
from langchain_capeval.preferences import win_or_tie_targets
from langchain_capeval.sampling import SamplingParams
from langchain_capeval.tasks.answers import check
from langchain_capeval.tasks.base import Task
from langchain_capeval.tasks.synthetic import build_suite
from langchain_capeval.training.config import SelfEvalEvalConfig
from langchain_capeval.training.dataset import sample_seed
from langchain_capeval.training.metrics import auroc, brier_score, expected_calibration_error, reliability_bins

if TYPE_CHECKING:
    from langchain_capeval.engines.base import Engine, RowId, SelfEvaluation
    from langchain_capeval.engines.lora import SelfEvaluationLoRA
    from langchain_capeval.engines.transformers import TransformersEngine

logger = logging.getLogger(__name__)


@dataclass
class EvalSample:
    """One sample of a held-out prompt, with its self-evaluations.

    Attributes:
        task_id: The task.
        family: Its family.
        correct: Whether the task's checker accepts the full response.
        num_tokens: Tokens of the full response.
        p_full: P(win or tie) of the full response.
        p_no: Raw P("No") of the full response.
        p_yes: Raw P("Yes") of the full response.
        p_at: P(win or tie) at each checkpoint the sample was still generating at (token count as a string).
        target: Empirical win-or-tie target among the prompt's samples.
        right_at: Whether the task's checker already accepts the text at each checkpoint the
            sample was still generating at: what the prefix itself has said, a reference for
            ``p_at`` (empty in evaluations cached before it was recorded).

    """

    task_id: str
    family: str
    correct: bool
    num_tokens: int
    p_full: float
    p_no: float
    p_yes: float
    p_at: dict[str, float] = field(default_factory=dict)
    target: float = 0.0
    right_at: dict[str, bool] = field(default_factory=dict)


def evaluation_tasks(config: SelfEvalEvalConfig) -> tuple[list[Task], list[Task]]:
    """(trained-family tasks of ``split``, held-out-family tasks of ``heldout_splits``), capped per family."""
    families = [*config.families, *([config.heldout_family] if config.heldout_family else [])]
    suite = build_suite(families, n_per_family=config.n_per_family, seed=config.suite_seed)
    trained = _cap([t for t in getattr(suite, config.split) if t.family in config.families], config)
    heldout: list[Task] = []
    if config.heldout_family:
        for split in config.heldout_splits:
            heldout.extend(t for t in getattr(suite, split) if t.family == config.heldout_family)
        heldout = _cap(heldout, config)
    return trained, heldout


def _cap(tasks: list[Task], config: SelfEvalEvalConfig) -> list[Task]:
    if config.max_prompts_per_family is None:
        return tasks
    seen: dict[str, int] = {}
    out = []
    for t in tasks:
        seen[t.family] = seen.get(t.family, 0) + 1
        if seen[t.family] <= config.max_prompts_per_family:
            out.append(t)
    return out


def sampling_params(config: SelfEvalEvalConfig, task: Task) -> list[SamplingParams]:
    """The evaluation's ``num_samples`` draws of one task: row ``j`` seeded by ``sample_seed(config.seed, task.id, j)``.

    Example:
        >>> cfg = SelfEvalEvalConfig(output_dir="x", num_samples=2)
        >>> task = build_suite(["add1"], n_per_family=10, seed=0).test[0]
        >>> [p.seed for p in sampling_params(cfg, task)] == [sample_seed(cfg.seed, task.id, j) for j in (0, 1)]
        True

    """
    return [
        SamplingParams(
            temperature=config.temperature,
            top_p=config.top_p,
            max_new_tokens=config.max_new_tokens,
            seed=sample_seed(config.seed, task.id, j),
        )
        for j in range(config.num_samples)
    ]


def collect_self_evaluations(
    engine: Engine,
    tasks: Sequence[Task],
    config: SelfEvalEvalConfig,
    *,
    score: Callable[[Sequence[RowId]], list[SelfEvaluation]] | None = None,
    progress: bool = True,
) -> list[EvalSample]:
    """Sample each task ``num_samples`` times; self-evaluate at every checkpoint and at the end.

    Prompts are decoded ``prompts_per_batch`` at a time; each sample's seed depends only on
    ``config.seed``, its task and its number, so two engines see the same random streams.

    ``score`` self-evaluates a list of rows in place of ``engine.self_evaluate``: it is called
    with the rows paused at each checkpoint, then with every row once all have finished, while
    the rows are live, so it can read what was scored (``engine.sample(row)``) or score it
    another way; the figures come from the self-evaluations it returns, one a row.

    Example:
        >>> seen = {}  # row -> its tokens, as they were when last scored
        >>> def score(rows):
        ...     seen.update({r: engine.sample(r).token_ids for r in rows})
        ...     return engine.self_evaluate(rows)
        >>> samples = collect_self_evaluations(engine, tasks, cfg, score=score)  # doctest: +SKIP

    """
    scorer = engine.self_evaluate if score is None else score
    return _collect(engine, tasks, config, lambda rows: {"": scorer(rows)}, progress)[""]


def collect_self_evaluations_by_adapter(
    engine: TransformersEngine,
    tasks: Sequence[Task],
    config: SelfEvalEvalConfig,
    adapters: Mapping[str, SelfEvaluationLoRA | None],
    *,
    progress: bool = True,
) -> dict[str, list[EvalSample]]:
    """:func:`collect_self_evaluations` once, each self-evaluation run with every one of ``adapters``.

    Adapters scoped to the self-evaluation chunk leave decoding to the base weights, so their
    samples are the base model's whatever the adapter: one decoding pass serves them all (and
    the zero-shot base model, ``None``), each scoring the same rows over the same cache.
    ``engine`` must decode with the base weights (built with ``adapter=None``); its own
    ``selfeval_lora`` is put back afterwards.

    Example:
        >>> lora = SelfEvaluationLoRA.load(engine.model, "runs/lib-scoped")  # doctest: +SKIP
        >>> by = collect_self_evaluations_by_adapter(engine, tasks, cfg, {"base": None, "lib": lora})  # doctest: +SKIP
        >>> [s.correct for s in by["base"]] == [s.correct for s in by["lib"]]  # doctest: +SKIP
        True

    """
    own = engine.selfeval_lora

    def score(rows: Sequence[RowId]) -> dict[str, list[SelfEvaluation]]:
        out = {}
        try:
            for name, lora in adapters.items():
                engine.selfeval_lora = lora
                out[name] = engine.self_evaluate(rows)
        finally:
            engine.selfeval_lora = own
        return out

    return _collect(engine, tasks, config, score, progress)


def _collect(
    engine: Engine,
    tasks: Sequence[Task],
    config: SelfEvalEvalConfig,
    score: Callable[[Sequence[RowId]], dict[str, list[SelfEvaluation]]],
    progress: bool,
) -> dict[str, list[EvalSample]]:
    """Decode the tasks' samples; ``score`` self-evaluates rows, under one name per scorer."""
    from tqdm.auto import tqdm

    out: dict[str, list[EvalSample]] = {}
    fmt = engine.chat_format
    bar = tqdm(total=len(tasks), desc=f"eval {engine.model_name}", disable=not progress)
    for i in range(0, len(tasks), config.prompts_per_batch):
        chunk = tasks[i : i + config.prompts_per_batch]
        requests: list[tuple[Task, str, list[int]]] = []
        try:
            for task in chunk:
                request_id = f"eval:{task.id}"
                requests.append(
                    (
                        task,
                        request_id,
                        engine.submit(
                            fmt.encode(task.messages()), sampling_params(config, task), request_id=request_id
                        ),
                    )
                )
            rows = [r for *_, rs in requests for r in rs]
            task_of = {r: task for task, _, rs in requests for r in rs}
            at: dict[str, dict[int, dict[str, float]]] = {}
            right_at: dict[int, dict[str, bool]] = {}
            for k in config.checkpoints:
                if k >= config.max_new_tokens:
                    break
                paused = [s for s in engine.generate(rows, until=k) if not s.finished and s.num_tokens == k]
                live = [s.row for s in paused]
                for s in paused:
                    right_at.setdefault(s.row, {})[str(k)] = check(task_of[s.row], s.text)
                for name, evs in score(live).items():
                    for ev in evs:
                        at.setdefault(name, {}).setdefault(ev.row, {})[str(k)] = ev.p_win_or_tie
            samples = {s.row: s for s in engine.generate(rows)}
            for name, evs in score(rows).items():
                evals = {e.row: e for e in evs}
                for task, _, rs in requests:
                    correct = [check(task, samples[r].text) for r in rs]
                    targets = win_or_tie_targets([float(c) for c in correct], config.epsilon)
                    for r, c, tgt in zip(rs, correct, targets, strict=True):
                        e = evals[r]
                        out.setdefault(name, []).append(
                            EvalSample(
                                task.id,
                                task.family,
                                c,
                                samples[r].num_tokens,
                                e.p_win_or_tie,
                                e.p_no,
                                e.p_yes,
                                at.get(name, {}).get(r, {}),
                                tgt,
                                right_at.get(r, {}),
                            )
                        )
        finally:
            for _, request_id, _ in requests:
                engine.close_request(request_id)
        bar.update(len(chunk))
    bar.close()
    return out


def best_of_n(samples: Sequence[EvalSample]) -> dict[str, float]:
    """Accuracy of pass@1 (a random sample), best-of-N by self-evaluation, and the oracle (any sample right).

    Example:
        >>> s = [EvalSample("a", "f", False, 3, 0.2, 0, 0), EvalSample("a", "f", True, 3, 0.9, 0, 0)]
        >>> best_of_n(s)
        {'pass_at_1': 0.5, 'best_of_n_selfeval': 1.0, 'oracle': 1.0, 'prompts': 1}

    """
    by_task: dict[str, list[EvalSample]] = {}
    for s in samples:
        by_task.setdefault(s.task_id, []).append(s)
    n = len(by_task)
    if n == 0:
        return {"pass_at_1": 0.0, "best_of_n_selfeval": 0.0, "oracle": 0.0, "prompts": 0}
    pass1 = sum(sum(s.correct for s in g) / len(g) for g in by_task.values()) / n
    chosen = sum(max(g, key=lambda s: s.p_full).correct for g in by_task.values()) / n
    oracle = sum(any(s.correct for s in g) for g in by_task.values()) / n
    return {
        "pass_at_1": round(pass1, 4),
        "best_of_n_selfeval": round(chosen, 4),
        "oracle": round(oracle, 4),
        "prompts": n,
    }


def within_prompt_auroc(samples: Sequence[EvalSample]) -> float | None:
    """Mean over prompts (with right and wrong samples) of the AUROC among that prompt's samples.

    The pooled AUROC mixes two abilities: ranking prompts (capability) and ranking a prompt's samples.
    Win-or-tie targets score the wrong samples of a hard prompt *high* (resampling would not help), so a
    model that only learned capability scores below 0.5 pooled; this isolates the per-sample ranking.

    Example:
        >>> s = [EvalSample("a", "f", True, 3, 0.9, 0, 0), EvalSample("a", "f", False, 3, 0.8, 0, 0),
        ...      EvalSample("b", "f", False, 3, 0.99, 0, 0), EvalSample("b", "f", True, 3, 0.1, 0, 0)]
        >>> within_prompt_auroc(s)
        0.5
    """
    groups: dict[str, list[EvalSample]] = {}
    for s in samples:
        groups.setdefault(s.task_id, []).append(s)
    values = [auroc([s.p_full for s in g], [float(s.correct) for s in g]) for g in groups.values()]
    found = [v for v in values if v is not None]
    return sum(found) / len(found) if found else None


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


def summarize(samples: Sequence[EvalSample], checkpoints: Sequence[int], bins: int = 10) -> dict[str, Any]:
    """Discrimination, calibration and best-of-N of one model's samples.

    ``auroc_win_or_tie_target`` is the AUROC of the samples' own win-or-tie targets for
    correctness: what a self-evaluator that predicted the method's target exactly would
    score, the ceiling of ``auroc_full`` for a model trained on that target. Below 1 where
    a prompt's samples are all wrong: each then has target 1, as a right answer does.

    ``auroc_checker_at`` is a reference for ``auroc_at``: the AUROC for correctness of the task's
    own checker reading the text at each checkpoint (1 if the prefix already states the right
    answer, else 0), on the same samples. It measures how much of the final answer a prefix of
    that length has said; ``None`` where the samples did not record it.
    """
    if not samples:
        return {"samples": 0}
    p = [s.p_full for s in samples]
    y = [float(s.correct) for s in samples]
    t = [s.target for s in samples]
    out: dict[str, Any] = {
        "samples": len(samples),
        "auroc_full": _r(auroc(p, y)),
        "auroc_full_raw_p_no": _r(auroc([s.p_no for s in samples], y)),
        "auroc_within_prompt": _r(within_prompt_auroc(samples)),
        "auroc_win_or_tie_target": _r(auroc(t, y)),
        "auroc_at": {},
        "samples_at": {},
        "auroc_checker_at": {},
        "brier_correct": _r(brier_score(p, y)),
        "ece_correct": _r(expected_calibration_error(p, y, bins)),
        "brier_win_or_tie": _r(brier_score(p, t)),
        "ece_win_or_tie": _r(expected_calibration_error(p, t, bins)),
        "mean_p_win_or_tie": _r(sum(p) / len(p)),
        "mean_p_no_plus_p_yes": _r(sum(s.p_no + s.p_yes for s in samples) / len(samples)),
        **best_of_n(samples),
    }
    for k in checkpoints:
        have = [s for s in samples if str(k) in s.p_at]
        out["samples_at"][str(k)] = len(have)
        out["auroc_at"][str(k)] = (
            _r(auroc([s.p_at[str(k)] for s in have], [float(s.correct) for s in have])) if have else None
        )
        told = [s for s in have if str(k) in s.right_at]
        out["auroc_checker_at"][str(k)] = (
            _r(auroc([float(s.right_at[str(k)]) for s in told], [float(s.correct) for s in told]))
            if told and len(told) == len(have)
            else None
        )
    return out


def pass_at_1_difference(
    base: Sequence[EvalSample], adapted: Sequence[EvalSample], resamples: int = 2000, seed: int = 0
) -> dict[str, float]:
    """Adapted minus base pass@1, with a 95% paired bootstrap interval over prompts."""

    def per_task(samples: Sequence[EvalSample]) -> dict[str, float]:
        groups: dict[str, list[bool]] = {}
        for s in samples:
            groups.setdefault(s.task_id, []).append(s.correct)
        return {k: sum(v) / len(v) for k, v in groups.items()}

    a, b = per_task(adapted), per_task(base)
    keys = sorted(set(a) & set(b))
    if not keys:
        return {"difference": 0.0, "ci_low": 0.0, "ci_high": 0.0}
    diffs = [a[k] - b[k] for k in keys]
    rng = random.Random(seed)
    boots = sorted(sum(rng.choice(diffs) for _ in keys) / len(keys) for _ in range(resamples))
    return {
        "difference": round(sum(diffs) / len(diffs), 4),
        "ci_low": round(boots[int(0.025 * resamples)], 4),
        "ci_high": round(boots[int(0.975 * resamples) - 1], 4),
    }


def plot_reliability(results: dict[str, list[EvalSample]], path: Path, bins: int = 10) -> None:
    """Reliability diagrams (against the win-or-tie target and against correctness), one curve per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.6))
    for ax, (what, label) in zip(
        axes, (("target", "empirical win-or-tie rate"), ("correct", "share correct")), strict=True
    ):
        ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="perfect calibration")
        for name, samples in results.items():
            p = [s.p_full for s in samples]
            y = [float(getattr(s, what)) for s in samples]
            table = [b for b in reliability_bins(p, y, bins) if b.count]
            ece = expected_calibration_error(p, y, bins)
            ax.plot(
                [b.mean_score for b in table],
                [b.mean_target for b in table],
                marker="o",
                label=f"{name} (ECE {ece:.3f})",
            )
            for b in table:
                ax.annotate(str(b.count), (b.mean_score, b.mean_target), fontsize=6, alpha=0.6)
        ax.set_xlabel('predicted P(win or tie) = P("No") / (P("No") + P("Yes"))')
        ax.set_ylabel(label)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.set_title(f"full responses vs {label}")
        ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _sampling_key(config: SelfEvalEvalConfig, adapter: str | None) -> str:
    """Hash of what determines a model's evaluation samples: the model, the adapter's weights, the sampling."""
    fields = config.model_dump(
        mode="json", exclude={"adapter", "output_dir", "bins", "prompts_per_batch", "num_threads"}
    )
    weights = Path(adapter) / "adapter_model.safetensors" if adapter else None
    fields["adapter_sha256"] = (
        hashlib.sha256(weights.read_bytes()).hexdigest() if weights and weights.is_file() else None
    )
    scope = adapter_scope(adapter) if adapter else "every_token"
    if scope != "every_token":  # the same weights, run on other tokens
        fields["adapter_scope"] = scope
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def evaluate_self_evaluation(config: SelfEvalEvalConfig, *, progress: bool = True) -> dict[str, Any]:
    """Evaluate the zero-shot base model and the base + adapter side by side; write JSON and the PNG.

    Returns:
        The report written to ``selfeval_eval.json``: the config, and per model (``base``,
        ``adapted``) the summary on the trained families (``trained``), per family, and on the
        held-out family (``heldout``), with the pass@1 difference.

    """
    import torch

    from langchain_capeval.adapters import default_adapter_path, resolve_adapter
    from langchain_capeval.engines.transformers import TransformersEngine, TransformersEngineConfig

    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    adapter = config.adapter
    if adapter == "default":
        shipped = default_adapter_path()
        if shipped is None:
            raise ValueError("adapter='default' but no adapter ships; pass --adapter PATH or --adapter none")
        adapter = str(shipped)
    elif adapter is not None:  # a folder, or a shipped adapter's name
        adapter = str(resolve_adapter(config.model, adapter))
    trained_tasks, heldout_tasks = evaluation_tasks(config)
    tasks = trained_tasks + heldout_tasks
    variants: dict[str, str | None] = {"base": None, **({"adapted": adapter} if adapter else {})}
    raw: dict[str, list[EvalSample]] = {}
    seconds: dict[str, float] = {}
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    caches = {name: out / "cache" / f"{name}-{_sampling_key(config, path)}.jsonl" for name, path in variants.items()}
    for name, cache in caches.items():
        if cache.is_file():  # the same model, adapter file and sampling were evaluated before
            raw[name] = [EvalSample(**json.loads(line)) for line in cache.read_text().splitlines() if line]
            logger.info("reusing %d %s samples from %s", len(raw[name]), name, cache)
    todo = [name for name in variants if name not in raw]
    # An adapter scoped to the self-evaluation chunk decodes with the base weights: one pass scores both.
    one_pass = todo == ["base", "adapted"] and adapter_scope(str(adapter)) == "self_evaluation"
    for group in [todo] if one_pass else [[name] for name in todo]:
        # The model as the engine runs it (an adapter scoped to the self-evaluation chunk leaves decoding to the
        # base weights), merged in memory and unpacked: the plain weights, as training saw them.
        engine = TransformersEngine.from_config(
            TransformersEngineConfig(
                model=config.model,
                adapter=variants[group[-1]],
                cache_merged=False,
                pack_output_projection=False,
                pack_linear_layers=False,
                prefix_caching=False,
            )
        )
        start = time.perf_counter()
        if one_pass:
            scorers = {"base": None, "adapted": engine.selfeval_lora}
            got = collect_self_evaluations_by_adapter(engine, tasks, config, scorers, progress=progress)
        else:
            got = {group[0]: collect_self_evaluations(engine, tasks, config, progress=progress)}
        seconds["+".join(group)] = round(time.perf_counter() - start, 1)
        engine.close()
        del engine
        for name in group:
            raw[name] = got[name]
            caches[name].parent.mkdir(exist_ok=True)
            caches[name].write_text("".join(json.dumps(asdict(s)) + "\n" for s in raw[name]))
    raw = {name: raw[name] for name in variants}
    heldout = {t.id for t in heldout_tasks}
    report: dict[str, Any] = {
        "config": config.model_dump(mode="json"),
        "adapter": adapter,
        "prompts": {"trained_families": len(trained_tasks), "heldout_family": len(heldout_tasks)},
        "seconds": seconds,
        "models": {},
    }
    # Each model's samples split once: the trained families' prompts and the held-out family's.
    parts = {
        name: {
            "trained": [s for s in samples if s.task_id not in heldout],
            "heldout": [s for s in samples if s.task_id in heldout],
        }
        for name, samples in raw.items()
    }
    for name, samples in raw.items():
        report["models"][name] = {
            "trained": summarize(parts[name]["trained"], config.checkpoints, config.bins),
            "heldout": summarize(parts[name]["heldout"], config.checkpoints, config.bins),
            "per_family": {
                fam: summarize([s for s in samples if s.family == fam], (), config.bins)
                for fam in sorted({s.family for s in samples})
            },
        }
    if "adapted" in raw:
        base, adapted = parts["base"], parts["adapted"]
        report["pass_at_1_adapted_minus_base"] = {
            "trained": pass_at_1_difference(base["trained"], adapted["trained"]),
            "all": pass_at_1_difference(raw["base"], raw["adapted"]),
        }
        if heldout:
            # A family the adapter never saw: where an every-token adapter can change generation unseen.
            report["pass_at_1_adapted_minus_base"]["heldout"] = pass_at_1_difference(
                base["heldout"], adapted["heldout"]
            )
    (out / "selfeval_eval.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "selfeval_samples.jsonl").write_text(
        "".join(json.dumps({"model": n, **asdict(s)}) + "\n" for n, ss in raw.items() for s in ss)
    )
    plot_reliability({n: p["trained"] for n, p in parts.items()}, out / "reliability.png", config.bins)
    return report


def render_table(report: dict[str, Any]) -> str:
    """Render the report as a Markdown table: one column per model."""
    models = report["models"]
    names = list(models)
    checkpoints = report["config"]["checkpoints"]

    def cell(x: Any) -> str:
        return "-" if x is None else (f"{x:.3f}" if isinstance(x, float) else str(x))

    rows: list[tuple[str, list[Any]]] = [
        ("AUROC, full responses", [models[n]["trained"]["auroc_full"] for n in names]),
        ("AUROC within prompts, full", [models[n]["trained"].get("auroc_within_prompt") for n in names]),
    ]
    ceiling = [models[n]["trained"].get("auroc_win_or_tie_target") for n in names]
    rows.append(("AUROC of the win-or-tie targets (ceiling)", ceiling))
    for k in checkpoints:
        rows.append(
            (
                f"AUROC at {k} tokens (n)",
                [
                    f"{cell(models[n]['trained']['auroc_at'].get(str(k)))} "
                    f"({models[n]['trained']['samples_at'].get(str(k))})"
                    for n in names
                ],
            )
        )
    for k in checkpoints:
        rows.append(
            (
                f"reference: the task's checker on the text at {k} tokens",
                [models[n]["trained"].get("auroc_checker_at", {}).get(str(k)) for n in names],
            )
        )
    for key, label in (
        ("brier_correct", "Brier vs correctness"),
        ("ece_correct", "ECE vs correctness"),
        ("brier_win_or_tie", "Brier vs win-or-tie target"),
        ("ece_win_or_tie", "ECE vs win-or-tie target"),
        ("pass_at_1", "pass@1"),
        ("best_of_n_selfeval", f"best-of-{report['config']['num_samples']} by self-evaluation"),
        ("oracle", f"oracle (any of {report['config']['num_samples']} right)"),
    ):
        rows.append((label, [models[n]["trained"].get(key) for n in names]))
    rows.append(("held-out family: AUROC, full", [models[n]["heldout"].get("auroc_full") for n in names]))
    rows.append(
        ("held-out family: AUROC at 16 tokens", [models[n]["heldout"].get("auroc_at", {}).get("16") for n in names])
    )
    rows.append(
        (
            "held-out family: AUROC of the targets (ceiling)",
            [models[n]["heldout"].get("auroc_win_or_tie_target") for n in names],
        )
    )
    rows.append(("held-out family: pass@1", [models[n]["heldout"].get("pass_at_1") for n in names]))
    rows.append(
        ("held-out family: best-of-N by self-eval", [models[n]["heldout"].get("best_of_n_selfeval") for n in names])
    )
    lines = ["| metric | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    lines += [f"| {label} | " + " | ".join(cell(v) for v in values) + " |" for label, values in rows]
    if "pass_at_1_adapted_minus_base" in report:
        lines.append("")
        for key, label in (("trained", "trained families"), ("heldout", "held-out family")):
            if key in report["pass_at_1_adapted_minus_base"]:
                d = report["pass_at_1_adapted_minus_base"][key]
                lines.append(
                    f"pass@1 adapted - base ({label}): {d['difference']:+.4f} "
                    f"(95% CI {d['ci_low']:+.4f}..{d['ci_high']:+.4f})"
                )
    return "\n".join(lines)
