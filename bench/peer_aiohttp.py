"""The peer to beat on overhead: an aiohttp script as a competent user writes one (after the OpenAI cookbook's
parallel processor): one session, an ``asyncio.Semaphore``, ``gather`` over every item, retries with
exponential backoff on 429/5xx and dropped connections (honouring the server's ``retryDelay``).

``python bench/peer_aiohttp.py '{"base_url": ..., "n": 100, "concurrency": 16, ...}'`` (see ``_peer.py``).
"""

# ruff: noqa: ASYNC240 - plain blocking file I/O, as such scripts do it (nanobatch hands its to threads)

from __future__ import annotations

import asyncio
import base64
import random
import time
from pathlib import Path
from typing import Any

import aiohttp
from _peer import INSTRUCTION, MODEL, main

RETRYABLE = {429, 500, 502, 503, 504}
MAX_ATTEMPTS = 6


def request_body(image: bytes, image_size: str) -> dict[str, Any]:
    return {
        "contents": [
            {
                "role": "user",
                "parts": [
                    {"text": INSTRUCTION},
                    {"inlineData": {"mimeType": "image/jpeg", "data": base64.b64encode(image).decode()}},
                ],
            }
        ],
        "generationConfig": {"responseModalities": ["IMAGE"], "imageConfig": {"imageSize": image_size}},
    }


class RequestBudget:
    """The cookbook's rate limit: a bucket of ``rpm`` requests, refilled continuously at ``rpm`` a minute."""

    def __init__(self, rpm: float | None) -> None:
        self.rpm = rpm
        self.available = rpm or 0.0
        self.updated = time.monotonic()

    async def take(self) -> None:
        while self.rpm:
            now = time.monotonic()
            self.available = min(self.rpm, self.available + (now - self.updated) * self.rpm / 60)
            self.updated = now
            if self.available >= 1:
                self.available -= 1
                return
            await asyncio.sleep(0.001)


def retry_delay(answer: Any, attempt: int) -> float:
    """The server's RetryInfo if it sent one, else exponential backoff with jitter."""
    try:
        for detail in answer["error"]["details"]:
            if detail.get("@type", "").endswith("RetryInfo"):
                return float(detail["retryDelay"].rstrip("s"))
    except (KeyError, TypeError, ValueError):
        pass
    return min(60.0, 2**attempt) * random.uniform(0.5, 1.0)


async def edit(
    session: aiohttp.ClientSession,
    url: str,
    body: dict[str, Any],
    target: Path,
    stats: dict[str, int],
    budget: RequestBudget,
) -> None:
    for attempt in range(MAX_ATTEMPTS):
        await budget.take()
        try:
            async with session.post(url, json=body) as response:
                answer = await response.json(content_type=None)
                if response.status == 200:
                    break
                if response.status not in RETRYABLE:
                    raise RuntimeError(f"HTTP {response.status}: {answer}")
                delay = retry_delay(answer, attempt)
        except (TimeoutError, aiohttp.ClientConnectionError):
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
    url = f"{base_url}/v1beta/models/{MODEL}:generateContent"
    headers = {"x-goog-api-key": "bench-not-a-key"}
    semaphore = asyncio.Semaphore(concurrency)
    stats = {"retries": 0, "failed": 0}
    budget = RequestBudget(rpm)
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(headers=headers, connector=connector, timeout=timeout) as session:

        async def one(number: int) -> None:
            async with semaphore:
                body = request_body(Path(input_path).read_bytes(), image_size)
                try:
                    await edit(session, url, body, out / f"aiohttp-{number}.png", stats, budget)
                except RuntimeError:
                    stats["failed"] += 1

        await asyncio.gather(*(one(number) for number in range(n)))
    return {"requests": n, "ok": n - stats["failed"], **stats, "client": f"aiohttp {aiohttp.__version__}"}


if __name__ == "__main__":
    main(edit_all)
