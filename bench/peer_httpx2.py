"""Plain httpx2, written as the aiohttp script is (``peer_aiohttp.py``): one ``AsyncClient`` with as many
connections as the concurrency, an ``asyncio.Semaphore``, ``gather`` over every item, retries with
exponential backoff on 429/5xx and dropped connections (honouring the server's ``retryDelay``).

``python bench/peer_httpx2.py '{"base_url": ..., "n": 100, "concurrency": 16, ...}'`` (see ``_peer.py``).
"""

# ruff: noqa: ASYNC240 - plain blocking file I/O, as such scripts do it (nanobatch hands its to threads)

from __future__ import annotations

import asyncio
import base64
from importlib import metadata
from pathlib import Path
from typing import Any

import httpx2
from _peer import MODEL, main
from peer_aiohttp import MAX_ATTEMPTS, RETRYABLE, RequestBudget, request_body, retry_delay


async def edit(
    client: httpx2.AsyncClient,
    path: str,
    body: dict[str, Any],
    target: Path,
    stats: dict[str, int],
    budget: RequestBudget,
) -> None:
    for attempt in range(MAX_ATTEMPTS):
        await budget.take()
        try:
            response = await client.post(path, json=body)
            answer = response.json()
            if response.status_code == 200:
                break
            if response.status_code not in RETRYABLE:
                raise RuntimeError(f"HTTP {response.status_code}: {answer}")
            delay = retry_delay(answer, attempt)
        except httpx2.TransportError:
            delay = retry_delay(None, attempt)
        stats["retries"] += 1
        await asyncio.sleep(delay)
    else:
        raise RuntimeError(f"{target.name}: gave up after {MAX_ATTEMPTS} attempts")
    for part in answer["candidates"][0]["content"]["parts"]:
        if "inlineData" in part and not part.get("thought"):
            target.write_bytes(base64.b64decode(part["inlineData"]["data"]))
            return
    raise RuntimeError(f"{target.name}: the answer has no image")


async def edit_all(
    *,
    base_url: str,
    n: int,
    concurrency: int,
    input_path: str,
    out_dir: str,
    image_size: str,
    rpm: float | None = None,
) -> dict[str, Any]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = f"/v1beta/models/{MODEL}:generateContent"
    semaphore = asyncio.Semaphore(concurrency)
    stats = {"retries": 0, "failed": 0}
    budget = RequestBudget(rpm)
    limits = httpx2.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    headers = {"x-goog-api-key": "bench-not-a-key"}
    async with httpx2.AsyncClient(base_url=base_url, headers=headers, limits=limits, timeout=300) as client:

        async def one(number: int) -> None:
            async with semaphore:
                body = request_body(Path(input_path).read_bytes(), image_size)
                try:
                    await edit(client, path, body, out / f"httpx2-{number}.png", stats, budget)
                except RuntimeError:
                    stats["failed"] += 1

        await asyncio.gather(*(one(number) for number in range(n)))
    return {"requests": n, "ok": n - stats["failed"], **stats, "client": f"httpx2 {metadata.version('httpx2')}"}


if __name__ == "__main__":
    main(edit_all)
