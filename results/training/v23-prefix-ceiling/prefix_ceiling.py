"""What any self-evaluator reading a k-token prefix could score: P(correct | prefix), estimated by sampling.

A prefix's AUROC (section 4's ``auroc_at``) ranks prefixes by a score against the correctness of
the response each was cut from. That response's rest is a random draw of the model's decoding,
so the best any score of the prefix can do is to rank by P(correct | prefix) under that decoding;
the AUROC of that ranking is the ceiling of ``auroc_at[k]`` for every self-evaluator, trained on
any target. This script estimates it on section 24's test split (the default adapter's samples,
drawn again with the evaluation's seeds and engine settings, so they are the evaluated ones):

1. decode each prompt's ``num_samples`` samples with ``capeval eval-selfeval``'s own loop
   (``collect_self_evaluations``, pausing at the checkpoints), and keep the prefixes still
   generating at each ``k``;
2. continue every prefix ``--continuations`` times (the same temperature and top-p, fresh seeds,
   up to the evaluation's ``max_new_tokens`` in all) and check each whole response;
3. p_hat = the share of right continuations. Scored against the original responses' correctness
   (independent of the continuations given the prefix), its AUROC is what a self-evaluator that
   knew p_hat would score: a lower estimate of the ceiling (p_hat is P plus sampling noise). The
   plug-in figure (labels drawn from p_hat itself) is an upper estimate; half-split figures show the
   trend with the number of continuations.

Usage (from the repo root, after ``make install``; the default adapter, section 24's test split)::

    python results/training/v23-prefix-ceiling/prefix_ceiling.py \
        --eval-json results/training/v20-kl-weight-3/step-300-test.json --at 16 --continuations 16 \
        --output runs/prefix-ceiling-16.json
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

from langchain_capeval.adapters import default_adapter_path
from langchain_capeval.engines.transformers import TransformersEngine, TransformersEngineConfig
from langchain_capeval.preferences import win_or_tie_targets
from langchain_capeval.sampling import SamplingParams
from langchain_capeval.tasks.answers import check, partial_credit
from langchain_capeval.training.config import SelfEvalEvalConfig
from langchain_capeval.training.dataset import sample_seed
from langchain_capeval.training.evaluate import collect_self_evaluations, evaluation_tasks
from langchain_capeval.training.metrics import auroc, auroc_interval


def weighted_auroc(scores: list[float], pos: list[float], neg: list[float]) -> float | None:
    """AUROC with each item counted ``pos[i]`` times as a positive and ``neg[i]`` times as a negative."""
    num = den = 0.0
    for i, si in enumerate(scores):
        if not pos[i]:
            continue
        for j, sj in enumerate(scores):
            if i == j or not neg[j]:
                continue
            w = pos[i] * neg[j]
            den += w
            num += w * (1.0 if si > sj else 0.5 if si == sj else 0.0)
    return num / den if den else None


def main() -> None:
    """Sample the evaluation's prefixes, continue them, write the figures."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--eval-json", help="an eval-selfeval report whose config to reuse")
    ap.add_argument("--adapter", default="default", help="'default' (the shipped adapter), a folder, or 'none'")
    ap.add_argument("--at", type=int, nargs="+", default=[16], help="prefix lengths (among the checkpoints)")
    ap.add_argument("--continuations", type=int, default=16)
    ap.add_argument("--seed", type=int, default=99, help="the continuations' seed")
    ap.add_argument("--prefixes-per-batch", type=int, default=8)
    ap.add_argument("--max-prompts-per-family", type=int, default=None, help="a smaller run (a smoke test)")
    ap.add_argument("--output", required=True)
    ap.add_argument("--from-output", help="recompute the figures of a written --output (no sampling)")
    args = ap.parse_args()
    if args.from_output:
        write(json.loads(Path(args.from_output).read_text()), args.at, Path(args.output))
        return
    if not args.eval_json:
        ap.error("--eval-json is required (or --from-output, to recompute a written file's figures)")

    cfg = SelfEvalEvalConfig(
        **{
            **json.loads(Path(args.eval_json).read_text())["config"],
            "output_dir": "unused",
            **({"max_prompts_per_family": args.max_prompts_per_family} if args.max_prompts_per_family else {}),
        }
    )
    adapter = (
        None if args.adapter == "none" else str(default_adapter_path()) if args.adapter == "default" else args.adapter
    )
    trained, _ = evaluation_tasks(cfg)
    engine = TransformersEngine.from_config(
        TransformersEngineConfig(
            model=cfg.model,
            adapter=adapter,
            cache_merged=False,
            pack_output_projection=False,
            pack_linear_layers=False,
            prefix_caching=False,
        )
    )
    start = time.perf_counter()
    # 1. the evaluation's samples, decoded by its own loop (collect_self_evaluations), its scorer
    #    wrapped to keep the prefixes it scores at --at and each sample's final text
    fmt = engine.chat_format
    task_of = {f"eval:{t.id}": t for t in trained}  # collect_self_evaluations' request ids
    prompt_ids = {t.id: fmt.encode(t.messages()) for t in trained}
    prefixes: list[dict] = []  # one per (sample, k): the prompt ids, the k tokens, the task
    originals: list[dict] = []
    number: dict[int, int] = {}  # row -> its sample number j within its prompt
    numbered: Counter[str] = Counter()  # task id -> its samples numbered so far

    def score(rows):
        scored = engine.self_evaluate(rows)
        snaps = [engine.sample(r) for r in rows]
        if rows and all(s.finished for s in snaps):  # the end of a batch: every row, in submission order
            for s in snaps:
                task = task_of[s.request_id]
                number[s.row] = j = numbered[task.id]
                numbered[task.id] += 1
                originals.append(
                    {
                        "task_id": task.id,
                        "family": task.family,
                        "sample": j,
                        "correct": check(task, s.text),
                        "partial_credit": partial_credit(task, s.text),
                    }
                )
        elif snaps and snaps[0].num_tokens in args.at:  # the rows paused at one checkpoint
            for s, e in zip(snaps, scored, strict=True):
                task = task_of[s.request_id]
                prefixes.append(
                    {
                        "task": task,
                        "prompt_ids": prompt_ids[task.id],
                        "row": s.row,
                        "k": s.num_tokens,
                        "ids": list(s.token_ids),
                        "text": s.text,
                        "prefix_right": check(task, s.text),
                        # the self-evaluator's score of the prefix, as the evaluation's auroc_at reads it
                        "self_evaluation": e.p_win_or_tie,
                    }
                )
        return scored

    collect_self_evaluations(engine, trained, cfg, score=score)
    for p in prefixes:  # row ids are never reused, so each names one sample
        p["sample"] = number[p.pop("row")]
    correct_of = {(o["task_id"], o["sample"]): o["correct"] for o in originals}
    print(f"{len(originals)} samples, {len(prefixes)} prefixes, {time.perf_counter() - start:.0f} s", flush=True)

    # 2. continue each prefix (those an earlier run of the same settings wrote to --output are read back)
    K = args.continuations
    out = Path(args.output)
    earlier = json.loads(out.read_text()) if out.is_file() else {}
    if earlier and (earlier["continuations"], earlier["seed"], earlier["eval_json"]) != (K, args.seed, args.eval_json):
        raise SystemExit(f"{out} holds another run's continuations; pass another --output")
    done = {(r["task_id"], r["sample"], r["k"]): r for r in earlier.get("records", [])}
    for p in prefixes:
        key = (p["task"].id, p["sample"], p["k"])
        if key in done and "continuation_partial_credit" in done[key]:
            p["continued_right"], p["halves_right"] = done[key]["continued_right"], done[key]["halves_right"]
            p["continuation_partial_credit"] = done[key]["continuation_partial_credit"]
    todo = [p for p in prefixes if "continued_right" not in p]
    print(f"{len(prefixes) - len(todo)} prefixes' continuations read from {out}", flush=True)
    for i in range(0, len(todo), args.prefixes_per_batch):
        chunk = todo[i : i + args.prefixes_per_batch]
        requests = []
        for n, p in enumerate(chunk):
            params = [
                SamplingParams(
                    temperature=cfg.temperature,
                    top_p=cfg.top_p,
                    max_new_tokens=cfg.max_new_tokens - p["k"],
                    seed=sample_seed(args.seed, f"{p['task'].id}#{p['sample']}@{p['k']}", c),
                )
                for c in range(K)
            ]
            rid = f"cont:{i + n}"
            requests.append((p, rid, engine.submit([*p["prompt_ids"], *p["ids"]], params, request_id=rid)))
        samples = {s.row: s for s in engine.generate([r for *_, rs in requests for r in rs])}
        for p, rid, rs in requests:
            texts = [fmt.decode([*p["ids"], *samples[r].token_ids]) for r in rs]
            right = [check(p["task"], t) for t in texts]
            p["continued_right"] = sum(right)
            p["halves_right"] = [sum(right[: K // 2]), sum(right[K // 2 :])]
            p["continuation_partial_credit"] = [round(partial_credit(p["task"], t), 6) for t in texts]
            engine.close_request(rid)
        print(
            f"  {min(i + args.prefixes_per_batch, len(todo))}/{len(todo)} prefixes continued, "
            f"{time.perf_counter() - start:.0f} s",
            flush=True,
        )
    engine.close()

    # 3. the figures
    records = [
        {
            "task_id": p["task"].id,
            "family": p["task"].family,
            "sample": p["sample"],
            "k": p["k"],
            "correct": correct_of[(p["task"].id, p["sample"])],
            "prefix_right": p["prefix_right"],
            "continued_right": p["continued_right"],
            "halves_right": p["halves_right"],
            "self_evaluation": round(p["self_evaluation"], 6),
            "continuation_partial_credit": p["continuation_partial_credit"],
        }
        for p in prefixes
    ]
    report = {
        "eval_json": args.eval_json,
        "adapter": adapter,
        "continuations": K,
        "seed": args.seed,
        "samples": len(originals),
        "pass_at_1": round(sum(o["correct"] for o in originals) / len(originals), 4),
        "seconds": round(time.perf_counter() - start, 1),
        "records": records,
        "originals": [{k: o[k] for k in ("task_id", "sample", "correct", "partial_credit")} for o in originals],
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")  # the records, before any figure
    write(report, args.at, out)


def figures(records: list[dict], K: int, originals: list[dict]) -> dict:
    """The ceiling's estimates and the references, from the prefixes' records and the prompts' samples."""
    y = [float(r["correct"]) for r in records]
    phat = [r["continued_right"] / K for r in records]
    # The method's target (0/1 reward, ties at epsilon 0, as the evaluation computes it) of a response
    # with this prefix: 1 if it ends right, else the share of the prompt's other samples that are wrong
    # too. Its expectation over the prefix's continuations is what a self-evaluator trained on that
    # target would say at best: the ceiling of the *method's* 16-token AUROC, not of any score's.
    samples_of: dict[str, list[dict]] = {}
    for o in originals:
        samples_of.setdefault(o["task_id"], []).append(o)

    def share(reward: float, r: dict, field: str) -> float:
        """The win-or-tie target of a response with ``reward`` against the other samples of ``r``'s prompt."""
        others = [float(o[field]) for o in samples_of[r["task_id"]] if o["sample"] != r["sample"]]
        return win_or_tie_targets([reward, *others], 0.0)[0]

    expected_target = [
        p * share(1.0, r, "correct") + (1 - p) * share(0.0, r, "correct") for p, r in zip(phat, records, strict=True)
    ]
    # The same with the graded reward the default adapter was trained on (partial credit, epsilon 0):
    # each continuation's win-or-tie share against the prompt's other samples, averaged.
    expected_graded_target = [
        sum(share(c, r, "partial_credit") for c in r["continuation_partial_credit"])
        / len(r["continuation_partial_credit"])
        for r in records
    ]
    half = [r["halves_right"] for r in records]
    # rank by one half's p_hat, labels: the other half's continuations (K/2 draws per prefix)
    half_split = [
        weighted_auroc([h[a] for h in half], [h[b] for h in half], [K // 2 - h[b] for h in half])
        for a, b in ((0, 1), (1, 0))
    ]
    by_prompt: dict[str, list[int]] = {}
    for n, r in enumerate(records):
        by_prompt.setdefault(r["task_id"], []).append(n)
    # capability alone: the prompt's P(correct), the mean p_hat of its prefixes (none of it from the label)
    prompt_mean = {t: sum(phat[n] for n in ns) / len(ns) for t, ns in by_prompt.items()}
    difficulty = [prompt_mean[r["task_id"]] for r in records]
    # what the prefix has said, then capability: right answer stated first, the rest by the prompt's rate
    checker_then_difficulty = [float(r["prefix_right"]) + 0.5 * d for r, d in zip(records, difficulty, strict=True)]
    selfeval = [r["self_evaluation"] for r in records]
    # the self-evaluator's capability part: its mean score over the prompt's prefixes
    selfeval_prompt_mean = {t: sum(selfeval[n] for n in ns) / len(ns) for t, ns in by_prompt.items()}

    def within(scores: list[float], labels: list[float]) -> float | None:
        """Mean over prompts with right and wrong prefixes of the AUROC among that prompt's prefixes."""
        values = [auroc([scores[n] for n in ns], [labels[n] for n in ns]) for ns in by_prompt.values()]
        found = [a for a in values if a is not None]
        return sum(found) / len(found) if found else None

    prompts = [r["task_id"] for r in records]

    def ci95(scores: list[float]) -> list[float | None]:
        """Prompt-bootstrap 95% interval of the AUROC of ``scores`` (2,000 draws, seeded)."""
        interval = auroc_interval(scores, y, prompts)
        return [_r(x) for x in interval] if interval else [None, None]

    return {
        "prefixes": len(records),
        "right": int(sum(y)),
        "auroc_p_hat": _r(auroc(phat, y)),
        "auroc_p_hat_ci95": ci95(phat),
        "auroc_half_p_hat_vs_other_half": _r(sum(half_split) / 2) if None not in half_split else None,
        "auroc_plug_in": _r(weighted_auroc(phat, phat, [1 - x for x in phat])),
        "auroc_expected_win_or_tie_target": _r(auroc(expected_target, y)),
        "auroc_expected_win_or_tie_target_ci95": ci95(expected_target),
        "auroc_expected_graded_win_or_tie_target": _r(auroc(expected_graded_target, y)),
        "auroc_expected_graded_win_or_tie_target_ci95": ci95(expected_graded_target),
        "auroc_self_evaluation_ci95": ci95(selfeval),
        "auroc_checker_on_prefix": _r(auroc([float(r["prefix_right"]) for r in records], y)),
        "auroc_prompt_difficulty": _r(auroc(difficulty, y)),
        "auroc_checker_then_difficulty": _r(auroc(checker_then_difficulty, y)),
        "mean_p_hat": _r(sum(phat) / len(phat)),
        "auroc_self_evaluation": _r(auroc(selfeval, y)),
        "auroc_self_evaluation_prompt_mean": _r(auroc([selfeval_prompt_mean[r["task_id"]] for r in records], y)),
        "auroc_within_prompt_self_evaluation": _r(within(selfeval, y)),
        "auroc_within_prompt_p_hat": _r(within(phat, y)),
        "auroc_self_evaluation_for_p_hat_above_half": _r(auroc(selfeval, [float(x > 0.5) for x in phat])),
        "mean_self_evaluation": _r(sum(selfeval) / len(selfeval)),
    }


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


def write(report: dict, at: list[int], output: Path) -> None:
    """Add the figures at each length (pooled and per family) to ``report``; print them; write the JSON."""
    K = report["continuations"]
    report["at"] = {}
    for k in at:
        rs = [r for r in report["records"] if r["k"] == k]
        fams = sorted({r["family"] for r in rs})
        report["at"][str(k)] = {
            **figures(rs, K, report["originals"]),
            "per_family": {f: figures([r for r in rs if r["family"] == f], K, report["originals"]) for f in fams},
        }
        f = report["at"][str(k)]
        print(
            f"at {k} tokens: {f['prefixes']} prefixes ({f['right']} right): AUROC of p_hat ({K} continuations) "
            f"{f['auroc_p_hat']} (95% CI {f['auroc_p_hat_ci95'][0]}..{f['auroc_p_hat_ci95'][1]}), "
            f"{K // 2}-continuation p_hat vs the other half {f['auroc_half_p_hat_vs_other_half']}, "
            f"plug-in {f['auroc_plug_in']}; the method's target's expectation {f['auroc_expected_win_or_tie_target']} "
            f"(95% CI {f['auroc_expected_win_or_tie_target_ci95']}; graded reward: "
            f"{f['auroc_expected_graded_win_or_tie_target']}, {f['auroc_expected_graded_win_or_tie_target_ci95']}); "
            f"references: checker on the prefix {f['auroc_checker_on_prefix']}, "
            f"prompt difficulty {f['auroc_prompt_difficulty']}, checker then difficulty "
            f"{f['auroc_checker_then_difficulty']}; the self-evaluator {f['auroc_self_evaluation']} "
            f"({f['auroc_self_evaluation_ci95']}; its prompt "
            f"means {f['auroc_self_evaluation_prompt_mean']}), within prompts "
            f"{f['auroc_within_prompt_self_evaluation']} against p_hat's {f['auroc_within_prompt_p_hat']}"
        )
        for fam, g in f["per_family"].items():
            print(
                f"  {fam}: {g['prefixes']} prefixes ({g['right']} right), p_hat {g['auroc_p_hat']}, "
                f"checker {g['auroc_checker_on_prefix']}, difficulty {g['auroc_prompt_difficulty']}, "
                f"self-evaluation {g['auroc_self_evaluation']}, "
                f"expected target {g['auroc_expected_win_or_tie_target']} "
                f"(graded {g['auroc_expected_graded_win_or_tie_target']})"
            )
    bulk = ("records", "originals")
    report = {k: v for k, v in report.items() if k not in bulk} | {k: report[k] for k in bulk}
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
