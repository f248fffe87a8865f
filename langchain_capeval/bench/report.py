"""The benchmark's outputs: ``results.json``, a Markdown table ``results.md``, and two PNG plots.

- ``results.json``: the config, the references (pass@1, best-of-N), every strategy point
  (accuracy with its 95% interval, average samples and tokens, gain fraction, savings, floor),
  the oracle floors, the live runs, and what was unavailable.
- ``results.md``: the same as tables, for a README.
- ``accuracy_vs_samples.png`` and ``accuracy_vs_tokens.png``: accuracy against the average
  samples per prompt and against the average tokens (generated plus evaluation) per prompt,
  one curve per strategy, with the oracle floor.

Plots need matplotlib (``pip install 'langchain-capeval[bench]'``); it is imported only here.

Example:
    >>> render_markdown({"name": "x", "engine": "m", "prompts": 0, "families": {}, "config": {}, "reference": {},
    ...                  "points": [], "live": None, "unavailable": {}}).splitlines()[0]
    '# capeval bench: x'

"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from langchain_capeval.errors import MissingExtraError

RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
SAMPLES_PNG = "accuracy_vs_samples.png"
TOKENS_PNG = "accuracy_vs_tokens.png"

_HEADLINE_N = (1, 2, 4, 8, 16)
"""N shown for the best-of-N baselines in the Markdown table (with the pool size); every N is in the JSON."""


def _f(x: Any, digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def _acc(p: Mapping[str, Any]) -> str:
    return f"{_f(p['accuracy'])} ({_f(p['ci_low'])}-{_f(p['ci_high'])})"


def _change(p: Mapping[str, Any]) -> str:
    if p.get("accuracy_change") is None:
        return "-"
    return f"{p['accuracy_change']:+.3f} ({p['accuracy_change_ci_low']:+.3f}..{p['accuracy_change_ci_high']:+.3f})"


def _pct(x: Any) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _points(results: Mapping[str, Any], strategy: str, **params: Any) -> list[dict[str, Any]]:
    return [
        p
        for p in results["points"]
        if p["strategy"] == strategy and all(p["params"].get(k) == v for k, v in params.items())
    ]


def render_markdown(results: Mapping[str, Any]) -> str:
    """The results as Markdown: fixed budgets, the adaptive sweep, pruning, adaptive+pruning, live runs."""
    cfg, ref = results["config"], results["reference"]
    lines = [f"# capeval bench: {results['name']}", ""]
    fams = ", ".join(f"{k} {v}" for k, v in results["families"].items())
    lines += [
        f"- Model: {results['engine']}; {results['prompts']} prompts ({cfg.get('task')}, {cfg.get('split')} split"
        + (f": {fams}" if fams else "")
        + ")",
        f"- Pools: {cfg.get('pool_size')} samples at T={cfg.get('temperature')} and {cfg.get('pool_size')} annealed "
        f"({cfg.get('initial_temperature')} -> T over {cfg.get('anneal_samples')} samples), top_p={cfg.get('top_p')}, "
        f"max_new_tokens={cfg.get('max_new_tokens')}, checkpoints {cfg.get('checkpoints')}; batch schedule "
        f"{cfg.get('batch_schedule')}",
        f"- pass@1 (one sample at T): {_f(ref.get('pass_at_1'))}; best-of-{ref.get('n')} by self-evaluation: "
        f"{_f(ref.get('best_of_n'))}. Gain fraction = (accuracy - pass@1) / (best-of-{ref.get('n')} - pass@1). "
        "Tokens = generated + evaluation (self-evaluation, or the judge's prompt and answer).",
    ]
    if results.get("pool_seconds"):
        spent = ", ".join(f"{k} {v:.2f}s" for k, v in results["pool_seconds"].items())
        lines.append(f"- Recording time per prompt: {spent} (wall time of strategies: the live runs below)")
    lines.append("")
    if not results["points"]:
        return "\n".join(lines)
    pool = int(cfg.get("pool_size", 16))
    shown = sorted({n for n in _HEADLINE_N if n <= pool} | {pool})
    lines += [
        "## Fixed budgets",
        "",
        "| strategy | N | accuracy (95% CI) | avg samples | avg tokens | gain fraction |",
        "|---|---:|---|---:|---:|---:|",
    ]
    for name in ("greedy", "sample"):
        for p in _points(results, name):
            lines.append(
                f"| {name} | 1 | {_acc(p)} | {_f(p['avg_samples'], 2)} | {_f(p['avg_tokens'], 1)} | "
                f"{_f(p['gain_fraction'])} |"
            )
    for name in (
        "best_of_n_selfeval",
        "best_of_n_judge",
        "best_of_n_self_certainty",
        "majority_vote",
        "best_of_n_oracle",
    ):
        for n in shown:
            for p in _points(results, name, n=n):
                note = f" ({p['prompts']} prompts)" if "note" in p else ""
                lines.append(
                    f"| {name}{note} | {n} | {_acc(p)} | {_f(p['avg_samples'], 2)} | {_f(p['avg_tokens'], 1)} | "
                    f"{_f(p['gain_fraction'])} |"
                )
    lines += [
        "",
        "## Adaptive sampling",
        "",
        "Stop once the best P(win or tie) reaches the threshold. Floor: the fewest average samples any stopping rule "
        "on this schedule needs for that accuracy (oracle stopping).",
        "",
        "| threshold | annealed: accuracy (95% CI) | samples | tokens | gain fraction | floor samples "
        "| fixed T: accuracy | samples | tokens | gain fraction |",
        "|---:|---|---:|---:|---:|---:|---|---:|---:|---:|",
    ]
    for a in _points(results, "adaptive"):
        t = a["params"]["threshold"]
        f = next(iter(_points(results, "adaptive_fixed_t", threshold=t)), None)
        fixed = (
            f"{_acc(f)} | {_f(f['avg_samples'], 2)} | {_f(f['avg_tokens'], 1)} | {_f(f['gain_fraction'])}"
            if f
            else "- | - | - | -"
        )
        lines.append(
            f"| {t} | {_acc(a)} | {_f(a['avg_samples'], 2)} | {_f(a['avg_tokens'], 1)} | {_f(a['gain_fraction'])} | "
            f"{_f(a.get('floor_samples'), 2)} | {fixed} |"
        )
    for name in ("oracle_stopping", "oracle_stopping_fixed_t"):
        for p in _points(results, name):
            lines.append(f"\n{name}: accuracy {_acc(p)} with {_f(p['avg_samples'], 2)} samples on average.")
    lines += [
        "",
        f"## Early pruning (vs best-of-{pool} by self-evaluation)",
        "",
        "| checkpoint | keep | accuracy (95% CI) | avg tokens | tokens saved | generated saved "
        "| accuracy change (95% CI) |",
        "|---:|---:|---|---:|---:|---:|---|",
    ]
    for p in _points(results, "prune"):
        lines.append(
            f"| {p['params']['checkpoint']} | {p['params']['keep']} | {_acc(p)} | {_f(p['avg_tokens'], 1)} | "
            f"{_pct(p.get('tokens_saved'))} | {_pct(p.get('generated_tokens_saved'))} | {_change(p)} |"
        )
    c, k = results.get("focus_prune", (None, None))
    lines += [
        "",
        f"## Adaptive + pruning (checkpoint {c}, keep {k}; vs adaptive at the same threshold)",
        "",
        "| threshold | accuracy (95% CI) | samples | tokens | tokens saved | accuracy change (95% CI) |",
        "|---:|---|---:|---:|---:|---|",
    ]
    for p in _points(results, "adaptive_prune", checkpoint=c, keep=k):
        lines.append(
            f"| {p['params']['threshold']} | {_acc(p)} | {_f(p['avg_samples'], 2)} | {_f(p['avg_tokens'], 1)} | "
            f"{_pct(p.get('tokens_saved'))} | {_change(p)} |"
        )
    live = results.get("live")
    if live:
        lines += [
            "",
            f"## Live runs through the graph ({live['prompts']} prompts)",
            "",
            "| strategy | seconds / prompt | x single sample | samples | tokens | accuracy | replayed samples "
            "| replayed tokens | replayed accuracy | exact matches |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for label, s in live["strategies"].items():
            r = s["replayed"]
            lines.append(
                f"| {label} | {_f(s['wall_time_s'])} | {_f(s.get('time_vs_single_sample'), 2)} | "
                f"{_f(s['samples'], 2)} | {_f(s['generated_tokens'] + s['eval_tokens'], 1)} | {_f(s['accuracy'])} | "
                f"{_f(r['samples'], 2)} | {_f(r['generated_tokens'] + r['eval_tokens'], 1)} | {_f(r['accuracy'])} | "
                f"{s['exact_matches']}/{live['prompts']} |"
            )
    if results["unavailable"]:
        lines += ["", "## Unavailable", ""]
        lines += [f"- {k}: {v}" for k, v in results["unavailable"].items()]
    return "\n".join(lines) + "\n"


_CURVES: tuple[tuple[str, str, str], ...] = (
    ("best_of_n_selfeval", "best-of-N, self-evaluation", "-o"),
    ("best_of_n_judge", "best-of-N, LLM judge", "-s"),
    ("best_of_n_self_certainty", "best-of-N, self-certainty", "-^"),
    ("majority_vote", "majority vote", "-v"),
    ("best_of_n_oracle", "best-of-N, oracle", ":"),
    ("adaptive", "adaptive (annealed)", "-D"),
    ("adaptive_fixed_t", "adaptive (fixed T)", "--d"),
)


def plot_results(results: Mapping[str, Any], folder: Path) -> list[Path]:
    """Draw accuracy vs average samples and accuracy vs average tokens; return the PNG paths.

    Raises:
        MissingExtraError: matplotlib is not installed.

    """
    try:
        import matplotlib
    except ImportError as e:
        raise MissingExtraError("the benchmark's plots need matplotlib: pip install 'langchain-capeval[bench]'") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c, k = results.get("focus_prune", (None, None))
    paths = []
    for x_key, xlabel, name in (
        ("avg_samples", "average samples per prompt", SAMPLES_PNG),
        ("avg_tokens", "average tokens per prompt (generated + evaluation)", TOKENS_PNG),
    ):
        fig, ax = plt.subplots(figsize=(10.5, 5.5))
        for strategy, label, style in _CURVES:
            pts = sorted(
                (p for p in _points(results, strategy) if "note" not in p), key=lambda p: (p[x_key], p["accuracy"])
            )
            if pts:
                ax.plot([p[x_key] for p in pts], [p["accuracy"] for p in pts], style, ms=3.5, lw=1.2, label=label)
        both = sorted(_points(results, "adaptive_prune", checkpoint=c, keep=k), key=lambda p: p[x_key])
        if both:
            ax.plot(
                [p[x_key] for p in both],
                [p["accuracy"] for p in both],
                "-x",
                ms=4,
                lw=1.2,
                label=f"adaptive + pruning ({c} tok, keep {k})",
            )
        prune = _points(results, "prune")
        if prune:
            ax.scatter(
                [p[x_key] for p in prune],
                [p["accuracy"] for p in prune],
                marker="P",
                s=30,
                zorder=3,
                label="pruning (each checkpoint x keep)",
            )
        for strategy, marker in (("greedy", "*"), ("sample", "o"), ("oracle_stopping", "X")):
            for p in _points(results, strategy):
                ax.scatter([p[x_key]], [p["accuracy"]], marker=marker, s=70, zorder=4, label=strategy.replace("_", " "))
        floor = results.get("floor", {}).get("annealed")
        if x_key == "avg_samples" and floor:
            ax.step(
                [f["avg_samples"] for f in floor],
                [f["accuracy"] for f in floor],
                where="post",
                color="grey",
                lw=1,
                ls="--",
                label="floor (oracle stopping, annealed schedule)",
            )
        ax.set_xscale("log", base=2)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("accuracy")
        ax.set_title(f"{results['name']}: {results['engine']}, {results['prompts']} prompts")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
        fig.tight_layout()
        path = folder / name
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


def write_report(results: Mapping[str, Any], folder: Path) -> list[Path]:
    """Write ``results.json``, ``results.md`` and the two plots into ``folder``; return their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    json_path, md_path = folder / RESULTS_JSON, folder / RESULTS_MD
    json_path.write_text(json.dumps(results, indent=2) + "\n")
    md_path.write_text(render_markdown(results))
    return [json_path, md_path, *plot_results(results, folder)]


def family_counts(families: Sequence[str]) -> dict[str, int]:
    """Prompts per family, in first-seen order."""
    out: dict[str, int] = {}
    for f in families:
        out[f] = out.get(f, 0) + 1
    return out
