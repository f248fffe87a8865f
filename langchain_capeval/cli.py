"""The ``capeval`` command line.

Commands:
    capeval chat "What is 3 + 4?"      answer with ChatCapEval, print the compute spent
    capeval convert                     convert (and cache) the embedded default model; report load times
    capeval draw-graph                  draw the graph offline: docs/graph.mmd and docs/graph.png
    capeval bench                       accuracy vs samples/tokens: adaptive sampling, pruning, baselines

Example:
    $ capeval chat "What is the capital of France?" --strategy adaptive --max-samples 8

"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from typing import Any, Literal, get_args, get_origin

from langchain_capeval.config import CapEvalConfig


def _int_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(","))


def _policy_args(p: argparse.ArgumentParser) -> None:
    """Add one flag per CapEvalConfig field, typed from its annotation, with its docstring as help."""
    for name, field in CapEvalConfig.model_fields.items():
        ann = field.annotation
        kwargs: dict[str, Any] = {"help": (field.description or "").split("\n")[0] or None, "dest": name}
        if get_origin(ann) is Literal:
            kwargs["choices"] = get_args(ann)
        elif ann == tuple[int, ...]:
            kwargs["type"] = _int_tuple
        elif ann in (int, int | None):
            kwargs["type"] = int
        elif ann in (float, float | None):
            kwargs["type"] = float
        p.add_argument("--" + name.replace("_", "-"), **kwargs)


def _policy_from(ns: argparse.Namespace) -> dict[str, Any]:
    return {k: getattr(ns, k) for k in CapEvalConfig.model_fields if getattr(ns, k, None) is not None}


def cmd_chat(ns: argparse.Namespace) -> int:
    """Answer one prompt and show the compute spent."""
    from langchain_capeval.chat_models import ChatCapEval

    start = time.perf_counter()
    llm = ChatCapEval(model=ns.model, adapter=None if ns.no_adapter else ns.adapter, **_policy_from(ns))
    engine = llm.get_engine()
    load_s = time.perf_counter() - start
    t0 = time.perf_counter()
    msg = llm.invoke(ns.prompt)
    answer_s = time.perf_counter() - t0
    meta = msg.response_metadata
    if ns.json:
        print(json.dumps({"answer": msg.content, "usage": msg.usage_metadata, **meta, "answer_s": answer_s}, indent=2))
        return 0
    report = getattr(engine, "load_report", None)
    how = "from the cache" if report is not None and report.from_cache else "built once and cached"
    print(f"model     {meta['model_name']}  (loaded in {load_s:.1f}s, {how})")
    print(f"prompt    {ns.prompt}")
    print(f"answer    {msg.content}")
    print()
    print("| sample | temperature | tokens | P(win or tie) | finish | pruned |")
    print("|---:|---:|---:|---:|---|---|")
    for s in meta["samples"]:
        mark = " <- accepted" if s["index"] == meta["accepted_sample"] else ""
        score = "-" if s["p_win_or_tie"] is None else f"{s['p_win_or_tie']:.3f}"
        print(
            f"| {s['index']} | {s['temperature']:.2f} | {s['tokens']} | {score} | {s['finish_reason']} |"
            f" {'yes' if s['pruned'] else 'no'} |{mark}"
        )
    c = meta["compute"]
    print()
    print(
        f"compute   {meta['samples_used']} sample(s); stopped: {meta['stop_reason']}; "
        f"tokens: {int(c['prompt_tokens'])} prompt + {int(c['generated_tokens'])} generated + "
        f"{int(c['self_eval_tokens'])} self-evaluation; {answer_s:.1f}s"
    )
    return 0


def cmd_convert(ns: argparse.Namespace) -> int:
    """Convert the default model once, then time a load from the cache."""
    import shutil

    from langchain_capeval.models import load_model, resolve_model_path

    folder, _ = resolve_model_path(ns.model)
    if ns.fresh and folder.exists():
        shutil.rmtree(folder)
    first = load_model(ns.model).report
    later = load_model(ns.model).report
    print(f"first load: {first.seconds:.1f}s (from cache: {first.from_cache}); later load: {later.seconds:.1f}s")
    print(f"converted copy: {later.path}")
    return 0


def cmd_draw(ns: argparse.Namespace) -> int:
    """Draw the graph offline: Mermaid text and a PNG (graphviz, no web service)."""
    from pathlib import Path

    from langchain_capeval.chat_models import shared_engine
    from langchain_capeval.graph import build_graph

    drawable = build_graph(shared_engine(None, None, "cpu")).get_graph()
    Path(ns.mermaid).write_text(drawable.draw_mermaid())
    drawable.draw_png(ns.png)
    print(f"wrote {ns.mermaid} and {ns.png}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``capeval``."""
    parser = argparse.ArgumentParser(prog="capeval", description="Adaptive inference-time compute for LangChain.")
    sub = parser.add_subparsers(dest="command", required=True)

    chat = sub.add_parser("chat", help="answer a prompt with ChatCapEval and show the compute spent")
    chat.add_argument("prompt")
    chat.add_argument("--model", default=None, help="local model folder or .gguf (default: embedded SmolLM2)")
    chat.add_argument("--adapter", default="default", help="self-evaluation adapter: folder or shipped name")
    chat.add_argument("--no-adapter", action="store_true", help="run the base model without an adapter")
    chat.add_argument("--json", action="store_true", help="print JSON")
    _policy_args(chat)
    chat.set_defaults(func=cmd_chat)

    conv = sub.add_parser("convert", help="convert and cache a GGUF model; report first and later load times")
    conv.add_argument("--model", default=None)
    conv.add_argument("--fresh", action="store_true", help="delete the cached copy first")
    conv.set_defaults(func=cmd_convert)

    from langchain_capeval.training.cli import add_training_commands  # build-data, train, eval-selfeval

    add_training_commands(sub)
    from langchain_capeval.server.cli import add_serve_command  # capeval serve

    add_serve_command(sub)
    from langchain_capeval.bench.cli import add_bench_command  # capeval bench

    add_bench_command(sub)

    draw = sub.add_parser("draw-graph", help="draw the adaptive-compute graph offline (Mermaid text and PNG)")
    draw.add_argument("--mermaid", default="docs/graph.mmd")
    draw.add_argument("--png", default="docs/graph.png")
    draw.set_defaults(func=cmd_draw)

    ns = parser.parse_args(argv)
    try:
        return int(ns.func(ns))
    except Exception as e:  # one clear line, not a traceback, for errors of input or installation
        from langchain_capeval.errors import CapEvalError

        if isinstance(e, CapEvalError | ValueError | FileNotFoundError):
            print(f"capeval: error: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
