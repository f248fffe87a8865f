"""``capeval serve``: the OpenAI-compatible server over a local model, from the command line.

Example:
    $ capeval serve --port 8000 --max-samples 4
    $ curl http://127.0.0.1:8000/v1/models

"""

from __future__ import annotations

import argparse
import sys
from typing import Any


def add_serve_command(subparsers: Any) -> None:
    """Register ``capeval serve`` on the ``capeval`` command's subparsers (imports nothing heavy)."""
    from langchain_capeval.cli import _policy_args  # one flag per policy field, shared with `capeval chat`

    serve = subparsers.add_parser(
        "serve",
        help="serve ChatCapEval over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions)",
    )
    serve.add_argument("--model", default=None, help="local model folder or .gguf (default: embedded SmolLM2)")
    serve.add_argument("--adapter", default="default", help="self-evaluation adapter: folder or shipped name")
    serve.add_argument("--no-adapter", action="store_true", help="run the base model without an adapter")
    serve.add_argument("--device", default="cpu", help="torch device of the transformers engine")
    serve.add_argument("--host", default="127.0.0.1", help="interface to bind (0.0.0.0 to accept remote clients)")
    serve.add_argument("--port", type=int, default=8000, help="port to bind")
    serve.add_argument("--served-model-name", default=None, help="the model name clients send (default: the model's)")
    serve.add_argument("--max-body-bytes", type=int, default=None, help="largest request body accepted (HTTP 413)")
    serve.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    _policy_args(serve)
    serve.set_defaults(func=cmd_serve)


def cmd_serve(ns: argparse.Namespace) -> int:
    """Load the model, build the app and serve it until interrupted."""
    from langchain_capeval.server import require_serve_extra

    require_serve_extra()
    import uvicorn

    from langchain_capeval.adapters import policy_for_adapter
    from langchain_capeval.cli import _policy_from
    from langchain_capeval.engines.transformers import TransformersEngine, TransformersEngineConfig
    from langchain_capeval.server.app import ServerConfig, create_app

    adapter = None if ns.no_adapter else ns.adapter
    policy = policy_for_adapter(ns.model, adapter, _policy_from(ns))  # flags over the adapter's measured fields
    engine = TransformersEngine.from_config(TransformersEngineConfig(model=ns.model, adapter=adapter, device=ns.device))
    settings: dict[str, Any] = {"served_model_name": ns.served_model_name}
    if ns.max_body_bytes is not None:
        settings["max_body_bytes"] = ns.max_body_bytes
    app = create_app(engine, policy, ServerConfig(**settings))
    name = ns.served_model_name or engine.model_name
    print(f"capeval serve: {name} on http://{ns.host}:{ns.port}/v1", file=sys.stderr, flush=True)
    uvicorn.run(app, host=ns.host, port=ns.port, log_level=ns.log_level)
    return 0
