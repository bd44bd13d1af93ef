"""Real storage APIs on loopback for tests: S3 (moto's server), Cloud Storage (gcp-storage-emulator) and Azure
Blob Storage (Azurite, from npm: ``make test`` and ``.ci/run`` install it into ``.azurite/``).

Each server runs in a thread of the test process on a free port and counts the requests it answers,
so a test can prove what was (not) downloaded. The fixtures in ``tests/conftest.py`` (``s3_env``, ``gcs_env``,
``az_env``, ``bucket``) use these.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest


@dataclass
class RequestLog:
    """Requests a server answered, as "METHOD /path?query", and how many of each."""

    counts: Counter[str] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, method: str, path: str) -> None:
        with self.lock:
            self.counts[f"{method} {path}"] += 1

    def method(self, method: str) -> int:
        with self.lock:
            return sum(n for key, n in self.counts.items() if key.startswith(method + " "))

    def clear(self) -> None:
        with self.lock:
            self.counts.clear()


def _counting(app: Callable[..., Iterable[bytes]], log: RequestLog) -> Callable[..., Iterable[bytes]]:
    def wrapped(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        query = environ.get("QUERY_STRING", "")
        log.add(environ["REQUEST_METHOD"], environ.get("PATH_INFO", "") + (f"?{query}" if query else ""))
        return app(environ, start_response)

    return wrapped


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Emulator:
    url: str
    log: RequestLog


def moto_s3() -> Iterator[Emulator]:
    """moto's S3 server (the WSGI app ``moto_server`` runs) behind a request counter."""
    pytest.importorskip("s3fs")
    server_mod = pytest.importorskip("moto.server")
    from werkzeug.serving import make_server

    log = RequestLog()
    app = server_mod.DomainDispatcherApplication(server_mod.create_backend_app)
    server = make_server("127.0.0.1", 0, _counting(app, log), threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield Emulator(f"http://127.0.0.1:{server.server_port}", log)
    finally:
        server.shutdown()
        thread.join()


def gcs_emulator() -> Iterator[Emulator]:
    """gcp-storage-emulator, in memory, its request handler counting what it answers."""
    # gcsfs reads this once, when imported: with it on, gcsfs 2026 probes each bucket's layout over gRPC,
    # which an emulator never answers (3 x 60 s).
    os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"
    pytest.importorskip("gcsfs")
    server_mod = pytest.importorskip("gcp_storage_emulator.server")
    import fsspec

    if "extended" in fsspec.get_filesystem_class("gcs").__module__:
        pytest.fail("gcsfs was imported before GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false was set: it would wait 3 x 60 s")
    log = RequestLog()

    class Counted(server_mod.RequestHandler):  # type: ignore[misc, name-defined]
        def parse_request(self) -> bool:
            ok: bool = super().parse_request()
            if ok:
                log.add(self.command, self.path)
            return ok

    port = free_port()
    server = server_mod.create_server("127.0.0.1", port, in_memory=True)
    original, server_mod.RequestHandler = server_mod.RequestHandler, Counted
    try:
        server.start()  # the server thread builds its handler from the module's name
    finally:
        server_mod.RequestHandler = original
    try:
        yield Emulator(f"http://127.0.0.1:{port}", log)
    finally:
        server.stop()


# Azurite's well-known development account (public, in Microsoft's docs): not a secret, but no message shows it.
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
AZURITE_ACCOUNT = "devstoreaccount1"


def _azurite_command() -> str | None:
    here = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".azurite")
    local = os.path.join(here, "node_modules", ".bin", "azurite-blob")
    return local if os.path.exists(local) else shutil.which("azurite-blob")


class AzuriteLog(RequestLog):
    """Azurite's own record of the requests it answered (its debug log), read as "METHOD /path?query".

    Azurite writes a line a moment after it answers. Before each reading, a marker request (left out of the
    counts) is sent and the log read until it shows: every request answered before it is in the counts."""

    _LINE = re.compile(r"RequestMethod=(\w+) RequestURL=http://[^/\s]*(/\S*)")
    _MARK = "/nanobatch-log-mark-"

    def __init__(self, path: str, url: str) -> None:
        super().__init__()
        self.path = path
        self.url = url
        self.offset = 0
        self.marks = 0

    @property  # type: ignore[override]
    def counts(self) -> Counter[str]:
        self._read()
        return self._counts

    @counts.setter
    def counts(self, value: Counter[str]) -> None:
        self._counts = value

    def _read(self) -> None:
        import httpx2

        self.marks += 1
        mark = f"{self._MARK}{self.marks}"
        httpx2.get(f"{self.url}{mark}", timeout=10)  # 400 or 404: any answer is logged
        for _ in range(500):
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
            end = data.rfind(b"\n") + 1
            self.offset += end
            seen = False
            for match in self._LINE.finditer(data[:end].decode("utf-8", "replace")):
                if self._MARK in match[2]:
                    seen = seen or match[2].endswith(mark)
                    continue
                self._counts[f"{match[1]} {match[2]}"] += 1
            if seen:
                return
            time.sleep(0.01)
        raise AssertionError(f"Azurite's log never showed the marker request {mark}")

    def clear(self) -> None:
        self._read()
        self._counts.clear()


def azurite() -> Iterator[Emulator]:
    """Azurite's blob service, in memory, on a free port; its debug log counts what it answers."""
    pytest.importorskip("adlfs")
    command = _azurite_command()
    if command is None:
        pytest.skip("Azurite is not installed (make test installs it with npm into .azurite/)")
    import tempfile

    import httpx2

    port = free_port()
    log_folder = tempfile.mkdtemp(prefix="azurite-")
    log_path = os.path.join(log_folder, "debug.log")
    process = subprocess.Popen(
        [command, "--blobHost", "127.0.0.1", "--blobPort", str(port), "--inMemoryPersistence", "--silent",
         "--skipApiVersionCheck", "--loose", "--debug", log_path],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):  # it starts in well under a second
        try:
            httpx2.get(url, timeout=1)
            break
        except httpx2.TransportError:
            time.sleep(0.1)
    try:
        yield Emulator(f"{url}/{AZURITE_ACCOUNT}", AzuriteLog(log_path, url))
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        shutil.rmtree(log_folder, ignore_errors=True)


SECRET = "wJalrXUtnFEMI-not-a-real-secret-K7MDENG"  # the S3 emulator's secret key: no message may show it


@dataclass
class Bucket:
    scheme: str
    name: str
    server: Emulator

    def url(self, key: str = "") -> str:
        return f"{self.scheme}://{self.name}/{key}"

    def downloads(self) -> int:
        """Requests that fetched an object's bytes (not its metadata, not a listing)."""
        counts = self.server.log.counts
        if self.scheme == "s3":
            return sum(n for k, n in counts.items() if k.startswith(f"GET /{self.name}/") and "list-type" not in k)
        if self.scheme == "az":
            return sum(n for k, n in counts.items() if k.startswith(f"GET /{AZURITE_ACCOUNT}/{self.name}/")
                       and "comp=" not in k and "restype=" not in k)  # fmt: skip
        return sum(n for k, n in counts.items() if k.startswith("GET ") and ("alt=media" in k or "/download/" in k))


def new_bucket(scheme: str) -> str:
    """A new, empty bucket's name at the emulator *scheme*'s environment points to."""
    from nanobatch.api import storage

    name = f"nb-{uuid.uuid4().hex[:12]}"
    storage._filesystem(f"{scheme}://{name}").mkdir(name)
    return name
