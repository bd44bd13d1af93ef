"""The simulator's Files and Batch APIs at the HTTP level: the refusals a client must cope with."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx

from nanobatch.simulator import SimulatorConfig, create_app

MODEL = "gemini-3.1-flash-image-preview"
LINE = json.dumps({"key": "a", "request": {"contents": [{"parts": [{"text": "hi"}]}]}}).encode() + b"\n"


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@asynccontextmanager
async def sim(config: SimulatorConfig | None = None, clock: Clock | None = None) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(config or SimulatorConfig(), clock=clock or Clock())
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://sim") as client:
        yield client


async def start_upload(client: httpx.AsyncClient, size: int) -> str:
    response = await client.post(
        "/upload/v1beta/files",
        json={"file": {"displayName": "in"}},
        headers={"X-Goog-Upload-Protocol": "resumable", "X-Goog-Upload-Command": "start",
                 "X-Goog-Upload-Header-Content-Length": str(size)},
    )  # fmt: skip
    assert response.status_code == 200 and response.headers["x-goog-upload-status"] == "active"
    return response.headers["x-goog-upload-url"]


async def chunk(client: httpx.AsyncClient, url: str, data: bytes, offset: int, command: str) -> httpx.Response:
    headers = {"X-Goog-Upload-Command": command, "X-Goog-Upload-Offset": str(offset)}
    return await client.post(url, content=data, headers=headers)


async def upload(client: httpx.AsyncClient, data: bytes = LINE) -> dict[str, Any]:
    response = await chunk(client, await start_upload(client, len(data)), data, 0, "upload, finalize")
    assert response.headers["x-goog-upload-status"] == "final"
    file: dict[str, Any] = response.json()["file"]
    return file


async def test_a_chunk_at_the_wrong_offset_is_refused_and_query_tells_where_to_resume() -> None:
    async with sim() as client:
        url = await start_upload(client, 2 * len(LINE))
        assert (await chunk(client, url, LINE, 0, "upload")).headers["x-goog-upload-status"] == "active"
        refused = await chunk(client, url, LINE, 0, "upload, finalize")
        query = await client.post(url, headers={"X-Goog-Upload-Command": "query"})
        done = await chunk(client, url, LINE, len(LINE), "upload, finalize")
    assert refused.status_code == 400 and "offset" in refused.json()["error"]["message"]
    assert query.headers["x-goog-upload-size-received"] == str(len(LINE))
    assert done.json()["file"]["sizeBytes"] == str(2 * len(LINE))


async def test_a_finalize_short_of_the_declared_size_is_refused() -> None:
    async with sim() as client:
        url = await start_upload(client, 10 * len(LINE))
        response = await chunk(client, url, LINE, 0, "upload, finalize")
    assert response.status_code == 400 and "declared" in response.json()["error"]["message"]


async def test_only_generated_files_can_be_downloaded() -> None:
    async with sim() as client:
        file = await upload(client)
        response = await client.get(f"/download/v1beta/{file['name']}:download", params={"alt": "media"})
    assert response.status_code == 400


async def test_files_are_gone_after_48_simulated_hours_but_kept_at_time_scale_zero() -> None:
    clock = Clock()
    async with sim(SimulatorConfig(time_scale=0.5), clock) as client:
        file = await upload(client)
        clock.now += 47 * 3600 * 0.5
        kept = await client.get(f"/v1beta/{file['name']}")
        clock.now += 2 * 3600 * 0.5
        gone = await client.get(f"/v1beta/{file['name']}")
    assert (kept.status_code, gone.status_code) == (200, 403)
    async with sim(SimulatorConfig(time_scale=0), clock) as client:
        file = await upload(client)
        clock.now += 10**9
        created = await client.post(
            f"/v1beta/models/{MODEL}:batchGenerateContent",
            json={"batch": {"displayName": "now", "inputConfig": {"fileName": file["name"]}}},
        )
        job = (await client.get(f"/v1beta/{created.json()['name']}")).json()
        assert (await client.get(f"/v1beta/{file['name']}")).status_code == 200
    assert job["metadata"]["state"] == "BATCH_STATE_SUCCEEDED" and job["done"] is True
    counts = {"requestCount": "1", "successfulRequestCount": "1", "failedRequestCount": "0"}
    assert job["metadata"]["batchStats"] == counts


async def test_bad_creates_are_refused_without_making_a_job() -> None:
    async with sim() as client:
        file = await upload(client)
        good = {"batch": {"displayName": "j", "inputConfig": {"fileName": file["name"]}}}
        answers = [
            await client.post("/v1beta/models/no-such-model:batchGenerateContent", json=good),
            await client.post(f"/v1beta/models/{MODEL}:batchGenerateContent", json={"batch": {"displayName": "j"}}),
            await client.post(
                f"/v1beta/models/{MODEL}:batchGenerateContent",
                json={"batch": {"displayName": "j", "inputConfig": {"fileName": "files/missing"}}},
            ),
            await client.post(f"/v9/models/{MODEL}:batchGenerateContent", json=good),
        ]
        listed = (await client.get("/v1beta/batches")).json()
        unknown = await client.get("/v1beta/batches/nope")
    assert [a.status_code for a in answers] == [404, 400, 400, 404]
    assert listed == {"operations": []} and unknown.status_code == 404


async def test_the_api_key_is_required_on_batch_routes() -> None:
    async with sim(SimulatorConfig(api_key="k")) as client:
        missing = await client.get("/v1beta/batches")
        wrong = await client.get("/v1beta/batches", headers={"x-goog-api-key": "nope"})
        right = await client.get("/v1beta/batches", headers={"x-goog-api-key": "k"})
    assert (missing.status_code, wrong.status_code, right.status_code) == (401, 403, 200)
