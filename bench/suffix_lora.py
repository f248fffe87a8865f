"""Experiment (docs/training.md section 8): a LoRA active on the self-evaluation chunk only.

The shipped adapter is merged into the weights, so it also changes generation; a larger
learning rate then buys AUROC with pass@1 (section 7). Here the adapter runs only on the
self-evaluation chunk (the pending last token and the self-evaluation turn), on top of a
KV cache the base weights wrote for the prompt and the response: the activated-LoRA idea.
Generation stays the base model's exactly.

``train``: for each sample, the trunk (prompt + response minus its last token) runs through
the base weights without gradients; the chunk runs with the adapter over the trunk's cache;
the loss is the two-way soft cross-entropy on the answer token against the win-or-tie target.

``eval``: the section 6 evaluation (same tasks, seeds and sampling) with an engine that
generates with the base weights and self-evaluates with the adapted ones over the base
model's cache (``TransformersEngine(selfeval_lora=...)``, what the engine does for any adapter
whose ``capeval_adapter.json`` says ``"scope": "self_evaluation"``, which ``train`` writes);
writes ``selfeval_eval.json``.

``--dev-every 5`` holds every 5th prompt of the data out of training and, every
``--eval-every`` steps, scores its samples (all of them, full and at 16 tokens) without
sampling anything: a learning curve in minutes (``dev_log`` in ``train_log.json``).
``--heldout-family F`` puts all of family F in that dev split (a family never trained on).
``--target correctness`` trains on the 0/1 reward instead of the win-or-tie target: a
measurement of what the method's target costs the correctness AUROC, not the method.
Correctness is each sample's ``correct`` (the checker's verdict), or its 0/1 reward in data
built before that field; so data relabelled with a graded reward (``capeval relabel``) trains
on its graded targets and is scored for correctness as before.

Usage:
    python bench/suffix_lora.py train --data results/training/v2/data/preferences.jsonl --out runs/suffix
    python bench/suffix_lora.py eval --adapter runs/suffix --out results/training/v4-suffix-lora
    python bench/suffix_lora.py eval --adapter runs/a --adapter runs/b --base --out runs/ab  # one decoding pass
    python bench/suffix_lora.py train --data results/training/v5-suffix-lora/data/preferences.jsonl \
        --out runs/dev --samples-per-prompt 16 --learning-rate 3e-3 --epochs 2 --dev-every 5 --eval-every 100
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from langchain_capeval.adapters import write_adapter_scope
from langchain_capeval.chat_format import ChatFormat
from langchain_capeval.engines.cpu import run_in_own_thread
from langchain_capeval.engines.lora import SelfEvaluationLoRA
from langchain_capeval.engines.transformers import TransformersEngine
from langchain_capeval.models import load_model
from langchain_capeval.training.config import SelfEvalEvalConfig
from langchain_capeval.training.evaluate import (
    EvalSample,
    collect_self_evaluations_by_adapter,
    evaluation_tasks,
    summarize,
)
from langchain_capeval.training.examples import ChunkExample
from langchain_capeval.training.trainer import chunk_answer_logits

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
Example = ChunkExample  # trunk (base weights), chunk (adapter), target
DEV_CHECKPOINT = 16  # the prefix length the dev split is also scored at (issue #4's second goal)
TRAINING_TARGETS = ("win_or_tie", "correctness")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train the chunk-only LoRA")
    t.add_argument("--data", default="results/training/v2/data/preferences.jsonl")
    t.add_argument("--out", required=True, help="folder for the PEFT adapter and train_log.json")
    t.add_argument("--samples-per-prompt", type=int, default=8)
    t.add_argument("--learning-rate", type=float, default=1e-3)
    t.add_argument("--epochs", type=float, default=3.0)
    t.add_argument("--batch", type=int, default=16, help="samples per step")
    t.add_argument("--lora-r", type=int, default=16)
    t.add_argument("--prefixes", action="store_true", help="also train on the data's truncated prefixes")
    t.add_argument(
        "--target",
        choices=TRAINING_TARGETS,
        default="win_or_tie",
        help="win_or_tie: the method's target; correctness: the 0/1 reward (a diagnostic, not the method)",
    )
    t.add_argument("--dev-every", type=int, default=0, help="hold out every n-th prompt for a dev AUROC (0: none)")
    t.add_argument(
        "--heldout-family",
        action="append",
        default=[],
        help="hold every prompt of this family out of training, into the dev split (repeatable)",
    )
    t.add_argument("--eval-every", type=int, default=100, help="steps between dev evaluations")
    e = sub.add_parser("eval", help="section 6's evaluation: base generation, chunk-only self-evaluation")
    e.add_argument(
        "--adapter",
        action="append",
        required=True,
        help="a chunk-only adapter folder (repeatable: every adapter scores the same samples, decoded once; "
        "each report goes to OUT/<folder name>/)",
    )
    e.add_argument("--base", action="store_true", help="also score the zero-shot base model (OUT/base/)")
    e.add_argument("--out", required=True)
    e.add_argument("--n-per-family", type=int, default=80)
    e.add_argument("--max-prompts-per-family", type=int, default=None)
    e.add_argument("--num-samples", type=int, default=8)
    e.add_argument("--max-new-tokens", type=int, default=48)
    return parser.parse_args()


def chunk_example(prompt_ids: list[int], response_ids: list[int], target: float, fmt: ChatFormat) -> Example:
    """The trunk (prompt and response but its last token) and the chunk (that token and the turn)."""
    return ChunkExample.of(
        prompt_ids, response_ids, len(response_ids), fmt.self_evaluation_suffix, target, fmt.eos_token_ids
    )


def load_examples(
    path: str,
    fmt: ChatFormat,
    samples_per_prompt: int,
    dev_every: int = 0,
    prefixes: bool = False,
    target: str = "win_or_tie",
    heldout_families: Sequence[str] = (),
) -> tuple[list[Example], list[tuple[Example, EvalSample, int]]]:
    """Training examples, and the held-out prompts' samples at full length and 16 tokens.

    Training examples are the full responses and, with ``prefixes``, their truncations at the
    data's ``prefix_lengths``, each with its completion's target. With ``dev_every=n``, every
    n-th prompt (0, n, 2n, ...) is held out, with all its samples, and so is every prompt of
    ``heldout_families`` (a family never trained on: issue #4's third goal); a dev row is
    ``(example, its EvalSample to fill, checkpoint)``, checkpoint 0 for the full response.
    ``target="correctness"`` trains on correctness instead of the win-or-tie target: not
    the method, a measurement of what the win-or-tie target costs the correctness AUROC
    (docs/training.md section 10); dev samples keep their win-or-tie target either way.
    """
    if target not in TRAINING_TARGETS:
        raise ValueError(f"target must be one of {TRAINING_TARGETS}, got {target!r}")
    examples: list[Example] = []
    dev: list[tuple[Example, EvalSample, int]] = []
    for i, line in enumerate(Path(path).read_text().splitlines()):
        rec = json.loads(line)
        held_out = (dev_every > 0 and i % dev_every == 0) or rec["task"]["family"] in heldout_families
        for s in rec["samples"] if held_out else rec["samples"][:samples_per_prompt]:
            t, win_or_tie = s["token_ids"], float(s["target"])
            correct = s["reward"] > 0 if s.get("correct") is None else bool(s["correct"])
            if not held_out:
                p = win_or_tie if target == "win_or_tie" else float(correct)
                examples.append(chunk_example(rec["prompt_ids"], t, p, fmt))
                for n in s["prefix_lengths"] if prefixes else []:
                    examples.append(chunk_example(rec["prompt_ids"], t[:n], p, fmt))
                continue
            sample = EvalSample(rec["task"]["id"], rec["task"]["family"], correct, len(t), 0.0, 0.0, 0.0)
            sample.target = win_or_tie
            dev.append((chunk_example(rec["prompt_ids"], t, win_or_tie, fmt), sample, 0))
            if len(t) > DEV_CHECKPOINT:
                truncated = chunk_example(rec["prompt_ids"], t[:DEV_CHECKPOINT], win_or_tie, fmt)
                dev.append((truncated, sample, DEV_CHECKPOINT))
    return examples, dev


def chunk_loss(model: Any, batch: Sequence[Example], no_id: int, yes_id: int) -> torch.Tensor:
    """Two-way soft cross-entropy of the answer token against the examples' targets (``--target``)."""
    two_way = chunk_answer_log_probs(model, batch, no_id, yes_id)
    p = torch.tensor([b.target for b in batch])
    return -(p * two_way[:, 0] + (1 - p) * two_way[:, 1]).mean()


def chunk_answer_log_probs(model: Any, batch: Sequence[Example], no_id: int, yes_id: int) -> torch.Tensor:
    """Log P("No") and log P("Yes"), renormalised over the two, per example (the library's chunk-only forward)."""
    return torch.log_softmax(chunk_answer_logits(model, batch)[:, [no_id, yes_id]].float(), -1)


def dev_report(model: Any, dev: Sequence[tuple[Example, EvalSample, int]], no_id: int, yes_id: int) -> dict[str, Any]:
    """Score the held-out samples (full and at 16 tokens) and summarise them as ``eval`` does."""
    order = sorted(range(len(dev)), key=lambda j: len(dev[j][0].trunk))
    for k in range(0, len(order), 32):
        rows = [dev[j] for j in order[k : k + 32]]
        with torch.no_grad():
            p_no = chunk_answer_log_probs(model, [r[0] for r in rows], no_id, yes_id)[:, 0].exp().tolist()
        for (_, sample, checkpoint), p in zip(rows, p_no, strict=True):
            if checkpoint:
                sample.p_at[str(checkpoint)] = p
            else:
                sample.p_full = p
    samples = list({id(r[1]): r[1] for r in dev}.values())
    report = summarize(samples, (DEV_CHECKPOINT,))
    keys = ("auroc_full", "auroc_within_prompt", "auroc_at", "mean_p_win_or_tie", "brier_win_or_tie")
    row = {k: report[k] for k in keys}
    row["auroc_win_or_tie_target"] = report["auroc_win_or_tie_target"]  # the ceiling for this target
    by_family: dict[str, list[EvalSample]] = {}
    for s in samples:
        by_family.setdefault(s.family, []).append(s)
    row["auroc_full_by_family"] = {f: summarize(ss, ())["auroc_full"] for f, ss in sorted(by_family.items())}
    return row


def train(args: argparse.Namespace) -> None:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    loaded = run_in_own_thread(lambda: load_model(None))
    fmt = ChatFormat(loaded.tokenizer)
    no_id, yes_id = fmt.answer_token_ids
    examples, dev = load_examples(
        args.data, fmt, args.samples_per_prompt, args.dev_every, args.prefixes, args.target, args.heldout_family
    )
    config = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0, target_modules=list(TARGETS))
    model = get_peft_model(loaded.model, config)
    params = [p for p in model.parameters() if p.requires_grad]
    steps = max(1, math.ceil(len(examples) / args.batch * args.epochs))
    opt = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / 10) * max(0.0, 1 - i / steps))

    def evaluate_dev(step: int, losses: list[float]) -> dict[str, Any]:
        row = {"step": step, "loss": round(sum(losses[-20:]) / max(1, len(losses[-20:])), 4)}
        row.update(dev_report(model, dev, no_id, yes_id))
        print(json.dumps(row), flush=True)
        return row

    dev_log: list[dict[str, Any]] = []

    def loop() -> list[float]:  # on a thread that ends, like the engine's work (engines.cpu)
        losses: list[float] = []
        rng, start = random.Random(0), time.perf_counter()
        if dev:
            dev_log.append(evaluate_dev(0, losses))
        while len(losses) < steps:
            order = examples[:]
            rng.shuffle(order)
            for k in range(0, len(order), args.batch):
                if len(losses) >= steps:
                    break
                loss = chunk_loss(model, order[k : k + args.batch], no_id, yes_id)
                opt.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                schedule.step()
                losses.append(loss.item())
                if len(losses) % 10 == 0:
                    recent = losses[-10:]
                    print(
                        f"step {len(losses)}/{steps} loss {sum(recent) / len(recent):.4f} "
                        f"{time.perf_counter() - start:.0f}s",
                        flush=True,
                    )
                if dev and (len(losses) % args.eval_every == 0 or len(losses) == steps):
                    dev_log.append(evaluate_dev(len(losses), losses))
        return losses

    losses = run_in_own_thread(loop)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    write_adapter_scope(out, "self_evaluation")  # engines then decode with the base weights (adapters.py)
    mean = sum(e.target for e in examples) / len(examples)
    floor = -sum(e.target * math.log(mean) + (1 - e.target) * math.log(1 - mean) for e in examples) / len(examples)
    log = {
        "args": vars(args),
        "examples": len(examples),
        "steps": steps,
        "loss": losses,
        "mean_target_predictor_loss": floor,
        "dev_prompts": len({r[1].task_id for r in dev}),
        "dev_families": sorted({r[1].family for r in dev}),
        "dev_log": dev_log,
    }
    (out / "train_log.json").write_text(json.dumps(log, indent=1) + "\n")
    tail = losses[-20:]
    print(f"mean-target predictor loss {floor:.4f}; last {len(tail)} steps {sum(tail) / len(tail):.4f}")


def evaluate(args: argparse.Namespace) -> None:
    cfg = SelfEvalEvalConfig(
        adapter=None,
        output_dir=args.out,
        families=("add1", "sub1", "capitals", "opposites", "animal_legs", "compare"),
        heldout_family="colors",
        heldout_splits=("train", "dev", "test"),
        n_per_family=args.n_per_family,
        max_prompts_per_family=args.max_prompts_per_family,
        num_samples=args.num_samples,
        max_new_tokens=args.max_new_tokens,
        prompts_per_batch=4,
    )
    trained, heldout = evaluation_tasks(cfg)
    base = run_in_own_thread(lambda: load_model(None))
    scorers: dict[str, SelfEvaluationLoRA | None] = {"base": None} if args.base else {}
    paths = {Path(a).name: a for a in args.adapter}
    if len(paths) != len(args.adapter) or set(paths) & set(scorers):
        raise SystemExit(f"adapter folders need distinct names other than 'base': {args.adapter}")
    scorers |= {name: SelfEvaluationLoRA.load(base.model, a) for name, a in paths.items()}
    engine = TransformersEngine(base.model, base.tokenizer, name="base+chunk-only-lora")
    start = time.perf_counter()
    by_scorer = collect_self_evaluations_by_adapter(engine, trained + heldout, cfg, scorers)
    seconds = round(time.perf_counter() - start, 1)
    engine.close()
    held = {t.id for t in heldout}
    keys = ("samples", "auroc_full", "auroc_within_prompt", "pass_at_1", "best_of_n_selfeval", "oracle")
    print("| scorer | split | " + " | ".join(keys) + " | AUROC at 8/16/32/64 |")
    print("|---" * (len(keys) + 3) + "|")
    for name, samples in by_scorer.items():
        report = {
            "adapter": paths.get(name),
            "config": cfg.model_dump(mode="json"),
            "seconds": seconds,
            "scorers": list(scorers),
            "trained": summarize([s for s in samples if s.task_id not in held], cfg.checkpoints, cfg.bins),
            "heldout": summarize([s for s in samples if s.task_id in held], cfg.checkpoints, cfg.bins),
            "per_family": {
                f: summarize([s for s in samples if s.family == f], (), cfg.bins)
                for f in sorted({s.family for s in samples})
            },
        }
        out = Path(args.out) if len(scorers) == 1 else Path(args.out) / name
        out.mkdir(parents=True, exist_ok=True)
        (out / "selfeval_eval.json").write_text(json.dumps(report, indent=2) + "\n")
        (out / "selfeval_samples.jsonl").write_text("".join(json.dumps(asdict(s)) + "\n" for s in samples))
        for split in ("trained", "heldout"):
            r = report[split]
            at = "/".join(str(r["auroc_at"].get(k)) for k in ("8", "16", "32", "64"))
            print(f"| {name} | {split} | " + " | ".join(str(r.get(k)) for k in keys) + f" | {at} |")


if __name__ == "__main__":
    ns = parse_args()
    if ns.command == "train":
        train(ns)
    else:
        evaluate(ns)
