"""ChatCapEval as a LangChain chat model, on the embedded model."""

from __future__ import annotations

import asyncio
import operator
from typing import Annotated, Any, TypedDict

import pytest
from langchain_core.messages import AIMessage, AIMessageChunk, HumanMessage, SystemMessage, ToolMessage
from pydantic import ValidationError

from langchain_capeval.chat_models import PROGRESS_EVENT, ChatCapEval
from langchain_capeval.errors import InvalidMessagesError, UnsupportedFeatureError


@pytest.fixture
def llm(engine: Any) -> ChatCapEval:
    return ChatCapEval(engine=engine, max_new_tokens=24, max_samples=4, seed=5)


def test_invoke_reports_the_accepted_sample_and_all_the_compute(llm: ChatCapEval) -> None:
    msg = llm.invoke("What is the capital of France?", accept_threshold=1.0, max_samples=3)
    meta = msg.response_metadata
    assert isinstance(msg, AIMessage) and msg.content
    assert meta["model_name"] == "SmolLM2-135M-Instruct"
    assert meta["samples_used"] == 3 and meta["stop_reason"] == "max_samples"
    samples = meta["samples"]
    accepted = next(s for s in samples if s["index"] == meta["accepted_sample"])
    assert accepted["p_win_or_tie"] == max(s["p_win_or_tie"] for s in samples)
    compute = meta["compute"]
    usage = msg.usage_metadata
    assert usage is not None
    assert usage["output_tokens"] == sum(s["tokens"] for s in samples) == compute["generated_tokens"]
    assert usage["input_tokens"] == compute["prompt_tokens"] + compute["self_eval_tokens"]
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    assert usage["output_token_details"]["reasoning"] == usage["output_tokens"] - accepted["tokens"]
    assert [e["event"] for e in meta["trace"]][-1] == "accepted"
    assert [s["temperature"] for s in samples] == pytest.approx([0.4, 0.5, 0.6])


def test_stream_yields_only_the_accepted_answer(llm: ChatCapEval) -> None:
    chunks = list(llm.stream("Name a color.", strategy="best_of_n", num_samples=3))
    assert all(isinstance(c, AIMessageChunk) for c in chunks)
    full = chunks[0]
    for c in chunks[1:]:
        full = full + c
    meta = full.response_metadata
    text = "".join(str(c.content) for c in chunks)
    assert len([c for c in chunks if c.content]) > 1, "tokens are streamed one by one"
    assert meta["samples_used"] == 3
    same = llm.invoke("Name a color.", strategy="best_of_n", num_samples=3)
    assert text == same.content  # the same seed gives the same accepted answer; nothing else was streamed
    assert full.usage_metadata == same.usage_metadata


def test_async_invoke_stream_and_batch(llm: ChatCapEval) -> None:
    async def go() -> tuple[Any, str, list[Any]]:
        one = await llm.ainvoke("Say hello.", max_samples=1)
        streamed = "".join([str(c.content) async for c in llm.astream("Say hello.", max_samples=1)])
        many = await llm.abatch(["Say hello.", "Say bye."], max_samples=1)
        return one, streamed, many

    one, streamed, many = asyncio.run(go())
    assert one.content == streamed == many[0].content
    assert many[1].content and many[1].response_metadata["samples_used"] == 1
    sync_many = llm.batch(["Say hello.", "Say bye."], max_samples=1)
    assert [m.content for m in sync_many] == [m.content for m in many]


def test_per_call_overrides_bind_and_configurable(llm: ChatCapEval) -> None:
    bound = llm.bind(accept_threshold=1.0, max_samples=2)
    assert bound.invoke("Hi").response_metadata["samples_used"] == 2
    configured = llm.with_config(configurable={"accept_threshold": 1.0, "max_samples": 3})
    assert configured.invoke("Hi").response_metadata["samples_used"] == 3
    assert llm.policy.max_samples == 4, "per-call overrides never change the model's own policy"
    with pytest.raises(ValidationError, match="max_samples"):
        llm.invoke("Hi", max_samples=0)


def test_stop_sequences_cut_the_answer(llm: ChatCapEval) -> None:
    free = llm.invoke("List three fruits, one per line.", max_samples=1, max_new_tokens=40)
    assert "\n" in str(free.content)
    cut = llm.invoke("List three fruits, one per line.", max_samples=1, max_new_tokens=40, stop=["\n"])
    assert "\n" not in str(cut.content)
    assert str(free.content).startswith(str(cut.content))
    assert cut.response_metadata["finish_reason"] == "stop"


def test_progress_events_reach_langchain_callbacks(llm: ChatCapEval) -> None:
    from langchain_core.callbacks import BaseCallbackHandler
    from langchain_core.output_parsers import StrOutputParser
    from langchain_core.prompts import ChatPromptTemplate

    expected = ["sampling", "scored", "resampling", "scored", "accepted"]

    class Collect(BaseCallbackHandler):
        def __init__(self) -> None:
            self.events: list[dict[str, Any]] = []

        def on_custom_event(self, name: str, data: Any, **kwargs: Any) -> None:
            if name == PROGRESS_EVENT:
                self.events.append(data)

    handler = Collect()
    llm.invoke("Hi", config={"callbacks": [handler]}, max_samples=2, accept_threshold=1.0)
    assert [e["event"] for e in handler.events] == expected

    chain = ChatPromptTemplate.from_messages([("human", "{q}")]) | llm.bind(max_samples=2, accept_threshold=1.0)
    chain = chain | StrOutputParser()

    async def go() -> list[dict[str, Any]]:
        events = [e async for e in chain.astream_events({"q": "Hi"}, version="v2")]
        return [e["data"] for e in events if e["event"] == "on_custom_event" and e["name"] == PROGRESS_EVENT]

    assert [e["event"] for e in asyncio.run(go())] == expected


def test_inside_an_outer_graph_only_the_accepted_answer_streams(llm: ChatCapEval, stream_graph: Any) -> None:
    from langgraph.graph import END, START, StateGraph

    class State(TypedDict):
        messages: Annotated[list[Any], operator.add]

    def answer(state: State) -> State:
        return {"messages": [llm.invoke(state["messages"], strategy="best_of_n", num_samples=3)]}

    g = StateGraph(State)
    g.add_node("answer", answer)
    g.add_edge(START, "answer")
    g.add_edge("answer", END)
    app = g.compile()
    streamed, progress, final = stream_graph(app, {"messages": [HumanMessage("Name an animal.")]})
    answer_msg = final["messages"][-1]
    assert streamed == answer_msg.content
    others = [
        s
        for s in answer_msg.response_metadata["samples"]
        if s["index"] != answer_msg.response_metadata["accepted_sample"]
    ]
    assert len(others) == 2
    assert [p["event"] for p in progress].count("scored") == 3
    assert progress[-1]["event"] == "accepted"


def test_conversation_with_system_message(llm: ChatCapEval) -> None:
    msg = llm.invoke(
        [
            SystemMessage("You answer in one word."),
            HumanMessage("Hi"),
            AIMessage("Hello"),
            HumanMessage("Capital of Italy?"),
        ],
        max_samples=1,
    )
    assert msg.content


def test_tool_calling_is_refused_clearly(llm: ChatCapEval) -> None:
    with pytest.raises(UnsupportedFeatureError, match="tool calling"):
        llm.bind_tools([])


@pytest.mark.parametrize(
    ("messages", "match"),
    [
        ([], "empty"),
        ([HumanMessage("hi"), ToolMessage("x", tool_call_id="1")], "tool"),
        ([HumanMessage("hi"), AIMessage("hello")], "last message must be from the user"),
        ([HumanMessage([{"type": "image_url", "image_url": {"url": "x"}}])], "only text"),
    ],
)
def test_bad_messages_fail_with_a_typed_error(llm: ChatCapEval, messages: list[Any], match: str) -> None:
    with pytest.raises(InvalidMessagesError, match=match):
        llm.invoke(messages)
    assert llm.get_engine().live_rows == 0  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_samples": -1}, "max_samples"),
        ({"accept_threshold": 1.2}, "accept_threshold"),
        ({"batch_schedule": []}, "batch_schedule"),
        ({"max_tokens": 0}, "max_new_tokens"),
        ({"deadline_s": 0}, "deadline_s"),
    ],
)
def test_invalid_config_fails_at_construction(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as err:
        ChatCapEval(**kwargs)
    assert field in str(err.value)


def test_langchain_standard_names(engine: Any) -> None:
    llm = ChatCapEval(engine=engine, temperature=0.3, max_tokens=50)
    assert llm.temperature == 0.3 and llm.policy.max_new_tokens == 50
    params = llm._get_ls_params()
    assert params["ls_model_name"] == "SmolLM2-135M-Instruct" and params["ls_max_tokens"] == 50
