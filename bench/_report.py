"""The write-out of ``make bench``: ``bench/RESULTS.md`` (the machine, the table, how each number is
measured) and the peers' rows in docs/performance.md."""

from __future__ import annotations

import os
import platform
import tempfile
import time
from importlib import metadata
from pathlib import Path

from _bench import Bench, Row
from _peers import SECTION as PEERS_SECTION

__all__ = ["table", "update_figures", "write_results"]

PEERS_MARKERS = ("<!-- bench:peers:start -->", "<!-- bench:peers:end -->")


def machine() -> list[tuple[str, str]]:
    cpu = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem_kb = int(f.readline().split()[1])
    versions = ", ".join(
        f"{name} {metadata.version(name)}" for name in ("httpx2", "httpcore2", "anyio", "h11", "uvicorn", "starlette")
    )
    return [
        ("CPU", f"{cpu}, {os.cpu_count()} cores"),
        ("memory", f"{mem_kb / 2**20:.0f} GB"),
        ("Python", f"{platform.python_implementation()} {platform.python_version()}"),
        ("OS", f"{platform.system()} {platform.release()}"),
        ("libraries", versions),
        ("peers", _peer_versions()),
        ("network", "loopback only; simulator in its own process (uvicorn, h11)"),
        ("output folder", _filesystem(Path(tempfile.gettempdir()))),
    ]


def _peer_versions() -> str:
    found = []
    for name in ("aiohttp", "google-genai"):
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            found.append(f"{name} not installed (pip install -e '.[bench]')")
    return ", ".join(found)


def _filesystem(path: Path) -> str:
    """The file system *path* is on, from /proc/mounts (the longest mount point that contains it)."""
    best = ("", "unknown", "")
    with open("/proc/mounts") as f:
        for line in f:
            device, mount, kind = line.split()[:3]
            if str(path.resolve()).startswith(mount) and len(mount) > len(best[0]):
                best = (mount, kind, device)
    return f"{path} on {best[1]} ({best[2]})"


def table(rows: list[Row]) -> str:
    lines = ["| # | benchmark | result | target | verdict |", "|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row.section} | {row.name} | {row.value} | {row.target} | {row.verdict} |")
    return "\n".join(lines)


METHOD = """\
## How each number is measured

0. **Peers**: the same workloads through nanobatch and through what a user
   would write instead, against one simulator (200 ms latency, canned answers),
   each run a fresh process, repetitions alternating (3 rounds; 1 with
   `--quick`): `bench/peer_aiohttp.py` (aiohttp, after the OpenAI cookbook's
   parallel processor), `bench/peer_genai.py` (the google-genai SDK with its own
   retries; it sends through aiohttp when aiohttp is installed) and
   `bench/peer_httpx2.py` (plain httpx2), each with an `asyncio.Semaphore`,
   `gather` over every item and retries that honour `retryDelay`. Small
   answers: 2,000 requests at concurrency 100 (ideal 4.0 s); big answers: 300
   answers of 5.9 MB (a 2K PNG) at concurrency 16, 2 rounds (64 and 1 with
   `--quick`), then nanobatch alone with 1,000 (200) to see whether its memory
   grows with the number of requests. Ratios are of medians. Quota: 1,000
   requests at concurrency 100 against the simulator's `rpm_limit` 600 (a
   sliding window) at `time_scale` 0.1, so a minute lasts 6 s: nanobatch with
   `--rpm` the quota (scaled) and `rpm_burst` 1, then 600; the aiohttp and
   httpx2 scripts with the OpenAI cookbook's token bucket set to the quota; the
   SDK with its own retries only (it has no rate limit). Each client starts
   after a quiet window; "refused" is what the server saw beyond the items done.
   **Whole processes** (rows "whole process", `bench/dispatch.py`): each client
   timed from outside, from its start to its exit, imports included, as a user
   meets it: `nanobatch run` on the command line (through `bench/_cli.py`, which
   also reports the CPU of the run's own process apart from its workers')
   against the peer script; CPU is the kernel's accounting of the reaped child
   (`wait4`), peak RSS the client's main process's own (`VmHWM`). Small
   answers as above; 4K answers: 96 (32 with `--quick`) answers of 24 MB (a
   4096x4096 PNG of noise, 32 MB in base64) at concurrency 16, nanobatch with
   `--workers 0` and one per CPU. Bytecode is compiled once beforehand (a
   warm-up run), as a pip install leaves it.

Each client run is a fresh `python bench/_client.py` process; the simulator
(`nanobatch.simulator.create_app` with `SimulatorConfig(canned=...)`, served by
`run_in_thread` in a process of its own) answers every request with one
pre-encoded image, after a fixed latency. Client times are taken around
`await nanobatch.run_job(...)` alone (settings through `load_settings`); the
process start and imports are reported apart. CPU is `time.process_time()` of the
client process (all threads, user + system). Items are edits of a 1.6 KB JPEG,
one input file per item, read from a CSV (`items_from`); output goes to a
temporary folder on the local disk.

1. **Dispatch**: 2,000 requests, 200 ms latency, `limits.concurrency` 100; ideal
   = requests x latency / concurrency = 4.0 s. (a) the Gemini docs' Python example
   as a loop of sync httpx2 calls (read, post, decode, write), timed on a few
   requests and scaled; (b) the same work as `asyncio.gather` over 2,000
   coroutines with an `asyncio.Semaphore(100)` and one `httpx2.AsyncClient`
   limited to 100 connections. The "pool split" row is the same script through a
   transport that spreads the requests over ten httpx2 pools of 10 connections
   (`bench/_transport.py`), as nanobatch's own client does above 10 connections:
   httpcore2's pool costs grow with the square of its size. (c) the floor: 100
   raw asyncio connections, each sending 20 requests one after another as fast
   as the answers come, with no HTTP library (a hand-written request, the
   answer skipped by its Content-Length): no client can beat it on this
   machine, so its distance from the ideal is the simulator's, the loopback's
   and the event loop's share, not a client's.
2. **Rate**: `limits.requests_per_minute` 1200 at concurrency 100 (the limit,
   not the client, sets the pace: 20 requests/s is a tenth of what the client
   can do), for 45 s (20 s with `--quick`): long enough for 35 distinct
   10-second windows, short enough for `make bench`. The simulator notes each
   request's arrival (`time.time()`); the achieved rate is (arrivals - 1) /
   (last - first); the worst window is the most arrivals in any [t, t + 10 s).
3. **CPU**: the simulator answers with a 2048x2048 PNG of 3-bit noise (5.9 MB,
   7.9 MB in base64, like a real 2K answer), no latency, concurrency 8 for both;
   the minimal loop is httpx2 + `response.json()` + `base64.b64decode` + a plain
   file write (no fsync, no temporary file, no results line, no journal).
4. **Memory**: peak RSS (`VmHWM`, since the process's exec: a child's
   `ru_maxrss` on Linux starts at the bench's own) of each client process, one
   process per configuration; 400 requests with small answers, 3 x concurrency (at least 24)
   with 6 MB answers, 200 ms latency. Manifest length: the whole manifest goes
   through the engine against the simulator without latency (with `--quick`,
   20,000 items: too few for the growth to stand out of the noise).
5. **Resume**: the long manifest's output folder from (4) (every item `ok`,
   records written by nanobatch itself): `ResultsIndex.load` in a fresh process,
   then `run_job` again over the same manifest and folder (nothing to send), and
   a cProfile of that re-run when it takes more than 2 s.
6. **Batch tier**: 1,000, 10,000 and 20,000 items (each with its own input picture)
   through `--tier batch` against the simulator's Batch and Files APIs, each
   answer a 70 KB 1024x1024 JPEG (1.9 GB of result files at 20,000), with a
   fixed job latency of 20 s, chunks of 1,000 requests, 4 open at once; peak RSS
   of each client process.
7. **Buckets** (`bench/storage.py`, moto's S3 server in the same process,
   counting what it answers): stamps of 10,000 objects (2,000 with `--quick`)
   through `storage.stat_many` and `iter_glob`; then a job of as many items,
   each with its own input picture, whose answers (a 70 KB 1024x1024 JPEG,
   through `httpx2.MockTransport`) go to `output.upload_to: s3://...`, run
   twice: the re-run's requests at the server and its time.
"""


# A hand-written section of RESULTS.md (the figures behind the code's speed tricks): kept when the tables are rewritten.
WHY_SECTION = "## Why the code is shaped this way"


def write_results(path: Path, b: Bench, elapsed: float) -> str:
    mode = "quick (`--quick`)" if b.quick else "full"
    old = path.read_text() if path.exists() else ""
    parts = [
        "# Benchmark results",
        "",
        f"`make bench` ({mode} run, {time.strftime('%Y-%m-%d')}, {elapsed / 60:.1f} minutes in all).",
        "",
        "| machine | |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in machine()),
        "",
        table(b.rows),
        "",
        METHOD,
        *b.notes,
    ]
    text = "\n".join(parts).rstrip() + "\n"
    if WHY_SECTION in old:
        text += "\n" + WHY_SECTION + old.split(WHY_SECTION, 1)[1].rstrip() + "\n"
    path.write_text(text)
    return text


def update_figures(path: Path, b: Bench, elapsed: float) -> bool:
    """Put the peers' rows between the markers in *path* (docs/performance.md); False when they are not there."""
    text = path.read_text()
    start, end = PEERS_MARKERS
    if start not in text or end not in text:
        return False
    mode = "`--quick`" if b.quick else "full"
    rows = [row for row in b.rows if row.section == PEERS_SECTION]
    block = "\n".join(
        [
            start,
            f"Measured by `make bench` ({mode} run, {time.strftime('%Y-%m-%d')}; machine in "
            "[`bench/RESULTS.md`](../bench/RESULTS.md)):",
            "",
            table(rows),
            end,
        ]
    )
    before, rest = text.split(start, 1)
    path.write_text(before + block + rest.split(end, 1)[1])
    return True
