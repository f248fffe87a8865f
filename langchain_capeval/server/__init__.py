"""``capeval serve``: ChatCapEval and plain sampling behind an OpenAI-compatible HTTP API.

Needs the ``serve`` extra (FastAPI, uvicorn): ``pip install 'langchain-capeval[serve]'``.
See ``docs/serving.md``.

Example:
    >>> from langchain_capeval.server import BackgroundServer, create_app  # doctest: +SKIP
    >>> with BackgroundServer(create_app(engine)) as srv:  # doctest: +SKIP
    ...     print(srv.url)

"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from langchain_capeval.errors import MissingExtraError

if TYPE_CHECKING:
    from langchain_capeval.server.app import CapEvalServer, ServerConfig, create_app
    from langchain_capeval.server.background import BackgroundServer

SERVE_EXTRA = "pip install 'langchain-capeval[serve]'"
"""The command that installs the server's dependencies."""

_LAZY = {
    "create_app": "langchain_capeval.server.app",
    "CapEvalServer": "langchain_capeval.server.app",
    "ServerConfig": "langchain_capeval.server.app",
    "BackgroundServer": "langchain_capeval.server.background",
}
_SERVE_PACKAGES = ("fastapi", "starlette", "uvicorn", "anyio")


def require_serve_extra() -> None:
    """Raise :class:`MissingExtraError` naming the install command if the server's dependencies are missing."""
    for package in _SERVE_PACKAGES:
        try:
            import_module(package)
        except ImportError as e:
            raise MissingExtraError(f"capeval serve needs {package}; install the serve extra: {SERVE_EXTRA}") from e


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    require_serve_extra()
    return getattr(import_module(_LAZY[name]), name)


__all__ = ["SERVE_EXTRA", "BackgroundServer", "CapEvalServer", "ServerConfig", "create_app", "require_serve_extra"]
