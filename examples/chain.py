"""ChatCapEval in an LCEL chain: prompt | model | parser, with invoke, batch, stream and a per-call budget.

ChatCapEval() is a drop-in chat model (the embedded SmolLM2-135M-Instruct), so the usual
`ChatPromptTemplate | ChatCapEval() | StrOutputParser()` chain works as with any other model:
invoke, batch and stream, where streaming yields the accepted answer's tokens only. A
per-call budget (samples, tokens, deadline) is bound with `.bind(...)`; the same fields
can be passed through `config={"configurable": {...}}` to a whole chain.

Run:
    python examples/chain.py
    python examples/chain.py --max-new-tokens 32   # shorter answers, faster
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate

from langchain_capeval import ChatCapEval

PROMPT = ChatPromptTemplate.from_messages(
    [
        ("system", "You are a helpful assistant. Answer in one short sentence."),
        ("human", "{question}"),
    ]
)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-new-tokens", type=int, default=64, help="most tokens of one sample")
    args = parser.parse_args(argv)

    llm = ChatCapEval(max_new_tokens=args.max_new_tokens)
    chain = PROMPT | llm | StrOutputParser()

    print("== invoke")
    print(chain.invoke({"question": "What is the capital of France?"}))

    print("== batch")
    questions = ["What color is the sky on a clear day?", "How many legs does a spider have?"]
    for question, answer in zip(questions, chain.batch([{"question": q} for q in questions]), strict=True):
        print(f"{question} -> {answer}")

    print("== stream")
    chunks = 0
    for token in chain.stream({"question": "Name three fruits."}):
        print(token, end="", flush=True)
        chunks += 1
    print(f"\n({chunks} chunks)")

    print("== per-call budget")
    # A picky accept threshold makes ChatCapEval resample; the budget caps what that costs.
    budget = {"max_samples": 3, "max_total_tokens": 200, "deadline_s": 30.0}
    budgeted = PROMPT | llm.bind(accept_threshold=0.95, **budget)
    msg = budgeted.invoke({"question": "Write a haiku about the sea."})
    meta, compute = msg.response_metadata, msg.response_metadata["compute"]
    tokens = int(compute["generated_tokens"] + compute["self_eval_tokens"])
    print(msg.content)
    print(
        f"budget: {budget}\n"
        f"spent: {meta['samples_used']} samples, {tokens} tokens, {compute['wall_time_s']:.1f}s; "
        f"stopped: {meta['stop_reason']}"
    )


if __name__ == "__main__":
    main()
