"""The official google-genai SDK against the simulator on loopback: the simulator speaks the real protocol.

The SDK was written by Google against the real API, not by us against our
simulator, so a run through it checks the wire format from the other side.
"""

from __future__ import annotations

import base64
import io
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from nanobatch.simulator import SimulatorConfig, run_in_thread

from .fakes import image_bytes

genai = pytest.importorskip("google.genai")
types = pytest.importorskip("google.genai.types")

MODEL = "gemini-3.1-flash-image-preview"
DONE = ("JOB_STATE_SUCCEEDED", "JOB_STATE_FAILED", "JOB_STATE_CANCELLED", "JOB_STATE_EXPIRED")


def request(text: str) -> dict[str, Any]:
    picture = {"inlineData": {"mimeType": "image/png", "data": base64.b64encode(image_bytes()).decode()}}
    return {
        "contents": [{"role": "user", "parts": [{"text": text}, picture]}],
        "generationConfig": {"responseModalities": ["IMAGE"], "imageConfig": {"imageSize": "512"}},
    }


def jsonl(keys: list[str]) -> io.BytesIO:
    lines = (json.dumps({"key": k, "request": request(f"make {k} blue")}) + "\n" for k in keys)
    return io.BytesIO("".join(lines).encode())


@pytest.fixture
def client_at() -> Iterator[Any]:
    """Start a simulator with a SimulatorConfig, return an SDK client pointed at it."""
    with_servers: list[Any] = []

    def start(config: SimulatorConfig) -> Any:
        server = run_in_thread(config)
        url = server.__enter__()
        with_servers.append(server)
        return genai.Client(api_key="sim-key", http_options=types.HttpOptions(base_url=url))

    yield start
    for server in reversed(with_servers):
        server.__exit__(None, None, None)


def wait_done(client: Any, name: str) -> Any:
    """Poll like a user would; the bound only stops a broken test from hanging."""
    for _ in range(500):
        job = client.batches.get(name=name)
        if job.state.name in DONE:
            return job
        time.sleep(0.02)
    raise AssertionError(f"{name} never finished: {job.state}")


def test_upload_create_poll_and_download_through_the_sdk(client_at: Any) -> None:
    client = client_at(SimulatorConfig(batch_latency_s=0.3))
    keys = [f"item-{i}" for i in range(5)]
    uploaded = client.files.upload(
        file=jsonl(keys), config=types.UploadFileConfig(display_name="run-1 chunk 0", mime_type="application/jsonl")
    )
    assert uploaded.name.startswith("files/") and uploaded.state.name == "ACTIVE"
    assert uploaded.display_name == "run-1 chunk 0" and uploaded.size_bytes == len(jsonl(keys).getvalue())

    assert uploaded.name in [f.name for f in client.files.list()]

    job = client.batches.create(model=MODEL, src=uploaded.name, config={"display_name": "run-1 chunk 0"})
    assert job.name.startswith("batches/") and job.state.name == "JOB_STATE_PENDING"
    assert job.display_name == "run-1 chunk 0" and job.model == f"models/{MODEL}"

    done = wait_done(client, job.name)
    assert done.state.name == "JOB_STATE_SUCCEEDED" and done.end_time is not None
    lines = [json.loads(line) for line in client.files.download(file=done.dest.file_name).splitlines()]
    assert sorted(line["key"] for line in lines) == keys
    for line in lines:
        parts = line["response"]["candidates"][0]["content"]["parts"]
        answers = [p for p in parts if "inlineData" in p and not p.get("thought")]
        assert answers and answers[0]["inlineData"]["mimeType"] == "image/png"
        assert int(line["response"]["usageMetadata"]["totalTokenCount"]) > 0

    client.files.delete(name=uploaded.name)
    client.files.delete(name=done.dest.file_name)
    with pytest.raises(genai.errors.ClientError):
        client.files.get(name=uploaded.name)


def test_jobs_are_listed_newest_first_across_pages_and_found_by_display_name(client_at: Any) -> None:
    client = client_at(SimulatorConfig(batch_latency_s=3600))
    uploaded = client.files.upload(file=jsonl(["a"]), config={"mime_type": "application/jsonl"})
    names = [
        client.batches.create(model=MODEL, src=uploaded.name, config={"display_name": f"run-7 chunk {i}"}).name
        for i in range(3)
    ]
    listed = list(client.batches.list(config={"page_size": 1}))  # the pager follows nextPageToken
    assert [job.name for job in listed] == names[::-1]
    assert [job.name for job in listed if job.display_name == "run-7 chunk 1"] == [names[1]]


def test_a_cancelled_job_ends_cancelled_without_results(client_at: Any) -> None:
    client = client_at(SimulatorConfig(batch_latency_s=3600))
    uploaded = client.files.upload(file=jsonl(["a", "b"]), config={"mime_type": "application/jsonl"})
    job = client.batches.create(model=MODEL, src=uploaded.name, config={"display_name": "to cancel"})
    client.batches.cancel(name=job.name)
    cancelled = client.batches.get(name=job.name)
    assert cancelled.state.name == "JOB_STATE_CANCELLED" and cancelled.dest is None


@pytest.mark.parametrize(("fault", "state"), [("failed", "JOB_STATE_FAILED"), ("expired", "JOB_STATE_EXPIRED")])
def test_a_job_that_fails_or_expires_has_no_results(client_at: Any, fault: str, state: str) -> None:
    client = client_at(SimulatorConfig(batch_latency_s=0.2, **{f"batch_rate_{fault}": 1.0}))
    uploaded = client.files.upload(file=jsonl(["a"]), config={"mime_type": "application/jsonl"})
    job = client.batches.create(model=MODEL, src=uploaded.name, config={"display_name": fault})
    done = wait_done(client, job.name)
    assert done.state.name == state and done.dest is None


def test_a_lost_create_reply_still_made_the_job(client_at: Any) -> None:
    client = client_at(SimulatorConfig(batch_latency_s=3600, batch_rate_lost_create=1.0))
    uploaded = client.files.upload(file=jsonl(["a"]), config={"mime_type": "application/jsonl"})
    with pytest.raises(genai.errors.ServerError):
        client.batches.create(model=MODEL, src=uploaded.name, config={"display_name": "run-9 chunk 0"})
    (found,) = [job for job in client.batches.list() if job.display_name == "run-9 chunk 0"]
    assert found.state.name == "JOB_STATE_PENDING"


def test_line_errors_come_back_through_the_sdk_as_status_objects(client_at: Any) -> None:
    client = client_at(SimulatorConfig(batch_latency_s=0.2, batch_rate_line_error=1.0))
    uploaded = client.files.upload(file=jsonl(["a", "b"]), config={"mime_type": "application/jsonl"})
    job = client.batches.create(model=MODEL, src=uploaded.name, config={"display_name": "errors"})
    done = wait_done(client, job.name)
    assert done.state.name == "JOB_STATE_SUCCEEDED"  # a job succeeds even when every line failed
    lines = [json.loads(line) for line in client.files.download(file=done.dest.file_name).splitlines()]
    assert sorted(line["key"] for line in lines) == ["a", "b"] and not any("response" in line for line in lines)
    assert all(isinstance(line["error"]["code"], int) and line["error"]["message"] for line in lines)
