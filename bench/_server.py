"""The simulator in a process of its own, with arrival times and CPU readable over HTTP.

Run by :class:`SimulatorProcess`; prints its base URL on the first line and serves
until its stdin closes. Besides the simulator's routes it answers
``GET /_bench/stamps`` (the wall-clock arrival time of every request since the
last call, then forgets them) and ``GET /_bench/cpu`` (this process's CPU seconds).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx2

__all__ = ["SimulatorProcess"]

_HERE = Path(__file__).resolve().parent


class SimulatorProcess:
    """``with SimulatorProcess(latency_s=0.2, canned=path) as sim: sim.url``"""

    def __init__(self, **config: Any) -> None:
        self.config = config
        self.url = ""
        self._process: subprocess.Popen[str] | None = None

    def __enter__(self) -> SimulatorProcess:
        self._process = subprocess.Popen(
            [sys.executable, str(_HERE / "_server.py"), json.dumps(self.config)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self._process.stdout is not None
        line = self._process.stdout.readline().strip()
        if not line.startswith("http://"):
            self.__exit__(None, None, None)
            raise RuntimeError(f"the simulator did not start: {line!r}")
        self.url = line
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._process is None:
            return
        assert self._process.stdin is not None
        self._process.stdin.close()
        try:
            self._process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._process = None

    def stamps(self) -> list[float]:
        """Arrival times (time.time()) of the requests since the last call."""
        return list(httpx2.get(f"{self.url}/_bench/stamps", timeout=30).json())

    def cpu_s(self) -> float:
        return float(httpx2.get(f"{self.url}/_bench/cpu", timeout=30).json())


class _BenchRoutes:
    """ASGI middleware: notes each request's arrival; serves the two /_bench routes."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.stamps: list[float] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        if path == "/_bench/stamps":
            stamps, self.stamps = self.stamps, []
            await _json(send, stamps)
        elif path == "/_bench/cpu":
            times = os.times()
            await _json(send, times.user + times.system)
        else:
            self.stamps.append(time.time())
            await self.app(scope, receive, send)


async def _json(send: Any, value: Any) -> None:
    body = json.dumps(value).encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})


def main() -> None:
    from nanobatch.simulator import SimulatorConfig, create_app, run_in_thread

    app = create_app(SimulatorConfig(**json.loads(sys.argv[1])))
    app.add_middleware(_BenchRoutes)
    # The server runs in a thread of this otherwise idle process: it has the process's GIL to itself.
    with run_in_thread(app=app) as url:
        sys.stdout.write(url + "\n")
        sys.stdout.flush()
        sys.stdin.read()  # until the benchmark closes our stdin


if __name__ == "__main__":
    main()
