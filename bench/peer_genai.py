"""The peer to beat on big answers: Google's own SDK (google-genai) as a competent user drives it: one client,
its own retries (``HttpRetryOptions``), an ``asyncio.Semaphore`` and ``gather`` over every item.

The SDK sends async requests through aiohttp when aiohttp is installed (as with ``pip install -e '.[bench]'``),
else through httpx2; ``"sdk_transport": "httpx2"`` in the params forces httpx2. The result says which ran.

``python bench/peer_genai.py '{"base_url": ..., "n": 100, "concurrency": 16, ...}'`` (see ``_peer.py``).
"""

# ruff: noqa: ASYNC240 - plain blocking file I/O, as such scripts do it (nanobatch hands its to threads)

from __future__ import annotations

import asyncio
from importlib import metadata
from pathlib import Path
from typing import Any

from _peer import INSTRUCTION, MODEL, main
from google import genai
from google.genai import types


async def edit_all(
    *,
    base_url: str,
    n: int,
    concurrency: int,
    input_path: str,
    out_dir: str,
    image_size: str,
    sdk_transport: str = "default",
) -> dict[str, Any]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    options: dict[str, Any] = {
        "base_url": base_url,
        "api_version": "v1beta",
        "timeout": 300_000,  # milliseconds
        "retry_options": types.HttpRetryOptions(attempts=6),
    }
    if sdk_transport == "httpx2":
        import httpx2

        limits = httpx2.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        options["httpx_async_client"] = httpx2.AsyncClient(limits=limits, timeout=300)
    client = genai.Client(api_key="bench-not-a-key", http_options=types.HttpOptions(**options))
    config = types.GenerateContentConfig(
        response_modalities=["IMAGE"], image_config=types.ImageConfig(image_size=image_size)
    )
    semaphore = asyncio.Semaphore(concurrency)
    failed = 0

    async def one(number: int) -> None:
        nonlocal failed
        async with semaphore:
            image = types.Part.from_bytes(data=Path(input_path).read_bytes(), mime_type="image/jpeg")
            try:
                response = await client.aio.models.generate_content(
                    model=MODEL, contents=[INSTRUCTION, image], config=config
                )
            except genai.errors.APIError:
                failed += 1
                return
            for part in response.candidates[0].content.parts:
                if part.inline_data and part.inline_data.data and not part.thought:
                    (out / f"genai-{number}.png").write_bytes(part.inline_data.data)
                    return
            failed += 1

    await asyncio.gather(*(one(number) for number in range(n)))
    await client.aio.aclose()
    used = "httpx2" if sdk_transport == "httpx2" or not client._api_client._use_aiohttp() else "aiohttp"
    sdk = f"google-genai {metadata.version('google-genai')} on {used}"
    return {"requests": n, "ok": n - failed, "failed": failed, "client": sdk}


if __name__ == "__main__":
    main(edit_all)
