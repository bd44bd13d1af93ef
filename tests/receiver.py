"""A loopback HTTP server that keeps what is POSTed to it: a chat webhook's or an OTLP collector's stand-in."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Receiver:
    """Answers each POST with the next of *statuses* (the last one repeating) and keeps its path and body."""

    url: str = ""
    statuses: list[int] = field(default_factory=lambda: [200])
    posts: list[tuple[str, bytes]] = field(default_factory=list)
    answer: threading.Event | None = None  # if given, each POST is answered only once it is set (a hung hook)

    def bodies(self, path: str | None = None) -> list[bytes]:
        return [body for at, body in self.posts if path is None or at == path]


@contextmanager
def receiver(*statuses: int, answer: threading.Event | None = None) -> Iterator[Receiver]:
    kept = Receiver(statuses=list(statuses or (200,)), answer=answer)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            kept.posts.append((self.path, body))
            if kept.answer is not None:
                kept.answer.wait()
            status = kept.statuses.pop(0) if len(kept.statuses) > 1 else kept.statuses[0]
            self.send_response(status)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (http.server's name)
            pass  # quiet: the test reads what was posted

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    kept.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield kept
    finally:
        if answer is not None:
            answer.set()  # a held POST lets the server stop
        server.shutdown()
        server.server_close()
