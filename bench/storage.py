"""What a re-run's object checks cost against S3: ``python bench/storage.py [--objects 10000]``.

Starts moto's S3 server in this process on a loopback port, counting the requests it answers, puts N small
objects under one prefix, then times and counts ``storage.stat_many`` (the stamps a re-run's work keys need)
and ``storage.iter_glob``, for N objects in one folder and N spread over folders of 10; then a tenth of them
one HEAD each, 32 at a time, for comparison.
Nothing leaves the machine. Needs the dev extra (moto[server], s3fs).
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

from nanobatch import storage


def start_moto() -> tuple[str, Counter[str]]:
    from moto.server import DomainDispatcherApplication, create_backend_app
    from werkzeug.serving import make_server

    counts: Counter[str] = Counter()
    app = DomainDispatcherApplication(create_backend_app)

    def counted(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        listing = "list-type" in environ.get("QUERY_STRING", "")
        counts["LIST" if listing else environ["REQUEST_METHOD"]] += 1
        return app(environ, start_response)

    server = make_server("127.0.0.1", 0, counted, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_port}", counts


def measure(label: str, counts: Counter[str], fn: Callable[[], object]) -> None:
    counts.clear()
    started = time.perf_counter()
    fn()
    seconds = time.perf_counter() - started
    requests = ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "none"
    sys.stdout.write(f"| {label} | {seconds:.2f} s | {requests} |\n")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--objects", type=int, default=10_000)
    n = parser.parse_args().objects
    url, counts = start_moto()
    os.environ.update(AWS_ENDPOINT_URL=url, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench")
    os.environ["AWS_DEFAULT_REGION"] = "us-east-1"
    fs = storage._filesystem("s3://bench")
    fs.mkdir("bench")
    fs.pipe({f"bench/crowded/{i:06}.jpg": b"x" * 64 for i in range(n)})
    fs.pipe({f"bench/spread/{i // 10:05}/{i % 10}.jpg": b"x" * 64 for i in range(n)})
    crowded = [f"s3://bench/crowded/{i:06}.jpg" for i in range(n)]
    spread = [f"s3://bench/spread/{i // 10:05}/{i % 10}.jpg" for i in range(n)]

    sys.stdout.write(f"| {n:,} objects | time | requests at the server |\n|---|---|---|\n")
    measure("stat_many, one folder", counts, lambda: storage.stat_many(crowded))
    measure("stat_many, folders of 10 under one prefix", counts, lambda: storage.stat_many(spread))
    measure("iter_glob crowded/*.jpg", counts, lambda: sum(1 for _ in storage.iter_glob("s3://bench/crowded/*.jpg")))
    storage.LIST_THRESHOLD = n + 1  # what listing saves: the same objects, one HEAD each (a tenth of them)
    measure(f"{n // 10:,} of them by HEAD, 32 at a time", counts, lambda: storage.stat_many(spread[: n // 10]))


if __name__ == "__main__":
    main()
