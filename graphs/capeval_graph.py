"""LangGraph Studio entry point: the adaptive-compute graph on a local model.

Run it with ``cd graphs && langgraph dev`` (see ``langgraph.json``). The model is the
embedded default unless ``CAPEVAL_MODEL`` names a local model folder;
``CAPEVAL_ADAPTER`` names a self-evaluation adapter (``none`` for the base model).
The policy fields of ``CapEvalConfig`` are the graph's context: set them per run in
Studio's context panel or in the run request's ``context``; unset ones take the adapter's
measured fields (``capeval_adapter.json``), then the defaults.
"""

from __future__ import annotations

import os

from langchain_capeval.adapters import policy_for_adapter
from langchain_capeval.chat_models import shared_engine
from langchain_capeval.graph import build_graph

_model = os.environ.get("CAPEVAL_MODEL") or None
_adapter = os.environ.get("CAPEVAL_ADAPTER", "default")
_adapter = None if _adapter == "none" else _adapter

graph = build_graph(shared_engine(_model, _adapter, "cpu"), policy_for_adapter(_model, _adapter, {}))
