"""GeminiClient over httpx.MockTransport: the request it sends, and how failures come back."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import httpx
import pytest

from nanobatch.client import GeminiClient
from nanobatch.errors import ApiError, FatalApiError
from nanobatch.gemini import build_request

KEY = "AIzaSy-test-key-0123456789abcdef"
PNG = b"\x89PNG\r\n\x1a\n" + b"pixels"
OK = {
    "candidates": [
        {
            "content": {"parts": [{"inlineData": {"mimeType": "image/png", "data": base64.b64encode(PNG).decode()}}]},
            "finishReason": "STOP",
        }
    ],
    "usageMetadata": {"promptTokenCount": 10, "candidatesTokenCount": 1120, "totalTokenCount": 1130},
    "modelVersion": "gemini-2.5-flash-image",
}
BODY = build_request("make the background white")

Handler = Callable[[httpx.Request], httpx.Response]


class Recorder:
    """A MockTransport handler that answers with *answer* and keeps every request."""

    def __init__(self, answer: Handler | httpx.Response | None = None) -> None:
        self.answer = answer
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if callable(self.answer):
            return self.answer(request)
        return self.answer if self.answer is not None else httpx.Response(200, json=OK)


async def send(handler: Handler, **options: Any) -> Any:
    options.setdefault("base_url", "https://api.example.test")
    options.setdefault("api_key", KEY)
    async with GeminiClient(transport=httpx.MockTransport(handler), **options) as client:
        return await client.generate("gemini-2.5-flash-image", BODY, timeout_s=300)


async def test_posts_json_to_generate_content() -> None:
    server = Recorder()
    reply = await send(server)
    [request] = server.requests
    assert request.method == "POST"
    assert str(request.url) == "https://api.example.test/v1beta/models/gemini-2.5-flash-image:generateContent"
    assert request.headers["content-type"] == "application/json"
    assert json.loads(request.content) == BODY
    assert [i.data for i in reply.images] == [PNG]
    assert reply.usage["totalTokenCount"] == 1130


async def test_base_url_path_and_api_version_are_kept() -> None:
    server = Recorder()
    await send(server, base_url="https://proxy.example.test/gemini/", api_version="/v1alpha/")
    assert server.requests[0].url.path == "/gemini/v1alpha/models/gemini-2.5-flash-image:generateContent"


async def test_bearer_auth_is_the_default() -> None:
    server = Recorder()
    await send(server)
    headers = server.requests[0].headers
    assert headers["authorization"] == f"Bearer {KEY}"
    assert "x-goog-api-key" not in headers


async def test_google_auth_header() -> None:
    server = Recorder()
    await send(server, auth="x-goog-api-key")
    headers = server.requests[0].headers
    assert headers["x-goog-api-key"] == KEY
    assert "authorization" not in headers


@pytest.mark.parametrize("key", [pytest.param(None, id="none"), pytest.param("", id="empty")])
async def test_no_key_sends_no_auth_header(key: str | None) -> None:
    server = Recorder()
    await send(server, api_key=key)
    headers = server.requests[0].headers
    assert "authorization" not in headers and "x-goog-api-key" not in headers


def raising(exc_type: type[httpx.TransportError], message: str = "boom") -> Handler:
    def handler(request: httpx.Request) -> httpx.Response:
        raise exc_type(message, request=request)

    return handler


@pytest.mark.parametrize(
    ("exc_type", "kind", "sent"),
    [
        pytest.param(httpx.ReadTimeout, "timeout", True, id="read-timeout"),
        pytest.param(httpx.ConnectTimeout, "timeout", False, id="connect-timeout"),
        pytest.param(httpx.WriteTimeout, "timeout", True, id="write-timeout"),
        pytest.param(httpx.ConnectError, "connection", False, id="connect-error"),
        pytest.param(httpx.RemoteProtocolError, "connection", True, id="remote-protocol-error"),
        pytest.param(httpx.ReadError, "connection", True, id="read-error"),
    ],
)
async def test_transport_failures_are_retryable_api_errors(
    exc_type: type[httpx.TransportError], kind: str, sent: bool
) -> None:
    with pytest.raises(ApiError) as info:
        await send(raising(exc_type))
    assert info.value.kind == kind
    assert info.value.retryable is True
    assert info.value.status_code is None
    assert info.value.sent is sent  # a request that never had a connection cannot have been charged


async def test_non_200_goes_through_classification() -> None:
    retry = {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "45.837906927s"}
    error = {"code": 429, "message": "Resource exhausted", "status": "RESOURCE_EXHAUSTED", "details": [retry]}
    with pytest.raises(ApiError) as info:
        await send(Recorder(httpx.Response(429, json={"error": error})))
    assert (info.value.kind, info.value.retryable, info.value.retry_after) == ("rate_limited", True, 45.837906927)
    assert info.value.status_code == 429


async def test_retry_after_header_reaches_the_error() -> None:
    with pytest.raises(ApiError) as info:
        await send(Recorder(httpx.Response(503, headers={"Retry-After": "17"}, text="busy")))
    assert info.value.retry_after == 17.0 and info.value.kind == "overloaded"


async def test_truncated_200_is_a_retryable_bad_response() -> None:
    raw = json.dumps(OK).encode()[:50]
    with pytest.raises(ApiError) as info:
        await send(Recorder(httpx.Response(200, content=raw)))
    assert info.value.kind == "bad_response" and info.value.retryable


def assert_no_key(exc: ApiError) -> None:
    assert KEY not in str(exc)
    assert KEY not in repr(exc)
    assert KEY not in exc.message
    assert all(KEY not in str(arg) for arg in exc.args)
    assert KEY not in json.dumps(exc.as_record())


@pytest.mark.parametrize(
    ("status", "payload", "fatal"),
    [
        pytest.param(400, {"error": {"code": 400, "message": f"API key not valid: {KEY}",
                                     "status": "INVALID_ARGUMENT"}}, True, id="google-400"),
        pytest.param(401, {"status_code": 401, "error": {"message": f"invalid token {KEY}", "type": "auth_error"}},
                     True, id="apiyi-401"),
        pytest.param(503, {"error": {"code": 503, "message": f"overloaded for key {KEY}", "status": "UNAVAILABLE"}},
                     False, id="google-503"),
        pytest.param(429, {"error": f"rate limited: {KEY}"}, False, id="plain-429"),
    ],
)  # fmt: skip
async def test_key_echoed_by_the_server_is_redacted(status: int, payload: dict[str, Any], fatal: bool) -> None:
    with pytest.raises(ApiError) as info:
        await send(Recorder(httpx.Response(status, json=payload)))
    assert isinstance(info.value, FatalApiError) is fatal
    assert_no_key(info.value)
    assert "[redacted]" in info.value.message


async def test_key_echoed_in_a_200_answer_is_redacted_everywhere_it_is_kept() -> None:
    body = {
        "candidates": [
            {
                "content": {"parts": [{"text": f"low balance on Bearer {KEY}"}]},
                "finishReason": "STOP",
                "finishMessage": f"key {KEY} is nearly out of credit",
            }
        ],
        "usageMetadata": {"promptTokenCount": 10, "note": f"billed to {KEY}"},
        "modelVersion": f"proxy-{KEY}",
        "responseId": KEY,
    }
    reply = await send(Recorder(httpx.Response(200, json=body)))
    assert KEY not in repr(reply) and "[redacted]" in (reply.text or "")
    assert reply.usage["promptTokenCount"] == 10 and reply.finish_reason == "STOP"


async def test_fields_a_proxy_sends_as_numbers_lists_or_objects_become_text_and_are_redacted() -> None:
    candidate = {"content": {"parts": [{"text": "no image"}]}, "finishReason": ["SAFETY"], "finishMessage": 5}
    body = {"candidates": [candidate], "responseId": 1234567, "modelVersion": {"note": f"low balance on {KEY}"}}
    reply = await send(Recorder(httpx.Response(200, json=body)))
    assert (reply.response_id, reply.finish_reason, reply.finish_message) == ("1234567", '["SAFETY"]', "5")
    assert reply.model_version == '{"note": "low balance on [redacted]"}' and KEY not in repr(reply)


async def test_key_echoed_in_an_html_page_is_redacted() -> None:
    page = f"<html><head><title>Forbidden for {KEY}</title></head></html>"
    with pytest.raises(ApiError) as info:
        await send(Recorder(httpx.Response(403, text=page)))
    assert_no_key(info.value)


async def test_key_in_a_transport_error_is_redacted() -> None:
    with pytest.raises(ApiError) as info:
        await send(raising(httpx.ConnectError, f"proxy refused Bearer {KEY}"))
    assert_no_key(info.value)
    assert info.value.__cause__ is None and info.value.__suppress_context__


class Chunks(httpx.AsyncByteStream):
    def __init__(self, *chunks: bytes) -> None:
        self.chunks = chunks

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self.chunks:
            yield chunk


async def test_undecodable_compressed_body_is_a_retryable_bad_response() -> None:
    answer = httpx.Response(200, headers={"Content-Encoding": "gzip"}, stream=Chunks(b"not gzip at all"))
    with pytest.raises(ApiError) as info:
        await send(Recorder(answer))
    assert info.value.kind == "bad_response" and info.value.retryable


async def test_many_connections_are_spread_over_small_pools_and_all_answer() -> None:
    from nanobatch._transport import ShardedTransport
    from nanobatch.simulator import SimulatorConfig, run_in_thread

    with run_in_thread(SimulatorConfig(latency_s=0.05)) as url:
        async with GeminiClient(base_url=url, api_key=None, max_connections=30) as client:
            transport = client._http._transport
            assert isinstance(transport, ShardedTransport) and len(transport._pools) == 3
            body = {
                "contents": [{"parts": [{"text": "A lemon"}]}],
                "generationConfig": {"responseModalities": ["IMAGE"]},
            }
            replies = []

            async def one() -> None:
                replies.append(await client.generate("gemini-3.1-flash-image", body, timeout_s=30))

            async with anyio.create_task_group() as tg:
                for _ in range(60):
                    tg.start_soon(one)
            assert len(replies) == 60 and all(r.images for r in replies)
            assert transport._busy == [0, 0, 0]  # every connection was handed back


def test_a_proxy_in_the_environment_keeps_httpx_in_charge(monkeypatch: pytest.MonkeyPatch) -> None:
    from nanobatch._transport import ShardedTransport

    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.internal:3128")
    client = GeminiClient(base_url="https://example.invalid", api_key=None, max_connections=100)
    assert not isinstance(client._http._transport, ShardedTransport)
