"""ChatCapEval as a node of your own LangGraph graph, streaming its progress and the accepted answer's tokens.

The graph is yours: `classify` decides how much compute a question deserves (arithmetic:
best of 3 samples; anything else: adaptive sampling, at most 2 samples), and `answer` calls
ChatCapEval with that budget. Streaming the graph with `stream_mode=["custom", "messages"]`
gives ChatCapEval's progress events (each sample scored, resampling, accepted, and why) on
"custom", and on "messages" the tokens of the accepted answer only: samples that were
not accepted are never streamed.

Run:
    python examples/agent_graph.py
    python examples/agent_graph.py "What is 17 + 25?"
    python examples/agent_graph.py --max-new-tokens 32 "Tell me a fun fact about owls."
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from typing import Annotated, Any, Literal, TypedDict

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, AnyMessage, HumanMessage, SystemMessage
from langgraph.graph import END, START, StateGraph
from langgraph.graph.message import add_messages
from langgraph.graph.state import CompiledStateGraph

from langchain_capeval import ChatCapEval

Kind = Literal["arithmetic", "general"]

COMPUTE: dict[Kind, dict[str, Any]] = {
    "arithmetic": {"strategy": "best_of_n", "num_samples": 3},  # worth several tries: keep the best-scored
    "general": {"strategy": "adaptive", "max_samples": 2},  # resample once at most, if the first looks weak
}
"""ChatCapEval's per-call policy for each kind of question."""

SYSTEM = {
    "arithmetic": "You are a careful calculator. Give the result in one short sentence.",
    "general": "You are a helpful assistant. Answer in one or two short sentences.",
}


class State(TypedDict, total=False):
    messages: Annotated[list[AnyMessage], add_messages]
    kind: Kind


def classify_question(text: str) -> Kind:
    """Arithmetic if the question holds a number, an operator and a number."""
    return "arithmetic" if re.search(r"\d\s*[-+*/x×]\s*\d", text) else "general"


def build_agent(llm: BaseChatModel) -> CompiledStateGraph[Any, Any, Any, Any]:
    """START -> classify -> answer -> END, with ``llm`` (a ChatCapEval) answering."""

    def classify(state: State) -> State:
        return {"kind": classify_question(str(state["messages"][-1].content))}

    def answer(state: State) -> State:
        kind = state["kind"]
        reply = llm.invoke([SystemMessage(SYSTEM[kind]), *state["messages"]], **COMPUTE[kind])
        return {"messages": [reply]}

    graph = StateGraph(State)
    graph.add_node("classify", classify)
    graph.add_node("answer", answer)
    graph.add_edge(START, "classify")
    graph.add_edge("classify", "answer")
    graph.add_edge("answer", END)
    return graph.compile()


def describe(event: dict[str, Any]) -> str:
    """One line for a ChatCapEval progress event."""
    kind = event["event"]
    if kind in ("sampling", "resampling"):
        temps = ", ".join(f"{t:.2f}" for t in event["temperatures"])
        return f"{kind} {event['samples']} at temperature {temps} (at most {event['max_new_tokens']} tokens each)"
    if kind == "scored":
        return f"sample {event['sample']} scored P(win or tie) {event['p_win_or_tie']:.3f} ({event['tokens']} tokens)"
    if kind == "pruned":
        return f"pruned {event['pruned']} of {event['of']} at {event['at_tokens']} tokens"
    if kind == "accepted":
        return f"accepted sample {event['sample']} of {event['samples']}: {event['reason']}"
    return f"{kind} {event}"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("question", nargs="?", default="What is 7 + 5?")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="most tokens of one sample")
    args = parser.parse_args(argv)

    agent = build_agent(ChatCapEval(max_new_tokens=args.max_new_tokens))
    print(f"question  {args.question}")
    answering, final = False, None
    for mode, chunk in agent.stream(
        {"messages": [HumanMessage(args.question)]}, stream_mode=["updates", "custom", "messages"]
    ):
        if mode == "custom":  # ChatCapEval's progress events
            print(f"progress  {describe(chunk)}")
        elif mode == "messages":  # tokens of the accepted answer, as they stream
            token, _meta = chunk
            if not answering:
                print("answer    ", end="")
                answering = True
            print(token.content, end="", flush=True)
        elif "classify" in chunk:
            print(f"route     {chunk['classify']['kind']}: {COMPUTE[chunk['classify']['kind']]}")
        elif "answer" in chunk:
            final = chunk["answer"]["messages"][-1]
    print()
    if isinstance(final, AIMessage):
        meta, usage = final.response_metadata, final.usage_metadata or {}
        print(
            f"compute   {meta['samples_used']} samples, {usage.get('output_tokens', 0)} generated tokens, "
            f"accepted sample {meta['accepted_sample']}; stopped: {meta['stop_reason']}"
        )


if __name__ == "__main__":
    main()
