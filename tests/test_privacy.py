"""api.store: the request's top-level "store" field, seen on the wire at the simulator (online, batch lines,
Vertex AI), refused where Vertex refuses it, and named when an endpoint refuses it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest

import nanobatch
from nanobatch.api.causes import classify_error
from nanobatch.cli.main import main
from nanobatch.config import load_settings
from nanobatch.simulator import SimulatorConfig, create_app, run_in_thread

from .fakes import FakeGemini, image_bytes, inline, ok_body, records, run, sku_job, write_job

MODEL = "gemini-3.1-flash-image"
BATCH_CONFIG = """
retry: {max_attempts: 2, backoff_initial_s: 0.01, backoff_max_s: 0.05}
batch: {chunk_requests: 4, linger_s: 0.2, poll_initial_s: 0.05, poll_max_s: 0.2}
"""


@pytest.fixture
def job(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    return sku_job(tmp_path, monkeypatch, BATCH_CONFIG, 3, model=MODEL)


def cli(job: Path, url: str, *args: str) -> int:
    argv = ["run", str(job), "--base-url", url, "--out", str(job.parent / "out"), "--quiet"]
    return main([*argv, "--config", str(job.parent / "nanobatch.yaml"), *args])


@pytest.mark.parametrize(
    ("setting", "seen"),
    [
        pytest.param(None, "false", id="default-false"),
        pytest.param("true", "true", id="opt-in"),
        pytest.param("null", "absent", id="null-leaves-it-out"),
    ],
)
@pytest.mark.parametrize("tier", ["standard", "batch"])
def test_every_request_and_batch_line_carries_the_store_setting(
    job: Path, monkeypatch: pytest.MonkeyPatch, setting: str | None, seen: str, tier: str
) -> None:
    if setting is not None:
        monkeypatch.setenv("NANOBATCH_API_STORE", setting)
    app = create_app(SimulatorConfig(batch_latency_s=0.2, seed=2))
    with run_in_thread(app=app) as url:
        assert cli(job, url, "--tier", tier) == 0
    assert dict(app.state.stats.store) == {seen: 3}  # each request, or each line of the batch job
    assert (len(app.state.batches._jobs) > 0) == (tier == "batch")
    assert {r["status"] for r in records(job.parent / "out")} == {"ok"}


def test_store_is_inside_each_batch_lines_request_not_the_job(job: Path) -> None:
    """As google-genai 3.6.1 sends it: the job has no such field; each line's request carries it."""
    app = create_app(SimulatorConfig(batch_latency_s=10.0, seed=2))
    with run_in_thread(app=app) as url:
        assert cli(job, url, "--tier", "batch", "--no-wait") == 0
        files = app.state.batches.files
        lines = [json.loads(line) for stored in files._files.values() for line in files.lines(stored) if line.strip()]
    assert len(lines) == 3
    assert all(line["request"]["store"] is False and "store" not in line for line in lines)


def test_vertex_is_never_sent_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    app = create_app(SimulatorConfig(seed=3, api_key="express-key"))
    monkeypatch.setenv("NANOBATCH_API_KEY", "express-key")
    job = write_job(tmp_path, [{"id": "sku-1", "image": "images/1.png"}])
    with run_in_thread(app=app) as url:
        settings = load_settings(env={}, overrides={"api.backend": "vertex", "api.base_url": url, "api.model": MODEL})
        assert settings.api.store is False  # the default, which Vertex does not take: left out
        summary = anyio.run(lambda: nanobatch.run_job(job, settings=settings, out_dir=tmp_path / "out"))
    assert summary.exit_code == 0
    assert dict(app.state.stats.store) == {"absent": 1}


BODY = {
    "contents": [{"role": "user", "parts": [{"text": "make the sky purple"}, inline(image_bytes())]}],
    "generationConfig": {"responseModalities": ["IMAGE"]},
}
GEMINI_PATH = f"/v1beta/models/{MODEL}:generateContent"
VERTEX_PATH = f"/v1/projects/shop-123/locations/global/publishers/google/models/{MODEL}:generateContent"


@pytest.mark.parametrize(
    ("path", "store", "status", "words"),
    [
        pytest.param(GEMINI_PATH, False, 200, None, id="gemini-false"),
        pytest.param(GEMINI_PATH, True, 200, None, id="gemini-true"),
        pytest.param(GEMINI_PATH, "no", 400, "Invalid value at 'store' (TYPE_BOOL)", id="gemini-not-a-bool"),
        pytest.param(VERTEX_PATH, False, 400, 'Unknown name "store"', id="vertex-refuses-it"),
        pytest.param(
            f"/v1/publishers/google/models/{MODEL}:generateContent",
            True,
            400,
            'Unknown name "store"',
            id="vertex-express-refuses-it",
        ),  # fmt: skip
    ],
)
async def test_the_simulator_takes_store_where_google_does(
    path: str, store: Any, status: int, words: str | None
) -> None:
    app = create_app(SimulatorConfig(seed=1))
    async with httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url="http://sim") as client:
        answer = await client.post(path, json={**BODY, "store": store}, headers={"x-goog-api-key": "k"})
    assert answer.status_code == status, answer.text
    if words is not None:
        assert words in answer.json()["error"]["message"]
    else:
        assert dict(app.state.stats.store) == {str(store).lower(): 1}


def test_store_true_on_vertex_is_refused_before_anything_is_sent(
    job: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NANOBATCH_API_STORE", "true")
    monkeypatch.setenv("NANOBATCH_API_BACKEND", "vertex")
    app = create_app(SimulatorConfig())
    with run_in_thread(app=app) as url:
        assert cli(job, url) == 2
    assert app.state.stats.received == 0
    err = capsys.readouterr().err
    assert "NANOBATCH_API_STORE" in err and "api.store" in err and "Vertex AI" in err


def refuses_store(request: httpx2.Request) -> httpx2.Response:
    """An endpoint that does not know the field (a proxy, say), answering as Google's front end does."""
    if "store" in json.loads(request.content):
        message = 'Invalid JSON payload received. Unknown name "store": Cannot find field.'
        violation = {"description": message}
        details = [{"@type": "type.googleapis.com/google.rpc.BadRequest", "fieldViolations": [violation]}]
        error = {"code": 400, "message": message, "status": "INVALID_ARGUMENT", "details": details}
        return httpx2.Response(400, json={"error": error})
    return httpx2.Response(200, json=ok_body())


def test_an_endpoint_refusing_store_stops_the_run_and_points_at_store_null(tmp_path: Path) -> None:
    job = write_job(tmp_path, [{"id": f"sku-{n}", "image": f"images/{n}.png"} for n in range(5)])
    fake = FakeGemini({"make the background white": [refuses_store]})

    summary = run(job, fake, settings=load_settings(env={}, overrides={"limits.concurrency": 1}))

    assert summary.exit_code == 3 and summary.outcome == "aborted"
    assert summary.reason is not None and "api.store: null" in summary.reason and '"store"' in summary.reason
    assert len(fake.requests) == 1  # every request would fail the same way: none more is sent
    assert not (tmp_path / "out" / "results.jsonl").exists() or records(tmp_path / "out") == []

    again = run(job, fake, settings=load_settings(env={"NANOBATCH_API_STORE": "null"}))
    assert again.exit_code == 0 and again.stats.ok == 5
    assert all("store" not in json.loads(r.content) for r in fake.requests[1:])


def test_changing_store_does_not_redo_finished_work(job: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """store decides what Google keeps, not what the picture is: the work key stays, nothing is paid twice."""
    app = create_app(SimulatorConfig(seed=4))
    with run_in_thread(app=app) as url:
        assert cli(job, url) == 0
        monkeypatch.setenv("NANOBATCH_API_STORE", "true")
        assert cli(job, url) == 0
    assert app.state.stats.received == 3 and dict(app.state.stats.store) == {"false": 3}


genai = pytest.importorskip("google.genai")


def test_google_genai_sends_store_and_the_simulator_takes_it() -> None:
    """The official SDK (code we did not write) sends GenerateContentConfig.store: the simulator's Gemini path
    accepts it where the SDK puts it, and sees the value."""
    types = pytest.importorskip("google.genai.types")
    if "store" not in types.GenerateContentConfig.model_fields:
        pytest.skip("this google-genai has no GenerateContentConfig.store")
    app = create_app(SimulatorConfig(seed=6))
    with run_in_thread(app=app) as url:
        client = genai.Client(api_key="sim-key", http_options=types.HttpOptions(base_url=url))
        picture = types.Part.from_bytes(data=image_bytes(), mime_type="image/png")
        answer = client.models.generate_content(
            model=MODEL,
            contents=[picture, "make the sky purple"],
            config=types.GenerateContentConfig(response_modalities=["IMAGE"], store=False),
        )
    assert any(part.inline_data for part in answer.candidates[0].content.parts)
    assert dict(app.state.stats.store) == {"false": 1}


@pytest.mark.parametrize(
    "body",
    [
        pytest.param({"error": {"code": 400, "status": "INVALID_ARGUMENT", "message": 'Unknown name "store"'}},
                     id="google"),
        pytest.param({"error": {"message": "Unrecognized request argument supplied: store",
                                "type": "invalid_request_error"}}, id="openai-style-relay"),
        pytest.param({"status_code": 400, "error": {"message": "store: Extra inputs are not permitted",
                                                    "type": "invalid_request_error", "code": "invalid_argument"}},
                     id="apiyi-pydantic-relay"),
    ],
)  # fmt: skip
def test_each_way_a_proxy_words_refusing_store_points_at_store_null(body: dict[str, Any]) -> None:
    error = classify_error(400, {}, json.dumps(body).encode())
    assert error.kind == "store_refused" and "api.store: null" in error.message


def test_a_400_that_does_not_name_store_is_an_items_own_failure() -> None:
    body = {"error": {"code": 400, "status": "INVALID_ARGUMENT", "message": "The image store is unavailable"}}
    assert classify_error(400, {}, json.dumps(body).encode()).kind != "store_refused"
