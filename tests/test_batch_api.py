"""BatchClient against the simulator in process (httpx2.ASGITransport), on a clock moved by hand."""

from __future__ import annotations

import base64
import gc
import json
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx2
import pytest

from nanobatch.api.batch_api import BatchClient, BatchJob, ResultLine, parse_job
from nanobatch.errors import ApiError, FatalApiError
from nanobatch.simulator import SimulatorConfig, create_app, run_in_thread

from .fakes import image_bytes

MODEL = "gemini-3.1-flash-image-preview"
KEY = "sim-secret-key"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Recording(httpx2.AsyncBaseTransport):
    """Passes requests on to *inner*, remembering them; can lose the reply to the n-th upload chunk."""

    def __init__(self, inner: httpx2.AsyncBaseTransport, *, lose_chunk: int | None = None) -> None:
        self.inner = inner
        self.requests: list[httpx2.Request] = []
        self.lose_chunk = lose_chunk

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        self.requests.append(request)
        response = await self.inner.handle_async_request(request)
        if request.headers.get("x-goog-upload-command", "").startswith("upload"):
            chunk = sum(1 for r in self.requests if r.headers.get("x-goog-upload-command", "").startswith("upload"))
            if chunk == self.lose_chunk:
                raise httpx2.ReadError("connection reset by peer")
        return response

    def chunks(self) -> list[httpx2.Request]:
        return [r for r in self.requests if r.headers.get("x-goog-upload-command", "").startswith("upload")]


def request_line(key: str, text: str = "make it blue") -> dict[str, Any]:
    picture = {"inlineData": {"mimeType": "image/png", "data": base64.b64encode(image_bytes()).decode()}}
    return {
        "key": key,
        "request": {
            "contents": [{"role": "user", "parts": [{"text": text}, picture]}],
            "generationConfig": {"responseModalities": ["IMAGE"], "imageConfig": {"imageSize": "512"}},
        },
    }


def write_jsonl(path: Path, lines: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


@asynccontextmanager
async def batch_client(
    config: SimulatorConfig | None = None, *, clock: Clock | None = None, key: str = KEY, **options: Any
) -> AsyncIterator[tuple[BatchClient, Any, Recording]]:
    app = create_app(config or SimulatorConfig(api_key=KEY, batch_latency_s=100), clock=clock or Clock())
    transport = Recording(httpx2.ASGITransport(app=app), lose_chunk=options.pop("lose_chunk", None))
    async with BatchClient(base_url="http://sim", api_key=key, transport=transport, **options) as client:
        yield client, app, transport


def stored_bytes(app: Any, name: str) -> bytes:
    stored = app.state.batches.files.get(name)
    assert stored is not None
    return bytes(stored.path.read_bytes())


async def test_a_file_is_uploaded_in_chunks_of_the_configured_size(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "chunk.jsonl", [request_line(f"k{i}") for i in range(4)])
    async with batch_client(chunk_bytes=256) as (client, app, transport):
        name = await client.upload(path, display_name="run-1 chunk 0")
    assert name.startswith("files/") and stored_bytes(app, name) == path.read_bytes()
    chunks = transport.chunks()
    assert len(chunks) == -(-path.stat().st_size // 256) and max(len(c.content) for c in chunks) == 256
    assert [c.headers["x-goog-upload-command"] for c in chunks][-2:] == ["upload", "upload, finalize"]


async def test_the_whole_round_over_real_sockets(tmp_path: Path) -> None:
    keys = [f"k{i}" for i in range(3)]
    path = write_jsonl(tmp_path / "chunk.jsonl", [request_line(k) for k in keys])
    with run_in_thread(SimulatorConfig(batch_latency_s=0)) as url:
        async with BatchClient(base_url=url, api_key=None, chunk_bytes=1024) as client:
            file_name = await client.upload(path, display_name="run-3 chunk 0")
            job = await client.create(MODEL, file_name=file_name, display_name="run-3 chunk 0")
            done = await client.get(job.name)
            assert done.responses_file is not None
            keys_back = sorted([line.key async for line in client.results(done.responses_file) if line.reply])
            await client.delete_file(file_name)
            await client.delete_file(done.responses_file)
            await client.delete_job(job.name)
            assert await client.find("run-3 chunk 0") == []
    assert done.state == "succeeded" and keys_back == keys


async def test_an_upload_whose_chunk_reply_is_lost_resumes_where_the_server_stands(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "chunk.jsonl", [request_line(f"k{i}") for i in range(3)])
    async with batch_client(chunk_bytes=256, lose_chunk=2) as (client, app, transport):
        name = await client.upload(path, display_name="run-1 chunk 0")
    assert stored_bytes(app, name) == path.read_bytes()
    assert any(r.headers.get("x-goog-upload-command") == "query" for r in transport.requests)


async def test_an_upload_whose_last_reply_is_lost_still_names_its_one_file(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "chunk.jsonl", [request_line("k")])
    last = -(-path.stat().st_size // 256)
    async with batch_client(chunk_bytes=256, lose_chunk=last) as (client, app, transport):
        name = await client.upload(path, display_name="run-1 chunk 0")
    assert stored_bytes(app, name) == path.read_bytes()
    assert len(transport.chunks()) == last and len(list(app.state.batches.files.folder.iterdir())) == 1


async def test_a_simulator_that_stores_no_file_leaves_no_folder_and_one_that_does_removes_its_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A killed simulator process cannot clean up, so one that was never sent a file must not have made a folder.
    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    path = write_jsonl(tmp_path / "chunk.jsonl", [request_line("k")])
    async with batch_client() as (client, app, transport):
        assert await client.find("run-1 chunk 0") == [] and list(temp.iterdir()) == []
        await client.upload(path, display_name="run-1 chunk 0")
        assert [p.name[:19] for p in temp.iterdir()] == ["nanobatch-sim-files"]
    del client, app, transport
    gc.collect()  # the app is gone: its folder goes with it
    assert list(temp.iterdir()) == []


async def test_a_job_goes_pending_running_succeeded_and_its_results_stream_back(tmp_path: Path) -> None:
    clock = Clock()
    keys = [f"item-{i}" for i in range(70)]  # more than one block of the simulator's reordering
    path = write_jsonl(tmp_path / "chunk.jsonl", [request_line(k) for k in keys])
    async with batch_client(clock=clock) as (client, app, _):
        file_name = await client.upload(path, display_name="run-1 chunk 0")
        job = await client.create(MODEL, file_name=file_name, display_name="run-1 chunk 0")
        assert (job.state, job.request_count, job.pending_count, job.done) == ("pending", 70, 70, False)
        clock.now += 50
        assert (await client.get(job.name)).state == "running"
        clock.now += 50
        done = await client.get(job.name)
        assert (done.state, done.successful_count, done.failed_count, done.done) == ("succeeded", 70, 0, True)
        assert done.responses_file is not None
        lines = [line async for line in client.results(done.responses_file)]
        await client.delete_file(file_name)
        await client.delete_file(done.responses_file)
        await client.delete_file(done.responses_file)  # already gone: fine
        assert app.state.batches.files.get(file_name) is None
    assert sorted(line.key for line in lines if line.key) == sorted(keys)
    assert [line.key for line in lines] != keys  # "in any order": callers must match by key
    assert all(line.reply is not None and line.reply.images and line.error is None for line in lines)
    assert all(line.reply and line.reply.usage.get("totalTokenCount") for line in lines)


async def test_a_lost_create_reply_is_found_again_by_display_name(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "chunk.jsonl", [request_line("a")])
    config = SimulatorConfig(api_key=KEY, batch_rate_lost_create=1.0)
    async with batch_client(config) as (client, _, _):
        file_name = await client.upload(path, display_name="x")
        for i in range(3):
            with pytest.raises(ApiError) as caught:
                await client.create(MODEL, file_name=file_name, display_name=f"run-2 chunk {i}")
            assert caught.value.retryable
        jobs = [job async for job in client.jobs(page_size=1)]
        found = await client.find("run-2 chunk 1")
    assert [job.display_name for job in jobs] == ["run-2 chunk 2", "run-2 chunk 1", "run-2 chunk 0"]
    assert len(found) == 1 and found[0].name == jobs[1].name and found[0].state == "pending"


async def test_line_errors_come_back_classified_like_online_errors(tmp_path: Path) -> None:
    clock = Clock()
    lines = [request_line("good"), {"key": "bad", "request": {"contents": []}}]
    path = write_jsonl(tmp_path / "chunk.jsonl", lines)
    async with batch_client(SimulatorConfig(api_key=KEY, batch_rate_line_error=1.0), clock=clock) as (client, _, _):
        job = await client.create(MODEL, file_name=await client.upload(path, display_name="x"), display_name="errors")
        clock.now += 60
        done = await client.get(job.name)
        assert done.responses_file is not None
        results = {line.key: line async for line in client.results(done.responses_file)}
    assert (done.state, done.failed_count) == ("succeeded", 2)
    good, bad = results["good"].error, results["bad"].error
    assert good is not None and good.retryable and good.kind == "server_error"
    assert bad is not None and not bad.retryable and bad.kind == "bad_request"


@pytest.mark.parametrize(
    ("config", "state"),
    [
        pytest.param({"batch_rate_failed": 1.0}, "failed", id="failed"),
        pytest.param({"batch_rate_expired": 1.0}, "expired", id="expired"),
    ],
)
async def test_a_job_that_fails_or_expires_says_so_and_has_no_results(
    tmp_path: Path, config: dict[str, float], state: str
) -> None:
    clock = Clock()
    path = write_jsonl(tmp_path / "chunk.jsonl", [request_line("a")])
    async with batch_client(SimulatorConfig(api_key=KEY, **config), clock=clock) as (client, _, _):
        job = await client.create(MODEL, file_name=await client.upload(path, display_name="x"), display_name="j")
        clock.now += 60
        done = await client.get(job.name)
    assert (done.state, done.done, done.responses_file) == (state, True, None)
    assert done.error


async def test_a_cancelled_job_is_done_and_cancelled(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "chunk.jsonl", [request_line("a")])
    async with batch_client() as (client, _, _):
        job = await client.create(MODEL, file_name=await client.upload(path, display_name="x"), display_name="j")
        await client.cancel(job.name)
        cancelled = await client.get(job.name)
    assert (cancelled.state, cancelled.done, cancelled.responses_file) == ("cancelled", True, None)


async def test_a_wrong_key_stops_at_the_first_call(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "chunk.jsonl", [request_line("a")])
    async with batch_client(key="wrong-key-123") as (client, _, _):
        with pytest.raises(FatalApiError) as caught:
            await client.upload(path, display_name="x")
    assert caught.value.kind == "permission" and "wrong-key-123" not in str(caught.value)


async def test_an_endpoint_without_the_batch_api_fails_before_any_chunk_is_sent(tmp_path: Path) -> None:
    seen: list[httpx2.Request] = []

    def proxy(request: httpx2.Request) -> httpx2.Response:
        seen.append(request)
        return httpx2.Response(404, text="<html>Not Found</html>")

    path = write_jsonl(tmp_path / "chunk.jsonl", [request_line("a")])
    async with BatchClient(base_url="http://proxy", api_key=KEY, transport=httpx2.MockTransport(proxy)) as client:
        with pytest.raises(FatalApiError) as caught:
            await client.upload(path, display_name="x")
    assert caught.value.kind == "not_found" and len(seen) == 1


async def test_every_kind_of_results_line_becomes_a_reply_or_a_classified_error() -> None:
    good = {"candidates": [{"content": {"parts": [{"inlineData": {"mimeType": "image/png",
            "data": base64.b64encode(image_bytes()).decode()}}]}, "finishReason": "STOP"}],
            "usageMetadata": {"totalTokenCount": 7}}  # fmt: skip
    quota = {"code": 8, "status": "RESOURCE_EXHAUSTED", "message": "slow down",
             "details": [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "30s"}]}  # fmt: skip
    lines = [
        json.dumps({"key": "ok", "response": good}),
        json.dumps({"key": "busy", "error": quota}),
        json.dumps({"key": "odd", "response": {"candidates": "nope"}}),
        "not json at all",
        "",
    ]
    body = "\n".join(lines).encode()

    def files(request: httpx2.Request) -> httpx2.Response:
        assert request.url.path == "/download/v1beta/files/out:download" and request.url.params["alt"] == "media"
        return httpx2.Response(200, content=body)

    async with BatchClient(base_url="http://api", api_key=KEY, transport=httpx2.MockTransport(files)) as client:
        results = [line async for line in client.results("files/out")]
    ok, busy, odd, garbage = results
    assert ok.key == "ok" and ok.reply is not None and len(ok.reply.images) == 1
    assert ok.reply.usage == {"totalTokenCount": 7}  # verbatim
    assert busy.error is not None and busy.error.kind == "rate_limited" and busy.error.retry_after == 30
    assert odd.error is not None and odd.error.kind == "bad_response"
    assert garbage.key is None and garbage.error is not None and garbage.error.kind == "bad_response"


@pytest.mark.parametrize(("code", "kind"), [(5, "not_found"), (7, "permission"), (16, "auth")])
async def test_a_results_lines_error_is_that_requests_failure_never_the_runs(code: int, kind: str) -> None:
    # Online, a 404, 403 or 401 means no request can succeed (a wrong model, key or project): the run stops. In
    # a results file it is one request's outcome (its input gone, say): its item fails, the others go on, and
    # no hint about the key or the model id, which were fine for the rest of the job.
    line = {"key": "k", "error": {"code": code, "message": "Requested entity was not found.", "status": "X"}}

    def files(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(200, content=json.dumps(line).encode())

    async with BatchClient(base_url="http://api", api_key=KEY, transport=httpx2.MockTransport(files)) as client:
        (result,) = [line async for line in client.results("files/out")]
    assert result.error is not None and not isinstance(result.error, FatalApiError)
    assert result.error.kind == kind and not result.error.retryable and "hint" not in result.error.message


async def test_a_proxy_answering_200_with_a_web_page_gets_an_error_naming_the_endpoint() -> None:
    def proxy(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(200, text="<html>Welcome to our API portal</html>")

    async with BatchClient(base_url="http://proxy", api_key=KEY, transport=httpx2.MockTransport(proxy)) as client:
        with pytest.raises(ApiError, match="http://proxy/v1beta/batches/x.*Batch API"):
            await client.get("batches/x")


@pytest.mark.parametrize(
    ("operation", "expected"),
    [
        pytest.param(
            {"name": "batches/1", "metadata": {"state": "BATCH_STATE_RUNNING", "displayName": "r",
             "batchStats": {"requestCount": "5", "pendingRequestCount": "2", "successfulRequestCount": "3"}}},
            BatchJob(name="batches/1", display_name="r", state="running", request_count=5, pending_count=2,
                     successful_count=3),
            id="counts-as-strings",
        ),
        pytest.param(
            {"name": "batches/2", "metadata": {"state": "JOB_STATE_SUCCEEDED", "displayName": "s",
             "batchStats": {"requestCount": 1, "successfulRequestCount": 1}, "output": {"responsesFile": "files/o"}},
             "done": True},
            BatchJob(name="batches/2", display_name="s", state="succeeded", request_count=1, successful_count=1,
                     responses_file="files/o"),
            id="job-state-spelling",
        ),
        pytest.param(
            {"name": "batches/3", "metadata": {"state": "BATCH_STATE_FAILED", "displayName": "f"}, "done": True,
             "error": {"code": 13, "message": "internal"}},
            BatchJob(name="batches/3", display_name="f", state="failed", error="internal"),
            id="failed-with-error",
        ),
    ],
)  # fmt: skip
def test_parse_job(operation: dict[str, Any], expected: BatchJob) -> None:
    assert parse_job(operation) == expected


def test_result_lines_are_values() -> None:
    assert ResultLine(key="a") == ResultLine(key="a", reply=None, error=None)


async def test_a_results_file_that_quotes_the_key_reaches_the_disk_without_it(tmp_path: Path) -> None:
    # A proxy's error line that quotes the request's key: the file is kept on disk for days (the batch folder);
    # the key must not be in it, even where the download's pieces split it in two.
    line = {"key": "k", "error": {"code": 7, "message": f"key {KEY} has no balance left", "status": "X"}}
    body = (json.dumps(line) + "\n").encode() * 3
    at = body.index(KEY.encode()) + 3

    class Split(httpx2.AsyncByteStream):
        async def __aiter__(self) -> AsyncIterator[bytes]:
            for piece in (body[:at], body[at:]):
                yield piece

    def files(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(200, stream=Split())

    async with BatchClient(base_url="http://api", api_key=KEY, transport=httpx2.MockTransport(files)) as client:
        await client.download("files/out", tmp_path / "out.jsonl")
    written = (tmp_path / "out.jsonl").read_bytes()
    assert KEY.encode() not in written and written.count(b"has no balance left") == 3
    assert [json.loads(text)["error"]["message"] for text in written.splitlines()] == [
        "key [redacted] has no balance left"
    ] * 3
