"""One measured client run, in a fresh process: ``python bench/_client.py SCENARIO JSON_PARAMS``.

Prints one JSON object: the scenario's numbers plus ``maxrss_mb`` (the peak
resident set of this process since its exec) and ``startup_s`` (interpreter start to the
moment the scenario began, imports included: kept out of the timed run).

Scenarios:

* ``nanobatch``: ``await nanobatch.run_job(...)`` over a manifest; wall, CPU
  (``time.process_time``: every thread of the process, user + system) and
  main-thread CPU, measured around the ``await`` alone.
* ``sequential``: the API's own Python example, one request after another
  (sync httpx2): read the input, post, decode the image, write it.
* ``minimal``: the same work as a plain script: ``asyncio.gather`` over every
  request with an ``asyncio.Semaphore(concurrency)`` and one httpx2.AsyncClient.
* ``floor``: the least any client can do against this server: raw asyncio
  sockets, no HTTP library, ``concurrency`` kept-alive connections each sending
  its share of the requests one after another and skipping over the answers
  (no JSON, no image, no file). What it takes over the ideal is the
  simulator's, the loopback's and the event loop's, not a client's.
* ``load_index``: ``ResultsIndex.load`` of an output folder.
"""

from __future__ import annotations

import base64
import json
import sys
import time
from pathlib import Path
from typing import Any

from _peer import peak_rss_mb, rss_mb

_PROCESS_START = time.perf_counter()

MODEL = "gemini-3.1-flash-image"
INSTRUCTION = "Replace the background with pure white; keep the product unchanged"
PATH = f"/v1beta/models/{MODEL}:generateContent"


def run_nanobatch(
    *,
    manifest: str,
    out_dir: str,
    base_url: str,
    concurrency: int,
    rpm: float | None = None,
    rpm_burst: int = 1,
    profile: bool = False,
    tier: str | None = None,
    batch: dict[str, Any] | None = None,
    workers: int = 0,
) -> dict[str, Any]:
    import anyio

    import nanobatch

    settings = nanobatch.load_settings(
        env={},
        overrides={
            "api.base_url": base_url,
            "api.tier": tier,
            "limits.concurrency": concurrency,
            "limits.requests_per_minute": rpm,
            "limits.rpm_burst": rpm_burst,
            # 0: this process's CPU is all the run's (a worker's would not be counted); the whole-process rows
            # (bench/dispatch.py) compare worker processes, from outside
            "limits.workers": workers,
            **{f"batch.{name}": value for name, value in (batch or {}).items()},
        },
    )
    result: dict[str, Any] = {"rss_before_mb": rss_mb(), "startup_s": time.perf_counter() - _PROCESS_START}

    run_job = nanobatch.run_job  # imported lazily (PEP 562): its imports belong to start-up, not to the timed run

    async def timed() -> Any:
        profiler = None
        if profile:
            import cProfile

            profiler = cProfile.Profile()
            profiler.enable()
        wall, cpu, main_cpu = time.perf_counter(), time.process_time(), time.thread_time()
        summary = await run_job(manifest, settings=settings, out_dir=out_dir)
        result.update(
            wall_s=time.perf_counter() - wall,
            cpu_s=time.process_time() - cpu,
            main_cpu_s=time.thread_time() - main_cpu,
        )
        if profiler is not None:
            profiler.disable()
            result["profile"] = _profile_text(profiler)
        return summary

    summary = anyio.run(timed)
    stats = summary.stats
    result.update(
        outcome=summary.outcome,
        items=stats.total,
        ok=stats.ok,
        failed=stats.failed,
        skipped=stats.skipped,
        requests=stats.requests,
        retries=dict(stats.retries),
    )
    return result


def _profile_text(profiler: Any) -> str:
    import io
    import pstats

    buffer = io.StringIO()
    stats = pstats.Stats(profiler, stream=buffer)
    stats.sort_stats("cumulative").print_stats(r"nanobatch/", 22)
    stats.sort_stats("tottime").print_stats(14)
    lines = [line.rstrip() for line in buffer.getvalue().splitlines()]
    # Keep the tables, drop pstats' banners and blank lines.
    return "\n".join(line for line in lines if line and not line.lstrip().startswith(("Ordered by", "List reduced")))


def _body(input_path: str, image_size: str) -> bytes:
    data = base64.b64encode(Path(input_path).read_bytes()).decode()
    return json.dumps(
        {
            "contents": [
                {
                    "role": "user",
                    "parts": [{"text": INSTRUCTION}, {"inlineData": {"mimeType": "image/jpeg", "data": data}}],
                }
            ],
            "generationConfig": {"responseModalities": ["IMAGE"], "imageConfig": {"imageSize": image_size}},
        }
    ).encode()


def _save_image(answer: dict[str, Any], stem: Path) -> None:
    for part in answer["candidates"][0]["content"]["parts"]:
        if "inlineData" in part and not part.get("thought"):
            with open(f"{stem}.png", "wb") as f:
                f.write(base64.b64decode(part["inlineData"]["data"]))
            return
    raise RuntimeError("the answer has no image")


def run_sequential(*, base_url: str, n: int, input_path: str, out_dir: str, image_size: str) -> dict[str, Any]:
    import httpx2

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"startup_s": time.perf_counter() - _PROCESS_START}
    with httpx2.Client(base_url=base_url, timeout=300) as client:
        wall, cpu = time.perf_counter(), time.process_time()
        for number in range(n):
            response = client.post(
                PATH, content=_body(input_path, image_size), headers={"content-type": "application/json"}
            )
            response.raise_for_status()
            _save_image(response.json(), out / f"seq-{number}")
        result.update(wall_s=time.perf_counter() - wall, cpu_s=time.process_time() - cpu, requests=n)
    return result


def run_minimal(
    *,
    base_url: str,
    n: int,
    concurrency: int,
    input_path: str,
    out_dir: str,
    image_size: str,
    split_pool: bool = False,
) -> dict[str, Any]:
    import asyncio

    import httpx2

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"rss_before_mb": rss_mb(), "startup_s": time.perf_counter() - _PROCESS_START}
    errors = 0

    async def main() -> None:
        nonlocal errors
        semaphore = asyncio.Semaphore(concurrency)
        limits = httpx2.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        transport = None
        if split_pool:
            from _transport import SplitPoolTransport

            transport = SplitPoolTransport(concurrency)
        async with httpx2.AsyncClient(base_url=base_url, limits=limits, transport=transport, timeout=300) as client:

            async def one(number: int) -> None:
                nonlocal errors
                async with semaphore:
                    for _ in range(3):  # a kept-alive connection the server just closed: send again
                        try:
                            response = await client.post(
                                PATH,
                                content=_body(input_path, image_size),
                                headers={"content-type": "application/json"},
                            )
                            break
                        except httpx2.TransportError:
                            errors += 1
                    else:
                        raise RuntimeError("three connection errors in a row")
                    response.raise_for_status()
                    _save_image(response.json(), out / f"min-{number}")

            wall, cpu = time.perf_counter(), time.process_time()
            await asyncio.gather(*(one(number) for number in range(n)))
            result.update(wall_s=time.perf_counter() - wall, cpu_s=time.process_time() - cpu)

    asyncio.run(main())
    result.update(requests=n, connection_errors=errors)
    return result


def run_floor(*, base_url: str, n: int, concurrency: int, input_path: str, image_size: str) -> dict[str, Any]:
    import asyncio
    from urllib.parse import urlsplit

    url = urlsplit(base_url)
    host, port = url.hostname or "127.0.0.1", url.port or 80
    body = _body(input_path, image_size)
    head = (
        f"POST {PATH} HTTP/1.1\r\nhost: {host}:{port}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    ).encode()
    result: dict[str, Any] = {"startup_s": time.perf_counter() - _PROCESS_START}

    async def connection(count: int) -> None:
        reader, writer = await asyncio.open_connection(host, port)
        for _ in range(count):
            writer.write(head + body)
            header = await reader.readuntil(b"\r\n\r\n")
            if not header.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(f"the simulator answered {header[:40]!r}")
            lines = header.lower().split(b"\r\n")
            length = next(int(line[15:]) for line in lines if line.startswith(b"content-length:"))
            await reader.readexactly(length)
        writer.close()

    async def main() -> None:
        shares = [n // concurrency + (1 if k < n % concurrency else 0) for k in range(concurrency)]
        wall, cpu = time.perf_counter(), time.process_time()
        await asyncio.gather(*(connection(share) for share in shares if share))
        result.update(wall_s=time.perf_counter() - wall, cpu_s=time.process_time() - cpu)

    asyncio.run(main())
    result["requests"] = n
    return result


def run_load_index(*, out_dir: str) -> dict[str, Any]:
    from nanobatch.output.results import ResultsIndex

    before = rss_mb()
    wall = time.perf_counter()
    index = ResultsIndex.load(Path(out_dir))
    return {"wall_s": time.perf_counter() - wall, "entries": len(index), "rss_growth_mb": rss_mb() - before}


SCENARIOS = {
    "nanobatch": run_nanobatch,
    "sequential": run_sequential,
    "minimal": run_minimal,
    "floor": run_floor,
    "load_index": run_load_index,
}


def main() -> None:
    scenario, params = sys.argv[1], json.loads(sys.argv[2])
    result = SCENARIOS[scenario](**params)
    result["maxrss_mb"] = peak_rss_mb()
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
