"""What a linear read-out of the model's hidden state can learn from the default's training data.

The self-evaluator's answer is read at one position: P(win or tie) = sigmoid(logit("No") -
logit("Yes")), and that logit difference is a linear function, (w_No - w_Yes) . h, of the final
hidden state h at the answer position. A linear probe on the final layer is therefore a
self-evaluator the method could express by moving h along one direction (a probe on an earlier
layer is a read-out of features the model has, not one its answer token reads). Fitted on the
*base* model's hidden states, with the data the default adapter was trained on (section 24:
``runs/pc-data``, the first 8 samples of each train prompt, each full response and its recorded
prefixes, each with its graded win-or-tie target), it measures how much of the issue's goals the
base model's features carry without training them; fitted on the *default's* hidden states, how
much more its own features say than its answer token does.

1. Featurise the training examples, tree-packed as the trainer packs them (each branch the sequence
   the engine self-evaluates): every layer's hidden state at each answer position, through the base
   model and (``--default-features``) through the default adapter.
2. Fit soft-label logistic regressions on the method's targets (a sample with target p counts as a
   positive with weight p and a negative with weight 1 - p: the trainer's soft cross-entropy), and,
   for reference, on correctness; the layer and the L2 strength chosen by 5-fold cross-validation
   over train prompts (held-out log loss on the fitted label; no test figure enters a choice).
3. Score the test split: the default adapter's evaluated samples (``capeval eval-selfeval``'s own
   decoding code and seeds, so the six families' samples are section 24's), full responses and
   prefixes at 8/16/32 tokens, and colors (all its splits). Colors is decoded in batches of its own,
   where the evaluation decodes it after the trained families in one list (its first batch holds the
   last trained prompts), so some of its samples or scores differ by rounding: the default scores 0.6941 /
   0.6643 (full / at 16) on these, 0.6954 / 0.6659 on section 24's. The default's own P(win or tie)
   is scored on the same samples beside the probes (on the six families it comes out as section 24's
   figures); its read-out recomputed from the packed sequences must equal the engine's (a check that
   the sequences are the engine's).

Usage (from the repo root, after ``make install``; ``runs/pc-data`` as results/training/v20-kl-weight-3
builds it)::

    python results/training/v24-linear-probe/linear_probe.py \
        --data runs/pc-data/preferences.jsonl \
        --eval-json results/training/v20-kl-weight-3/step-300-test.json \
        --features runs/probe-features.pt --default-features --output runs/linear-probe.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from langchain_capeval.adapters import default_adapter_path
from langchain_capeval.engines.transformers import TransformersEngine, TransformersEngineConfig
from langchain_capeval.models import load_model
from langchain_capeval.training.config import SelfEvalEvalConfig
from langchain_capeval.training.dataset import read_records
from langchain_capeval.training.evaluate import (
    EvalSample,
    collect_self_evaluations,
    evaluation_tasks,
    summarize,
    within_prompt_auroc,
)
from langchain_capeval.training.examples import PackedSample, collate, pack_sample
from langchain_capeval.training.metrics import auroc, auroc_interval

SAMPLES_PER_PROMPT = 8  # the default's --samples-per-prompt (section 24)


def hidden_at_answers(model, packed: list[PackedSample], batch: int = 16) -> torch.Tensor:
    """Every layer's hidden state at each answer position of tree-packed samples (the trainer's packing).

    Returns ``[branches, layers + 1, hidden]``, branches in the order of ``packed`` and, within a sample,
    of its ``num_tokens``.
    """
    decoder = model.get_decoder()
    order = sorted(range(len(packed)), key=lambda i: len(packed[i]))
    out: list[torch.Tensor | None] = [None] * len(packed)
    with torch.inference_mode():
        for b in range(0, len(order), batch):
            idx = order[b : b + batch]
            bt = collate([packed[i] for i in idx])
            hs = decoder(
                input_ids=bt.input_ids,
                attention_mask=bt.attention_mask,
                position_ids=bt.position_ids,
                output_hidden_states=True,
            ).hidden_states
            flat = torch.stack([h.reshape(-1, h.shape[-1])[bt.answer_index] for h in hs], dim=1)
            start = 0
            for i in idx:
                n = len(packed[i].answer_positions)
                out[i] = flat[start : start + n].clone()
                start += n
    return torch.cat(out)  # type: ignore[arg-type]


def training_examples(data: Path, fmt, max_prompts_per_family: int | None = None) -> tuple[list[dict], list]:
    """The default's training examples: the first 8 samples of each prompt, full response then prefixes."""
    rows, packed = [], []
    seen: dict[str, int] = {}
    for rec in read_records(data):
        seen[rec.family] = seen.get(rec.family, 0) + 1
        if max_prompts_per_family and seen[rec.family] > max_prompts_per_family:
            continue
        for s in rec.samples[:SAMPLES_PER_PROMPT]:
            lengths = [len(s.token_ids), *s.prefix_lengths]
            packed.append(
                pack_sample(
                    rec.prompt_ids,
                    s.token_ids,
                    fmt.self_evaluation_suffix,
                    lengths,
                    [s.target] * len(lengths),
                    fmt.eos_token_ids,
                )
            )
            rows.extend(
                {
                    "prompt": rec.task["id"],
                    "family": rec.task["family"],
                    "k": k,
                    "full": k == lengths[0],
                    "target": s.target,
                    "correct": s.is_correct,
                }
                for k in lengths
            )
    return rows, packed


def test_examples(engine: TransformersEngine, cfg: SelfEvalEvalConfig, tasks) -> tuple[list[dict], list, list]:
    """The evaluation's samples of ``tasks`` (its own decoding code), packed with the prefixes it scored."""
    fmt = engine.chat_format
    seen: dict[int, list[int]] = {}  # row -> its tokens, as they were when last self-evaluated
    finals: list[int] = []

    def score(rows):
        snaps = [engine.sample(r) for r in rows]
        if all(s.finished for s in snaps):
            finals.extend(rows)
        for s in snaps:
            seen[s.row] = list(s.token_ids)
        return engine.self_evaluate(rows)

    # the evaluation's own decoding loop, its scorer wrapped to keep each row's tokens
    samples = collect_self_evaluations(engine, tasks, cfg, score=score)
    by_id = {t.id: t for t in tasks}
    rows, packed = [], []
    for row, es in zip(finals, samples, strict=True):
        ids = seen[row]
        lengths = [len(ids), *(int(k) for k in es.p_at)]
        scores = [es.p_full, *es.p_at.values()]
        packed.append(
            pack_sample(
                fmt.encode(by_id[es.task_id].messages()),
                ids,
                fmt.self_evaluation_suffix,
                lengths,
                scores,
                fmt.eos_token_ids,
            )
        )
        rows.extend(
            {
                "prompt": es.task_id,
                "family": es.family,
                "k": k,
                "full": k == lengths[0],
                "correct": es.correct,
                "default": sc,
            }
            for k, sc in zip(lengths, scores, strict=True)
        )
    return rows, packed, samples


def featurise(args, cfg, cached: dict | None = None) -> dict:
    """Collect the test samples, featurise train, test and colors; check the read-out against the engine.

    With ``cached`` (an earlier call's result), only the models missing from it are featurised, on
    samples checked to be the cached ones.
    """
    engine = TransformersEngine.from_config(
        TransformersEngineConfig(
            model=cfg.model,
            adapter=str(default_adapter_path()),
            cache_merged=False,
            pack_output_projection=False,
            pack_linear_layers=False,
            prefix_caching=False,
        )
    )
    fmt = engine.chat_format
    trained, heldout = evaluation_tasks(cfg)
    t0 = time.perf_counter()
    test, test_packed, test_samples = test_examples(engine, cfg, trained)
    colors, colors_packed, color_samples = test_examples(engine, cfg, heldout)
    print(f"test {len(test)} / colors {len(colors)} sequences, {time.perf_counter() - t0:.0f} s", flush=True)
    train, train_packed = training_examples(Path(args.data), fmt, cfg.max_prompts_per_family)
    print(f"train {len(train)} sequences", flush=True)
    # the default's own read-out, from the packed sequences, must be what the engine reported
    no, yes = fmt.answer_token_ids
    head = engine.model.get_output_embeddings()
    with torch.inference_mode():
        h = hidden_at_answers(engine.model, test_packed[:16])[:, -1]
        mine = torch.sigmoid(head(h)[:, no] - head(h)[:, yes]).numpy()
    n = len(mine)
    diff = float(np.max(np.abs(mine - np.array([r["default"] for r in test[:n]]))))
    print(f"default's P(win or tie) from the packed sequences vs the engine's: max |diff| {diff:.2e}", flush=True)
    meta = {"train": train, "test": test, "colors": colors}
    summaries = {"test": summarize(test_samples, cfg.checkpoints), "colors": summarize(color_samples, cfg.checkpoints)}
    if cached and (cached["meta"], cached["engine_summaries"]) != (meta, summaries):
        raise SystemExit(f"{args.features} holds other samples than this run's; pass another --features")
    feats = dict(cached["feats"]) if cached else {}
    models = {"base": lambda: load_model(cfg.model).model.eval(), "default": lambda: engine.model.eval()}
    wanted = ["base", *(["default"] if args.default_features else [])]
    for name in (n for n in wanted if f"{n}/train" not in feats):
        model = models[name]()
        for part, packed in (("train", train_packed), ("test", test_packed), ("colors", colors_packed)):
            t0 = time.perf_counter()
            feats[f"{name}/{part}"] = hidden_at_answers(model, packed).to(torch.float32)
            print(f"{name}/{part}: {tuple(feats[f'{name}/{part}'].shape)} {time.perf_counter() - t0:.0f} s", flush=True)
    return {"feats": feats, "meta": meta, "readout_check_max_abs_diff": diff, "engine_summaries": summaries}


def fit_probe(x: np.ndarray, p: np.ndarray, c: float):
    """Soft-label logistic regression: each example a positive of weight p and a negative of weight 1 - p."""
    from sklearn.linear_model import LogisticRegression

    n = len(x)
    clf = LogisticRegression(C=c, max_iter=2000)
    clf.fit(np.concatenate([x, x]), np.r_[np.ones(n), np.zeros(n)], sample_weight=np.r_[p, 1 - p])
    return clf


def soft_log_loss(q: np.ndarray, p: np.ndarray) -> float:
    """Mean cross-entropy of predictions ``q`` against soft targets ``p`` (the trainer's answer loss)."""
    q = np.clip(q, 1e-6, 1 - 1e-6)
    return float(-np.mean(p * np.log(q) + (1 - p) * np.log(1 - q)))


def standardise(train: np.ndarray, *others: np.ndarray):
    """Scale every array by the first one's per-feature mean and standard deviation."""
    mu, sd = train.mean(0), train.std(0) + 1e-6
    return [(a - mu) / sd for a in (train, *others)]


def cross_validate(x: np.ndarray, p: np.ndarray, groups: list[str], c: float, folds: int = 5) -> float:
    """Held-out soft log loss of the probe, ``folds``-fold over prompts (a prompt's examples in one fold)."""
    from sklearn.model_selection import GroupKFold

    losses = []
    for tr, va in GroupKFold(folds).split(x, p, groups):
        xtr, xva = standardise(x[tr], x[va])
        losses.append(soft_log_loss(fit_probe(xtr, p[tr], c).predict_proba(xva)[:, 1], p[va]) * len(va))
    return sum(losses) / len(x)


def figures(rows: list[dict], scores: np.ndarray) -> dict:
    """The evaluation's figures for one scorer: AUROC full (pooled, within prompts, per family), at k."""

    def auc(idx: list[int]) -> float | None:
        return auroc([scores[i] for i in idx], [rows[i]["correct"] for i in idx]) if idx else None

    def ci95(idx: list[int]) -> list[float] | None:
        interval = auroc_interval(
            [scores[i] for i in idx], [rows[i]["correct"] for i in idx], [rows[i]["prompt"] for i in idx]
        )
        return [round(x, 4) for x in interval] if interval else None

    full = [i for i, r in enumerate(rows) if r["full"]]
    out = {"auroc_full": auc(full), "auroc_full_ci95": ci95(full)}
    out["auroc_within_prompts"] = within_prompt_auroc(
        [
            EvalSample(rows[i]["prompt"], rows[i]["family"], rows[i]["correct"], rows[i]["k"], scores[i], 0, 0)
            for i in full
        ]
    )
    for k in (8, 16, 32):
        at = [i for i, r in enumerate(rows) if not r["full"] and r["k"] == k]
        out[f"auroc_at_{k}"] = auc(at)
        if k == 16 and at:
            out["auroc_at_16_ci95"] = ci95(at)
    fams = sorted({rows[i]["family"] for i in full})
    out["auroc_full_by_family"] = {f: auc([i for i in full if rows[i]["family"] == f]) for f in fams}
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in out.items()}


def main() -> None:
    """Featurise (or read the cache), choose and fit the probes, write the figures."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, help="the default's preferences.jsonl (runs/pc-data)")
    ap.add_argument("--eval-json", required=True, help="section 24's test-split report (its config is reused)")
    ap.add_argument("--features", required=True, help="cache of the hidden states (written once, then read)")
    ap.add_argument(
        "--layers",
        type=int,
        nargs="+",
        default=[6, 12, 16, 20, 24, 27, 30],
        help="hidden_states indices tried (30: after the final norm, what the LM head reads)",
    )
    ap.add_argument("--c", type=float, nargs="+", default=[0.0003, 0.001, 0.003, 0.01, 0.03], help="L2 strengths tried")
    ap.add_argument("--default-features", action="store_true", help="also the default adapter's hidden states")
    ap.add_argument("--fit", nargs="+", choices=["base", "default"], help="the features to fit probes on (all cached)")
    ap.add_argument("--max-prompts-per-family", type=int, default=None, help="a smaller run (a smoke test)")
    ap.add_argument("--output", required=True)
    args = ap.parse_args()
    cap = {"max_prompts_per_family": args.max_prompts_per_family} if args.max_prompts_per_family else {}
    cfg = SelfEvalEvalConfig(
        **{**json.loads(Path(args.eval_json).read_text())["config"], "output_dir": "unused", **cap}
    )
    cache = Path(args.features)
    data = torch.load(cache, weights_only=False) if cache.is_file() else None
    if data is None or (args.default_features and "default/train" not in data["feats"]):
        data = featurise(args, cfg, data)
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save(data, cache)
    meta = data["meta"]
    p = np.array([r["target"] for r in meta["train"]])
    y = np.array([float(r["correct"]) for r in meta["train"]])
    groups = [r["prompt"] for r in meta["train"]]
    report: dict = {
        "data": args.data,
        "eval_json": args.eval_json,
        "samples_per_prompt": SAMPLES_PER_PROMPT,
        "counts": {k: len(v) for k, v in meta.items()},
        "readout_check_max_abs_diff": data["readout_check_max_abs_diff"],
        "engine_summaries": {
            k: {m: v[m] for m in ("auroc_full", "auroc_within_prompt", "auroc_at")}
            for k, v in data["engine_summaries"].items()
        },
        "default": {
            part: figures(meta[part], np.array([r["default"] for r in meta[part]])) for part in ("test", "colors")
        },
        "probes": {},
    }
    for feats in args.fit or sorted({k.split("/")[0] for k in data["feats"]}):

        def at_layer(layer: int, feats: str = feats) -> list[np.ndarray]:
            """Train, test and colors features of one layer, standardised by the train split's."""
            return standardise(
                *(data["feats"][f"{feats}/{part}"][:, layer].numpy() for part in ("train", "test", "colors"))
            )

        for label, tgt in (("win_or_tie_target", p), ("correctness", y)):
            cv = {}
            for layer in args.layers:
                x = data["feats"][f"{feats}/train"][:, layer].numpy()
                for c in args.c:
                    cv[(layer, c)] = cross_validate(x, tgt, groups, c)
                    print(f"{feats} {label} layer {layer} C {c}: CV log loss {cv[(layer, c)]:.4f}", flush=True)
            (layer, c) = min(cv, key=cv.get)
            xtr, xte, xco = at_layer(layer)
            clf = fit_probe(xtr, tgt, c)
            entry = {
                "layer": layer,
                "C": c,
                "cv_log_loss": round(cv[(layer, c)], 4),
                "cv": {f"{lay}/{cc}": round(v, 4) for (lay, cc), v in cv.items()},
            }
            for part, x in (("test", xte), ("colors", xco)):
                entry[part] = figures(meta[part], clf.predict_proba(x)[:, 1])
            # the same fit restricted to what the LM head reads (layer 30), for the method's read-out
            if layer != 30:
                xtr30, xte30, xco30 = at_layer(30)
                c30 = min((cc for (lay, cc) in cv if lay == 30), key=lambda cc: cv[(30, cc)])
                clf30 = fit_probe(xtr30, tgt, c30)
                entry["final_layer"] = {
                    "C": c30,
                    "test": figures(meta["test"], clf30.predict_proba(xte30)[:, 1]),
                    "colors": figures(meta["colors"], clf30.predict_proba(xco30)[:, 1]),
                }
            report["probes"][f"{feats}/{label}"] = entry
            print(json.dumps({f"{feats}/{label}": {k: v for k, v in entry.items() if k != "cv"}}), flush=True)
    Path(args.output).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
