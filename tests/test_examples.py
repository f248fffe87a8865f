"""The examples users copy, each run as a program on the embedded default, and what they print checked for meaning."""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any
from uuid import UUID

from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import HumanMessage

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
STOP_REASONS = {"threshold_met", "best_of_n", "max_samples", "max_total_tokens", "deadline", "schedule_done"}


def run_example(name: str, *args: str, timeout: float = 300) -> list[str]:
    """Run ``python examples/<name> args...`` as a user would; return its stdout lines."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}  # everything loads from installed wheels
    env.setdefault("OMP_NUM_THREADS", "1")  # CI machines are small and shared: one thread avoids oversubscription
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=EXAMPLES.parent,
    )
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    return proc.stdout.splitlines()


def load_example(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # so that LangGraph can resolve the state's type hints
    spec.loader.exec_module(module)
    return module


def section(lines: list[str], title: str) -> list[str]:
    """The lines after ``== title`` up to the next ``==`` header."""
    start = lines.index(f"== {title}") + 1
    end = next((i for i in range(start, len(lines)) if lines[i].startswith("== ")), len(lines))
    return lines[start:end]


def test_chain_invoke_batch_stream_and_a_per_call_budget() -> None:
    lines = run_example("chain.py", "--max-new-tokens", "24")
    assert [line for line in lines if line.startswith("== ")] == [
        "== invoke",
        "== batch",
        "== stream",
        "== per-call budget",
    ]
    assert "".join(section(lines, "invoke")).strip()
    batch = section(lines, "batch")
    assert [line.split(" -> ")[0] for line in batch] == [
        "What color is the sky on a clear day?",
        "How many legs does a spider have?",
    ]
    assert all(line.split(" -> ", 1)[1].strip() for line in batch)
    stream = section(lines, "stream")
    chunks = int(re.fullmatch(r"\((\d+) chunks\)", stream[-1]).group(1))  # type: ignore[union-attr]
    assert "".join(stream[:-1]).strip() and chunks > 1, "the answer streams token by token"
    budgeted = section(lines, "per-call budget")
    budget = ast.literal_eval(budgeted[-2].removeprefix("budget: "))
    spent = re.fullmatch(r"spent: (\d+) samples, (\d+) tokens, [\d.]+s; stopped: (\w+)", budgeted[-1])
    assert spent is not None, budgeted[-1]
    assert 1 <= int(spent.group(1)) <= budget["max_samples"]
    assert int(spent.group(2)) <= budget["max_total_tokens"]
    assert spent.group(3) in STOP_REASONS


def parse_rag(lines: list[str]) -> tuple[list[dict[str, str]], str]:
    """Blocks of ``key  value`` lines, one per question (starting at ``Q<n>``), and the session line."""
    blocks: list[dict[str, str]] = []
    session = ""
    for line in lines:
        key, _, value = line.partition(" ")
        if re.fullmatch(r"Q\d+", key):
            blocks.append({"question": value.strip()})
        elif key == "session":
            session = value.strip()
        elif blocks and key in ("sources", "answer", "budget", "spent", "skipped"):
            blocks[-1][key] = value.strip()
    return blocks, session


def test_rag_retrieves_the_right_source_and_shares_the_session_budget() -> None:
    tokens, samples = 400, 6
    lines = run_example(
        "rag_budget.py", "--max-new-tokens", "32", "--session-tokens", str(tokens), "--session-samples", str(samples)
    )
    blocks, session = parse_rag(lines)
    expected = ["docs/ferry.md", "docs/bike_rental.md", "docs/recycling.md", "docs/parking.md"]
    assert [b["question"] for b in blocks] == load_example("rag_budget").QUESTIONS
    assert [b["sources"].split(", ")[0] for b in blocks] == expected, "each question retrieves the doc about it"

    tokens_spent = samples_spent = 0
    for i, b in enumerate(blocks):
        assert b["answer"], b
        given = re.fullmatch(r"(\d+) samples, (\d+) tokens, ([\d.]+)s", b["budget"])
        spent = re.fullmatch(
            r"(\d+) samples, (\d+) tokens, [\d.]+s; P\(win or tie\) [-\d., ]+; stopped: (\w+)", b["spent"]
        )
        assert given is not None and spent is not None, b
        waiting = len(blocks) - i
        # each question's share is what earlier ones left, split over the questions still to come
        assert int(given.group(1)) == max(1, (samples - samples_spent) // waiting)
        assert int(given.group(2)) == (tokens - tokens_spent) // waiting
        assert int(spent.group(1)) <= int(given.group(1)) and int(spent.group(2)) <= int(given.group(2))
        assert spent.group(3) in STOP_REASONS
        samples_spent += int(spent.group(1))
        tokens_spent += int(spent.group(2))
    assert session.startswith(f"{samples_spent}/{samples} samples, {tokens_spent}/{tokens} tokens")
    assert samples_spent <= samples and tokens_spent <= tokens


def test_agent_graph_streams_progress_then_the_accepted_answer() -> None:
    lines = run_example("agent_graph.py", "--max-new-tokens", "24", "What is 7 + 5?")
    assert lines[0] == "question  What is 7 + 5?"
    assert lines[1].startswith("route     arithmetic: {'strategy': 'best_of_n', 'num_samples': 3}")
    progress = [line.removeprefix("progress  ") for line in lines if line.startswith("progress  ")]
    assert progress[0].startswith("sampling 3 at temperature")
    assert sum(p.startswith("sample ") and " scored P(win or tie) " in p for p in progress) == 3
    accepted = re.fullmatch(r"accepted sample (\d+) of 3: best_of_n", progress[-1])
    assert accepted is not None, progress[-1]
    answer_at = next(i for i, line in enumerate(lines) if line.startswith("answer    "))
    assert all(not line.startswith("progress") for line in lines[answer_at:]), "progress comes before the answer"
    assert lines[answer_at].removeprefix("answer    ").strip()
    compute = re.fullmatch(
        r"compute   3 samples, \d+ generated tokens, accepted sample (\d+); stopped: best_of_n", lines[-1]
    )
    assert compute is not None and compute.group(1) == accepted.group(1)


class SampleTexts(BaseCallbackHandler):
    """Collects every sample's text from the node outputs of ChatCapEval's inner graph."""

    def __init__(self) -> None:
        self.texts: dict[int, str] = {}

    def on_chain_end(self, outputs: Any, *, run_id: UUID, **kwargs: Any) -> None:
        if isinstance(outputs, dict) and isinstance(outputs.get("samples"), list):
            for s in outputs["samples"]:
                if isinstance(s, dict) and "text" in s:
                    self.texts[s["index"]] = s["text"]


def test_agent_graph_never_streams_a_rejected_sample(engine: Any, stream_graph: Any) -> None:
    from langchain_capeval import ChatCapEval

    example = load_example("agent_graph")
    agent = example.build_agent(ChatCapEval(engine=engine, max_new_tokens=16, seed=11))
    handler = SampleTexts()
    streamed, progress, final = stream_graph(
        agent, {"messages": [HumanMessage("What is 7 + 5?")]}, config={"callbacks": [handler]}
    )
    answer = final["messages"][-1]
    assert streamed == answer.content
    accepted = answer.response_metadata["accepted_sample"]
    assert sorted(handler.texts) == [0, 1, 2] and handler.texts[accepted] == answer.content
    rejected = [t for i, t in handler.texts.items() if i != accepted and t.strip() and t not in answer.content]
    assert rejected, "the seed should give samples that differ from the accepted one"
    assert all(t not in streamed for t in rejected)
    assert [p["event"] for p in progress] == ["sampling", "scored", "scored", "scored", "accepted"]
