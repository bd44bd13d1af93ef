"""The simulator's protocol: validation, auth, quotas, faults, thinking parts, usage, determinism."""

from __future__ import annotations

import base64
import hashlib
import io
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx2
import pytest
from PIL import Image
from starlette.applications import Starlette

import nanobatch.simulator as simulator
from nanobatch.models import INPUT_IMAGE_TOKENS, lookup
from nanobatch.simulator import SimulatedDrop, SimulatorConfig, create_app

from .fakes import inline

FLASH_31 = "gemini-3.1-flash-image"
PRO_3 = "gemini-3-pro-image"
FLASH_25 = "gemini-2.5-flash-image"

# These tests exercise 2.5 flash image (no image sizes, no thinking), live until 2026-10-02.
pytestmark = pytest.mark.usefixtures("before_2_5_flash_shutdown")


def png(size: tuple[int, int] = (48, 32), colour: tuple[int, int, int] = (30, 120, 200)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, "PNG")
    return buffer.getvalue()


def body(text: str = "Make it pop", *images: bytes, size: str | None = "512", **image_config: Any) -> dict[str, Any]:
    config = {"imageSize": size, **image_config} if size else image_config
    return {
        "contents": [{"role": "user", "parts": [{"text": text}, *(inline(i) for i in images)]}],
        "generationConfig": {"responseModalities": ["IMAGE"], "imageConfig": config},
    }


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@asynccontextmanager
async def client_for(app: Starlette) -> AsyncIterator[httpx2.AsyncClient]:
    async with httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url="http://sim") as client:
        yield client


async def generate(
    client: httpx2.AsyncClient, payload: dict[str, Any], model: str = FLASH_31, **kwargs: Any
) -> httpx2.Response:
    return await client.post(f"/v1beta/models/{model}:generateContent", json=payload, **kwargs)


def answer_parts(response: httpx2.Response) -> list[dict[str, Any]]:
    parts: list[dict[str, Any]] = response.json()["candidates"][0]["content"]["parts"]
    return [p for p in parts if not p.get("thought")]


def assert_google_error(response: httpx2.Response, code: int, status: str) -> str:
    assert response.status_code == code
    error = response.json()["error"]
    assert error["code"] == code and error["status"] == status
    assert isinstance(error["message"], str) and error["message"]
    return str(error["message"])


def test_public_names_match_all() -> None:
    public = {name for name in dir(simulator) if not name.startswith("_")} - {"annotations"}
    modules = {"app", "batch", "config", "errors", "faults", "files", "flaws", "imaging", "responses", "server"}
    modules |= {"validation"}
    assert sorted(simulator.__all__) == simulator.__all__
    assert public - modules == set(simulator.__all__)


async def test_valid_edit_answers_like_the_api() -> None:
    async with client_for(create_app()) as client:
        response = await generate(client, body("Make it pop", png()))
    assert response.status_code == 200
    data = response.json()
    candidate = data["candidates"][0]
    assert candidate["finishReason"] == "STOP" and candidate["content"]["role"] == "model"
    assert data["modelVersion"] == FLASH_31 and data["responseId"]
    (image,) = answer_parts(response)
    assert image["inlineData"]["mimeType"] == "image/png"
    assert base64.b64decode(image["inlineData"]["data"]).startswith(b"\x89PNG")


BAD_REQUESTS = [
    pytest.param(FLASH_31, b"{not json", id="not-json"),
    pytest.param(FLASH_31, b"[1, 2]", id="json-not-object"),
    pytest.param(FLASH_31, {}, id="no-contents"),
    pytest.param(FLASH_31, {"contents": []}, id="empty-contents"),
    pytest.param(FLASH_31, {"contents": [{"parts": []}]}, id="empty-parts"),
    pytest.param(FLASH_31, {"contents": [{"parts": [{"video": "x"}]}]}, id="unknown-part-field"),
    pytest.param(FLASH_31, {"contents": [{"parts": [{"thought": True}]}]}, id="part-without-data"),
    pytest.param(FLASH_31, {"contents": [{"parts": [{"fileData": {"fileUri": "x"}}]}]}, id="file-data-part"),
    pytest.param(FLASH_31, {"contents": [{"role": "assistant", "parts": [{"text": "x"}]}]}, id="bad-role"),
    pytest.param(
        FLASH_31, {"contents": [{"parts": [{"inlineData": {"mimeType": "image/png", "data": "!!!"}}]}]}, id="bad-base64"
    ),
    pytest.param(FLASH_31, {"contents": [{"parts": [inline(b"hello, not an image")]}]}, id="not-an-image"),
    pytest.param(FLASH_31, {"contents": [{"parts": [inline(png(), "text/plain")]}]}, id="not-an-image-mime-type"),
    pytest.param(FLASH_31, {"contents": [{"parts": [{"text": "x"}]}], "generation_confg": {}}, id="unknown-field"),
    pytest.param(FLASH_31, body(size=None, aspectRatio="7:3"), id="unknown-aspect-ratio"),
    pytest.param(PRO_3, body(size=None, aspectRatio="1:8"), id="ratio-of-another-model"),
    pytest.param(PRO_3, body(size="512"), id="size-of-another-model"),
    pytest.param(FLASH_31, body(size="1k"), id="lowercase-size"),
    pytest.param(FLASH_25, body(size="1K"), id="any-size-on-2.5-flash"),
    pytest.param(FLASH_31, {**body(), "generationConfig": {"responseModalities": ["AUDIO"]}}, id="bad-modality"),
    pytest.param(FLASH_31, {**body(), "generationConfig": {"candidateCount": 2}}, id="several-candidates"),
    pytest.param(FLASH_25, body("x", png(), png(), png(), png(), size=None), id="too-many-images"),
]


@pytest.mark.parametrize(("model", "payload"), BAD_REQUESTS)
async def test_invalid_requests_get_400_in_googles_format(model: str, payload: dict[str, Any] | bytes) -> None:
    app = create_app()
    async with client_for(app) as client:
        if isinstance(payload, bytes):
            response = await client.post(f"/v1beta/models/{model}:generateContent", content=payload)
        else:
            response = await generate(client, payload, model)
    assert_google_error(response, 400, "INVALID_ARGUMENT")
    assert set(response.json()["error"]) == {"code", "message", "status"}
    assert app.state.stats.by_status == {400: 1}


async def test_snake_case_and_url_safe_base64_are_accepted_like_the_api() -> None:
    data = base64.urlsafe_b64encode(png()).decode().rstrip("=")
    payload = {
        "contents": [{"parts": [{"text": "x"}, {"inline_data": {"mime_type": "image/png", "data": data}}]}],
        "generation_config": {"response_modalities": ["IMAGE"], "image_config": {"aspect_ratio": "4:3"}},
    }
    async with client_for(create_app()) as client:
        response = await generate(client, payload, FLASH_25)
    assert response.status_code == 200


@pytest.mark.parametrize(
    ("path", "fragment"),
    [
        pytest.param("/v1beta/models/gemini-9-ultra-image:generateContent", "models/gemini-9-ultra-image is not found"),
        pytest.param(f"/v9/models/{FLASH_31}:generateContent", "API version v9"),
        pytest.param(f"/v1beta/models/{FLASH_31}:streamGenerateContent", "not supported"),
    ],
)
async def test_unknown_models_and_methods_get_404(path: str, fragment: str) -> None:
    async with client_for(create_app()) as client:
        response = await client.post(path, json=body())
    assert fragment in assert_google_error(response, 404, "NOT_FOUND")


@pytest.mark.parametrize(
    ("headers", "params", "code"),
    [
        pytest.param({}, {}, 401, id="missing"),
        pytest.param({"Authorization": "Bearer wrong-key"}, {}, 403, id="wrong-bearer"),
        pytest.param({"x-goog-api-key": "wrong-key"}, {}, 403, id="wrong-goog-key"),
        pytest.param({"Authorization": "Bearer s3cret-key"}, {}, 200, id="bearer"),
        pytest.param({"x-goog-api-key": "s3cret-key"}, {}, 200, id="x-goog-api-key"),
        pytest.param({}, {"key": "s3cret-key"}, 200, id="query-key"),
    ],
)
async def test_api_key_is_required_when_configured(headers: dict[str, str], params: dict[str, str], code: int) -> None:
    async with client_for(create_app(SimulatorConfig(api_key="s3cret-key"))) as client:
        response = await generate(client, body(), headers=headers, params=params)
    assert response.status_code == code
    if code != 200:
        assert_google_error(response, code, "UNAUTHENTICATED" if code == 401 else "PERMISSION_DENIED")
    assert "s3cret-key" not in response.text


def quota_details(response: httpx2.Response) -> tuple[str, str | None]:
    """The quotaId of the QuotaFailure, and the retryDelay of the RetryInfo (None when absent)."""
    details = {d["@type"].rsplit(".", 1)[-1]: d for d in response.json()["error"]["details"]}
    delay = details["RetryInfo"]["retryDelay"] if "RetryInfo" in details else None
    return details["QuotaFailure"]["violations"][0]["quotaId"], delay


@pytest.mark.parametrize(("time_scale", "advance", "delay"), [(1.0, 12.655, "47.345s"), (0.5, 10.0, "20s")])
async def test_rpm_limit_answers_429_with_the_exact_wait(time_scale: float, advance: float, delay: str) -> None:
    clock = FakeClock()
    app = create_app(SimulatorConfig(rpm_limit=2, time_scale=time_scale), clock=clock)
    async with client_for(app) as client:
        assert (await generate(client, body())).status_code == 200
        assert (await generate(client, body())).status_code == 200
        clock.now += advance
        refused = await generate(client, body())
        assert_google_error(refused, 429, "RESOURCE_EXHAUSTED")
        assert quota_details(refused) == ("GenerateRequestsPerMinutePerProjectPerModel", delay)
        clock.now += 60 * time_scale - advance
        assert (await generate(client, body())).status_code == 200


async def test_daily_limit_answers_429_that_waiting_does_not_fix() -> None:
    clock = FakeClock()
    app = create_app(SimulatorConfig(daily_limit=2), clock=clock)
    async with client_for(app) as client:
        assert [(await generate(client, body())).status_code for _ in range(2)] == [200, 200]
        for _ in range(2):
            refused = await generate(client, body())
            assert_google_error(refused, 429, "RESOURCE_EXHAUSTED")
            assert quota_details(refused) == ("GenerateRequestsPerDayPerProjectPerModel", None)
            clock.now += 3600


@pytest.mark.parametrize(
    ("kind", "code", "status"),
    [
        ("429", 429, "RESOURCE_EXHAUSTED"),
        ("503", 503, "UNAVAILABLE"),
        ("500", 500, "INTERNAL"),
        ("504", 504, "DEADLINE_EXCEEDED"),
    ],
)
async def test_error_faults_answer_in_googles_format(kind: str, code: int, status: str) -> None:
    fault: dict[str, Any] = {f"rate_{kind}": 1.0}
    app = create_app(SimulatorConfig(**fault, time_scale=0.01))
    async with client_for(app) as client:
        response = await generate(client, body())
    assert_google_error(response, code, status)
    if kind == "429":
        (info,) = response.json()["error"]["details"]
        assert info == {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "0.020s"}
    assert app.state.stats.faults == {kind: 1}


async def test_drop_fault_raises_the_error_a_socket_client_would_see() -> None:
    app = create_app(SimulatorConfig(rate_drop=1.0))
    async with client_for(app) as client:
        with pytest.raises(httpx2.RemoteProtocolError) as caught:
            await generate(client, body())
    assert isinstance(caught.value, SimulatedDrop)
    assert app.state.stats.dropped == 1 and not app.state.stats.by_status


@pytest.mark.parametrize("reason", ["IMAGE_SAFETY", "NO_IMAGE"])
async def test_no_image_faults_answer_200_with_the_finish_reason(reason: str) -> None:
    fault: dict[str, Any] = {f"rate_{reason.lower()}": 1.0}
    async with client_for(create_app(SimulatorConfig(**fault))) as client:
        response = await generate(client, body("x", png()))
    assert response.status_code == 200
    candidate = response.json()["candidates"][0]
    assert candidate["finishReason"] == reason and candidate["finishMessage"]
    assert "content" not in candidate


async def test_text_only_fault_answers_stop_with_text_and_no_image() -> None:
    async with client_for(create_app(SimulatorConfig(rate_text_only=1.0))) as client:
        response = await generate(client, body("x", png()))
    assert response.json()["candidates"][0]["finishReason"] == "STOP"
    assert [list(p) for p in answer_parts(response)] == [["text", "thoughtSignature"]]


async def test_blocked_fault_answers_with_prompt_feedback_and_no_candidates() -> None:
    async with client_for(create_app(SimulatorConfig(rate_blocked=1.0))) as client:
        data = (await generate(client, body("x", png()))).json()
    assert data["promptFeedback"] == {"blockReason": "PROHIBITED_CONTENT"}
    assert "candidates" not in data


async def test_thinking_models_send_thoughts_and_draft_images_before_the_image() -> None:
    async with client_for(create_app(SimulatorConfig(seed=3))) as client:
        responses = [await generate(client, body("Make it pop", png())) for _ in range(12)]
    drafts = 0
    for response in responses:
        parts = response.json()["candidates"][0]["content"]["parts"]
        assert parts[0]["thought"] is True and "text" in parts[0]
        images = [i for i, p in enumerate(parts) if "inlineData" in p]
        final = images[-1]
        assert "thought" not in parts[final] and parts[final]["thoughtSignature"]
        for index in images[:-1]:
            assert parts[index]["thought"] is True and index < final
            draft, result = (
                Image.open(io.BytesIO(base64.b64decode(parts[i]["inlineData"]["data"]))) for i in (index, final)
            )
            assert draft.size[0] < result.size[0]
            drafts += 1
        assert response.json()["usageMetadata"]["thoughtsTokenCount"] > 0
    assert 0 < drafts < len(responses)  # "sometimes"


async def test_2_5_flash_sends_no_thoughts() -> None:
    async with client_for(create_app()) as client:
        response = await generate(client, body("x", png(), size=None), FLASH_25)
    parts = response.json()["candidates"][0]["content"]["parts"]
    assert not any("thought" in p or "thoughtSignature" in p for p in parts)
    assert "thoughtsTokenCount" not in response.json()["usageMetadata"]


@pytest.mark.parametrize(
    ("modalities", "kinds"),
    [(["IMAGE"], ["inlineData"]), (["TEXT", "IMAGE"], ["text", "inlineData"]), (["TEXT"], ["text"])],
)
async def test_response_modalities_decide_the_parts(modalities: list[str], kinds: list[str]) -> None:
    payload = body("x", png(), size=None)
    payload["generationConfig"]["responseModalities"] = modalities
    async with client_for(create_app()) as client:
        response = await generate(client, payload, FLASH_25)
    assert [next(iter(p)) for p in answer_parts(response)] == kinds


@pytest.mark.parametrize(("model", "size"), [(FLASH_31, "1K"), (FLASH_31, "512"), (PRO_3, "1K"), (FLASH_25, None)])
async def test_usage_adds_up(model: str, size: str | None) -> None:
    text = "Replace the background with pure white; keep the product unchanged"
    payload = body(text, png(), png(), size=size)
    payload["generationConfig"]["responseModalities"] = ["TEXT", "IMAGE"]
    async with client_for(create_app()) as client:
        response = await generate(client, payload, model)
    usage = response.json()["usageMetadata"]
    reply = answer_parts(response)[0]["text"]
    info = lookup(model)
    assert info is not None
    assert usage["promptTokenCount"] == math.ceil(len(text) / 4) + 2 * INPUT_IMAGE_TOKENS
    assert usage["candidatesTokenCount"] == info.output_tokens(size) + math.ceil(len(reply) / 4)
    thoughts = usage.get("thoughtsTokenCount", 0)
    assert (thoughts > 0) == info.supports_thinking
    assert usage["totalTokenCount"] == usage["promptTokenCount"] + usage["candidatesTokenCount"] + thoughts
    for key in ("prompt", "candidates"):
        assert sum(d["tokenCount"] for d in usage[f"{key}TokensDetails"]) == usage[f"{key}TokenCount"]
    assert {d["modality"] for d in usage["candidatesTokensDetails"]} == {"TEXT", "IMAGE"}


async def run_sequence(config: SimulatorConfig) -> list[tuple[int, str, str]]:
    """Status, responseId and a hash of the image for ten requests, one after another."""
    seen = []
    async with client_for(create_app(config)) as client:
        for _ in range(10):
            try:
                response = await generate(client, body("x", png()))
            except SimulatedDrop:
                seen.append((0, "", ""))
                continue
            data = response.json() if response.status_code == 200 else {}
            images = [
                p["inlineData"]["data"]
                for p in data.get("candidates", [{}])[0].get("content", {}).get("parts", [])
                if "inlineData" in p
            ]
            digest = hashlib.sha256("".join(images).encode()).hexdigest()
            seen.append((response.status_code, data.get("responseId", ""), digest))
    return seen


async def test_a_seed_replays_the_same_run() -> None:
    config = SimulatorConfig(
        seed=42,
        latency="lognormal",
        latency_s=30,
        latency_spread=0.5,
        time_scale=0,
        rate_503=0.2,
        rate_drop=0.1,
        rate_no_image=0.1,
    )
    first = await run_sequence(config)
    assert first == await run_sequence(config)
    assert first != await run_sequence(SimulatorConfig(seed=43, rate_503=0.2, rate_drop=0.1, rate_no_image=0.1))
    assert len({status for status, _, _ in first}) > 1


async def test_a_seed_replays_the_same_bad_images_for_the_output_checks() -> None:
    config = SimulatorConfig(seed=7, rate_qa_grey=0.3, rate_qa_small_subject=0.3)
    first = await run_sequence(config)
    assert first == await run_sequence(config)
    assert len({digest for _, _, digest in first}) > 1  # good and bad images, in the order the seed draws them
    app = create_app(config)
    async with client_for(app) as client:
        for _ in range(3):
            await generate(client, body("x", png()))
    assert set(app.state.stats.faults) <= {"qa_grey", "qa_small_subject"} and app.state.stats.faults


async def test_latency_is_slept_scaled_by_time_scale() -> None:
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    app = create_app(SimulatorConfig(latency_s=40, time_scale=0.01, rate_503=0.5, seed=1), sleep=sleep)
    async with client_for(app) as client:
        statuses = [(await generate(client, body())).status_code for _ in range(8)]
    assert slept == [pytest.approx(0.4)] * statuses.count(200)  # a 503 comes at once
    assert 0 < statuses.count(200) < 8


async def test_stats_count_requests_by_status() -> None:
    app = create_app(SimulatorConfig(api_key="k"))
    async with client_for(app) as client:
        await generate(client, body(), headers={"x-goog-api-key": "k"})
        await generate(client, body())
        await generate(client, {"contents": []}, headers={"x-goog-api-key": "k"})
    stats = app.state.stats
    assert stats.received == 3 and stats.by_status == {200: 1, 401: 1, 400: 1}
    assert stats.images == 1 and stats.tokens > 0 and stats.in_flight == 0 and stats.max_in_flight == 1


async def test_canned_image_answers_every_request_with_the_same_bytes(tmp_path: Path) -> None:
    canned = png((64, 40), (200, 10, 10))
    (tmp_path / "canned.png").write_bytes(canned)
    app = create_app(SimulatorConfig(canned=str(tmp_path / "canned.png")))
    async with client_for(app) as client:
        edit = await generate(client, body("Make it pop", png()))
        generation = await generate(client, body("A lemon on a blue table", size="2K"))
    for response in (edit, generation):
        (image,) = answer_parts(response)
        assert image["inlineData"]["mimeType"] == "image/png"
        assert base64.b64decode(image["inlineData"]["data"]) == canned
    # The accounting still follows the request, not the file.
    assert generation.json()["usageMetadata"]["candidatesTokenCount"] == lookup(FLASH_31).output_tokens("2K")
    assert app.state.stats.images == 2
