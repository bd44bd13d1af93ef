"""What a re-run's object checks cost against S3: ``python bench/storage.py [--objects 10000] [--rerun N]``.

Starts moto's S3 server in this process on a loopback port, counting the requests it answers, puts N small
objects under one prefix, then times and counts ``storage.stat_many`` (the stamps a re-run's work keys need)
and ``storage.iter_glob``, for N objects in one folder and N spread over folders of 10; then a tenth of them
one HEAD each, 32 at a time, for comparison.

``--rerun N`` measures a whole job instead: N items run with ``output.upload_to: s3://...`` (a canned
answer through httpx2.MockTransport: no model, no simulator), then run again; the second run's requests at
the S3 server are counted (it must download nothing and check the objects in batches).
Nothing leaves the machine. Needs the dev extra (moto[server], s3fs).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

import _fixtures as fixtures  # bench/ is on the path when this runs as a script

from nanobatch.api import storage


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


ROWS: list[dict[str, Any]] = []  # what --json prints: one dict per measured line


def measure(label: str, counts: Counter[str], fn: Callable[[], object]) -> None:
    counts.clear()
    started = time.perf_counter()
    fn()
    seconds = time.perf_counter() - started
    requests = ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "none"
    ROWS.append({"label": label, "seconds": seconds, "requests": dict(counts)})
    sys.stdout.write(f"| {label} | {seconds:.2f} s | {requests} |\n")


def rerun(n: int, counts: Counter[str]) -> None:
    """A job of *n* items uploading to S3, then the same job again: what the second run asks the server.

    Each item has its own input picture (distinct bytes, so distinct work keys, as in a real catalog); the
    canned answer is a 1024x1024 JPEG of a product-like picture (about 70 KB), uploaded once per item.
    """
    import logging
    import tempfile
    from pathlib import Path

    import anyio
    import httpx2

    import nanobatch

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's server logs each request
    folder = Path(tempfile.mkdtemp(prefix="nanobatch-bench-"))
    answer = fixtures.answer_json(fixtures.product_jpeg(folder / "answer.jpg"))
    transport = httpx2.MockTransport(lambda request: httpx2.Response(200, content=answer))
    job = fixtures.write_catalog(folder / "job", n, fixtures.input_jpeg(folder / "input.jpg"), distinct=True)
    settings = nanobatch.load_settings(overrides={"output.upload_to": "s3://bench/rerun/", "limits.concurrency": 32})

    def run() -> nanobatch.RunSummary:
        return anyio.run(lambda: nanobatch.run_job(job, settings=settings, transport=transport, out_dir=folder / "out"))

    sys.stdout.write(f"| {n:,} items with output.upload_to | time | requests at the S3 server |\n|---|---|---|\n")
    measure("first run (each image PUT)", counts, run)
    summary: list[nanobatch.RunSummary] = []
    measure("re-run (all done)", counts, lambda: summary.append(run()))
    ROWS[-1]["skipped"], ROWS[-1]["sent"] = summary[0].stats.skipped, summary[0].stats.requests
    sys.stdout.write(f"\nre-run: {summary[0].stats.skipped:,} skipped, {summary[0].stats.requests} sent\n")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--objects", type=int, default=10_000)
    parser.add_argument("--rerun", type=int, default=0, help="measure a re-run of a job of this many items")
    parser.add_argument("--json", action="store_true", help="end with one line: the measured rows as JSON")
    args = parser.parse_args()
    try:
        measure_all(args.objects, args.rerun)
    finally:
        if args.json:
            sys.stdout.write("\n" + json.dumps(ROWS) + "\n")


def measure_all(n: int, rerun_items: int) -> None:
    url, counts = start_moto()
    os.environ.update(AWS_ENDPOINT_URL=url, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench")
    os.environ["AWS_DEFAULT_REGION"] = "us-east-1"
    fs = storage._filesystem("s3://bench")
    fs.mkdir("bench")
    if rerun_items:
        rerun(rerun_items, counts)
        return
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
