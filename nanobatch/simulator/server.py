"""Serve the simulator over real sockets with uvicorn: in a thread (tests) or blocking (CLI)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import uvicorn
from starlette.applications import Starlette
from uvicorn.protocols.http.h11_impl import H11Protocol

from .app import create_app
from .config import SimulatorConfig

__all__ = ["run_in_thread", "serve"]

logger = logging.getLogger("nanobatch.simulator")

_START_TIMEOUT_S = 10.0


class _Connections:
    """Open transports by client address, so the app can abort one ("drop" faults)."""

    def __init__(self) -> None:
        self._transports: dict[tuple[str, int], asyncio.Transport] = {}

    def protocol(self) -> type[H11Protocol]:
        """An h11 protocol class that registers its connections here."""
        registry = self._transports

        class TrackingProtocol(H11Protocol):
            def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
                super().connection_made(transport)
                if (peer := _address(transport)) is not None:
                    registry[peer] = transport

            def connection_lost(self, exc: Exception | None) -> None:
                if (peer := _address(self.transport)) is not None:
                    registry.pop(peer, None)
                super().connection_lost(exc)

        return TrackingProtocol

    def abort(self, client: tuple[str, int] | None) -> bool:
        """Drop *client*'s connection without a response; False if it is unknown."""
        transport = self._transports.get((client[0], client[1])) if client else None
        if transport is None:
            return False
        transport.abort()
        return True


def _address(transport: asyncio.BaseTransport | None) -> tuple[str, int] | None:
    peer: Any = transport.get_extra_info("peername") if transport is not None else None
    if isinstance(peer, (tuple, list)) and len(peer) >= 2:
        return str(peer[0]), int(peer[1])
    return None


class _Server(uvicorn.Server):
    """uvicorn.Server that reports its base URL once it is listening."""

    def __init__(self, config: uvicorn.Config, on_ready: Callable[[str], None] | None) -> None:
        super().__init__(config)
        self._on_ready = on_ready
        self.base_url = ""

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if not self.started:
            return
        host, port = self.servers[0].sockets[0].getsockname()[:2]
        self.base_url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
        if self._on_ready is not None:
            self._on_ready(self.base_url)


def _server(
    app: Starlette, host: str, port: int, *, verbose: bool, quiet_logging: bool, on_ready: Callable[[str], None] | None
) -> _Server:
    connections = _Connections()
    app.state.abort_connection = connections.abort
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        http=connections.protocol(),
        ws="none",
        lifespan="off",
        loop="asyncio",
        log_level="info" if verbose else "warning",
        access_log=verbose,
        # In a library call leave the process's logging setup alone.
        log_config=None if quiet_logging else uvicorn.config.LOGGING_CONFIG,
        timeout_graceful_shutdown=2,
    )
    return _Server(config, on_ready)


def _run_quietly(server: _Server) -> None:
    # uvicorn calls sys.exit() when it cannot bind; the caller learns of it from server.started.
    with contextlib.suppress(SystemExit):
        server.run()


@contextlib.contextmanager
def run_in_thread(
    config: SimulatorConfig | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    app: Starlette | None = None,
) -> Iterator[str]:
    """Serve the simulator from a background thread; yield its base URL.

    The server has its own event loop, so image work never blocks the
    caller's. Pass *app* (from create_app) to read its ``state.stats``.

    >>> with run_in_thread(SimulatorConfig(), port=0) as base_url:  # doctest: +SKIP
    ...     httpx.post(f"{base_url}/v1beta/models/gemini-nano-banana-2.1:generateContent", json=...)
    """
    ready = threading.Event()
    server = _server(
        app if app is not None else create_app(config),
        host, port, verbose=False, quiet_logging=True, on_ready=lambda _: ready.set(),
    )  # fmt: skip
    thread = threading.Thread(target=_run_quietly, args=(server,), name="nanobatch-simulator", daemon=True)
    thread.start()
    deadline = time.monotonic() + _START_TIMEOUT_S
    while not ready.wait(0.01):
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            thread.join(_START_TIMEOUT_S)
            raise OSError(f"the simulator could not listen on {host}:{port} (see the uvicorn.error log)")
    try:
        yield server.base_url
    finally:
        server.should_exit = True
        thread.join(_START_TIMEOUT_S)


def serve(
    config: SimulatorConfig | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    verbose: bool = False,
    on_ready: Callable[[str], None] | None = None,
) -> None:
    """Serve the simulator until Ctrl-C. *on_ready* gets the base URL once listening."""
    server = _server(create_app(config), host, port, verbose=verbose, quiet_logging=False, on_ready=on_ready)
    # uvicorn exits (SystemExit) when it cannot bind; Ctrl-C ends a normal run.
    with contextlib.suppress(KeyboardInterrupt, SystemExit):
        server.run()
    if not server.started:
        raise OSError(f"the simulator could not listen on {host}:{port}")
