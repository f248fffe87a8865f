"""Serve an app with uvicorn in a background thread, on a port chosen by the OS (tests, notebooks).

Example:
    >>> with BackgroundServer(create_app(engine)) as srv:  # doctest: +SKIP
    ...     OpenAI(base_url=f"{srv.url}/v1", api_key="x").models.list()

"""

from __future__ import annotations

import socket
import threading
import time
from types import TracebackType
from typing import Any

import uvicorn


class BackgroundServer:
    """A uvicorn server in a daemon thread; a context manager that starts and stops it.

    Args:
        app: The ASGI app.
        host: Interface to bind (loopback by default).
        port: Port to bind; 0 lets the OS pick a free one (see :attr:`port`).
        log_level: uvicorn's log level.

    """

    def __init__(self, app: Any, *, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning") -> None:
        self.app = app
        self.host = host
        self.port = port
        self._config = uvicorn.Config(
            app, host=host, port=port, log_level=log_level, lifespan="off", timeout_graceful_shutdown=2
        )
        self._server = uvicorn.Server(self._config)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """Base URL, without ``/v1``."""
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> None:
        """Bind, start serving in a thread, and wait until the server accepts connections."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = int(sock.getsockname()[1])
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start on {self.url} within {timeout:.0f}s")
            time.sleep(0.02)

    def stop(self, timeout: float = 10.0) -> None:
        """Ask the server to exit and wait for its thread."""
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)

    def __enter__(self) -> BackgroundServer:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
