"""GeminiClient over httpx2.MockTransport: the request it sends, and how failures come back."""

from __future__ import annotations

import base64
import json
import socket
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import httpcore2
import httpx2
import pytest

import nanobatch.api.client as client_module
from nanobatch.api.client import GeminiClient
from nanobatch.api.gemini import build_request
from nanobatch.api.transport import ShardedTransport
from nanobatch.errors import ApiError, FatalApiError

from .conftest import run_virtual

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

Handler = Callable[[httpx2.Request], httpx2.Response]


class Recorder:
    """A MockTransport handler that answers with *answer* and keeps every request."""

    def __init__(self, answer: Handler | httpx2.Response | None = None) -> None:
        self.answer = answer
        self.requests: list[httpx2.Request] = []

    def __call__(self, request: httpx2.Request) -> httpx2.Response:
        self.requests.append(request)
        if callable(self.answer):
            return self.answer(request)
        return self.answer if self.answer is not None else httpx2.Response(200, json=OK)


async def send(handler: Handler, **options: Any) -> Any:
    options.setdefault("base_url", "https://api.example.test")
    options.setdefault("api_key", KEY)
    async with GeminiClient(transport=httpx2.MockTransport(handler), **options) as client:
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


def raising(exc_type: type[httpx2.TransportError], message: str = "boom") -> Handler:
    def handler(request: httpx2.Request) -> httpx2.Response:
        raise exc_type(message, request=request)

    return handler


@pytest.mark.parametrize(
    ("exc_type", "kind", "sent"),
    [
        pytest.param(httpx2.ReadTimeout, "timeout", True, id="read-timeout"),
        pytest.param(httpx2.ConnectTimeout, "timeout", False, id="connect-timeout"),
        pytest.param(httpx2.WriteTimeout, "timeout", True, id="write-timeout"),
        pytest.param(httpx2.ConnectError, "connection", False, id="connect-error"),
        pytest.param(httpx2.RemoteProtocolError, "connection", True, id="remote-protocol-error"),
        pytest.param(httpx2.ReadError, "connection", True, id="read-error"),
    ],
)
async def test_transport_failures_are_retryable_api_errors(
    exc_type: type[httpx2.TransportError], kind: str, sent: bool
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
        await send(Recorder(httpx2.Response(429, json={"error": error})))
    assert (info.value.kind, info.value.retryable, info.value.retry_after) == ("rate_limited", True, 45.837906927)
    assert info.value.status_code == 429


async def test_retry_after_header_reaches_the_error() -> None:
    with pytest.raises(ApiError) as info:
        await send(Recorder(httpx2.Response(503, headers={"Retry-After": "17"}, text="busy")))
    assert info.value.retry_after == 17.0 and info.value.kind == "overloaded"


async def test_truncated_200_is_a_retryable_bad_response() -> None:
    raw = json.dumps(OK).encode()[:50]
    with pytest.raises(ApiError) as info:
        await send(Recorder(httpx2.Response(200, content=raw)))
    assert info.value.kind == "bad_response" and info.value.retryable


def assert_no_key(exc: ApiError) -> None:
    assert KEY not in str(exc)
    assert KEY not in repr(exc)
    assert KEY not in exc.message
    assert all(KEY not in str(arg) for arg in exc.args)


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
        await send(Recorder(httpx2.Response(status, json=payload)))
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
    reply = await send(Recorder(httpx2.Response(200, json=body)))
    assert KEY not in repr(reply) and "[redacted]" in (reply.text or "")
    assert reply.usage["promptTokenCount"] == 10 and reply.finish_reason == "STOP"


async def test_fields_a_proxy_sends_as_numbers_lists_or_objects_become_text_and_are_redacted() -> None:
    candidate = {"content": {"parts": [{"text": "no image"}]}, "finishReason": ["SAFETY"], "finishMessage": 5}
    body = {"candidates": [candidate], "responseId": 1234567, "modelVersion": {"note": f"low balance on {KEY}"}}
    reply = await send(Recorder(httpx2.Response(200, json=body)))
    assert (reply.response_id, reply.finish_reason, reply.finish_message) == ("1234567", '["SAFETY"]', "5")
    assert reply.model_version == '{"note": "low balance on [redacted]"}' and KEY not in repr(reply)


async def test_key_echoed_in_an_html_page_is_redacted() -> None:
    page = f"<html><head><title>Forbidden for {KEY}</title></head></html>"
    with pytest.raises(ApiError) as info:
        await send(Recorder(httpx2.Response(403, text=page)))
    assert_no_key(info.value)


async def test_key_in_a_transport_error_is_redacted() -> None:
    with pytest.raises(ApiError) as info:
        await send(raising(httpx2.ConnectError, f"proxy refused Bearer {KEY}"))
    assert_no_key(info.value)
    assert info.value.__cause__ is None and info.value.__suppress_context__


class Chunks(httpx2.AsyncByteStream):
    def __init__(self, *chunks: bytes) -> None:
        self.chunks = chunks

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self.chunks:
            yield chunk


async def test_undecodable_compressed_body_is_a_retryable_bad_response() -> None:
    answer = httpx2.Response(200, headers={"Content-Encoding": "gzip"}, stream=Chunks(b"not gzip at all"))
    with pytest.raises(ApiError) as info:
        await send(Recorder(answer))
    assert info.value.kind == "bad_response" and info.value.retryable


@pytest.fixture
def built(monkeypatch: pytest.MonkeyPatch) -> list[ShardedTransport]:
    """The sharded transports GeminiClient builds for itself, in order."""
    made: list[ShardedTransport] = []

    class Recording(ShardedTransport):
        def __init__(self, max_connections: int, **options: Any) -> None:
            super().__init__(max_connections, **options)
            made.append(self)

    monkeypatch.setattr(client_module, "ShardedTransport", Recording)
    return made


async def test_many_connections_are_spread_over_small_pools_and_all_answer(built: list[ShardedTransport]) -> None:
    from nanobatch.simulator import SimulatorConfig, run_in_thread

    with run_in_thread(SimulatorConfig(latency_s=0.05)) as url:
        async with GeminiClient(base_url=url, api_key=None, max_connections=30) as client:
            (transport,) = built
            assert transport.pools == 3
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
            assert transport.in_use == 0  # every connection was handed back


class RecordingStream(httpcore2.AsyncNetworkStream):
    """A network stream that records what is written (each call one send()) and answers every read with b"HTTP"."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:  # noqa: ASYNC109
        self.sent.append(buffer)

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:  # noqa: ASYNC109
        return b"HTTP"

    async def aclose(self) -> None:
        pass


async def test_a_small_request_leaves_in_one_send_and_a_big_body_uncopied() -> None:
    """httpcore2 writes a request's head and body apart: on loopback each send() costs as much as the rest."""
    from nanobatch.api.transport import _Stream

    inner = RecordingStream()
    stream = _Stream(inner)
    await stream.write(b"POST / HTTP/1.1\r\n\r\n")
    await stream.write(b'{"contents": []}')
    assert inner.sent == []  # held until the answer is awaited
    assert await stream.read(65536) == b"HTTP"
    assert inner.sent == [b'POST / HTTP/1.1\r\n\r\n{"contents": []}']
    big = bytes(10 * 2**20)  # 14 reference images are tens of MB: sent as they are, never joined
    await stream.write(b"POST / HTTP/1.1\r\n\r\n")
    await stream.write(big)
    assert inner.sent[1:] == [b"POST / HTTP/1.1\r\n\r\n", big] and inner.sent[2] is big


class FirstReads:
    """A loopback HTTP server that keeps what the first recv() of each connection got, and answers every
    request with *answer* once *connections* connections have sent theirs (so that they overlap)."""

    def __init__(self, connections: int, answer: bytes) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.first: list[bytes] = []
        self._all_in = threading.Barrier(connections, timeout=10)
        self._reply = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (
            len(answer),
            answer,
        )
        self._threads = [threading.Thread(target=self._serve_one, daemon=True) for _ in range(connections)]
        for thread in self._threads:
            thread.start()

    def _serve_one(self) -> None:
        conn, _ = self.listener.accept()
        with conn:
            self.first.append(conn.recv(1 << 20))
            self._all_in.wait()
            conn.sendall(self._reply)

    def close(self) -> None:
        for thread in self._threads:
            thread.join(timeout=10)
        self.listener.close()


async def test_every_pool_sends_a_small_request_in_one_piece() -> None:
    """httpcore2 writes a request's head and body apart; each of the pools joins them (see _Stream)."""
    server = FirstReads(3, json.dumps(OK).encode())
    transport = ShardedTransport(max_connections=30)  # three pools: three requests at once use one each
    try:
        async with GeminiClient(base_url=server.url, api_key=None, transport=transport) as client:

            async def one() -> None:
                await client.generate("gemini-2.5-flash-image", BODY, timeout_s=30)

            async with anyio.create_task_group() as tg:
                for _ in range(3):
                    tg.start_soon(one)
    finally:
        server.close()
    assert len(server.first) == 3
    for first in server.first:  # the head and the whole body, in the connection's first read
        head, _, body = first.partition(b"\r\n\r\n")
        length = next(line for line in head.lower().split(b"\r\n") if line.startswith(b"content-length:"))
        assert head.startswith(b"POST /v1beta/models/") and len(body) == int(length.split(b":")[1]) > 0


def test_a_proxy_in_the_environment_keeps_httpx_in_charge(
    monkeypatch: pytest.MonkeyPatch, built: list[ShardedTransport]
) -> None:
    GeminiClient(base_url="https://example.invalid", api_key=None, max_connections=100)
    assert len(built) == 1  # without a proxy, the client spreads its connections over pools
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.internal:3128")
    GeminiClient(base_url="https://example.invalid", api_key=None, max_connections=100)
    assert len(built) == 1  # with one, httpx2 builds its transports (which honour the proxy) itself


def test_only_an_https_endpoint_loads_the_certificate_authorities(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading the CA bundle costs a run 35-55 ms of CPU: a plain http:// endpoint (the simulator, a proxy on
    this machine) never needs it."""
    made: list[object] = []
    real = httpx2.create_ssl_context
    monkeypatch.setattr(httpx2, "create_ssl_context", lambda *a, **k: made.append(k) or real(*a, **k))
    GeminiClient(base_url="http://127.0.0.1:8000", api_key=None)
    assert made == []
    GeminiClient(base_url="https://generativelanguage.googleapis.com", api_key="k")
    assert len(made) == 1  # one context for all the pools


def test_a_whole_run_goes_through_httpx2_and_never_loads_httpx_0_28(tmp_path: Any) -> None:
    import subprocess
    import sys

    from .fakes import write_job

    job = write_job(tmp_path, [{"id": "a", "image": "images/a.png"}, {"id": "b", "instruction": "a lemon"}])
    probe = (
        "import sys\nfrom nanobatch.cli.main import main\n"
        f"code = main(['run', {str(job)!r}, '--simulate', '--out', {str(tmp_path / 'out')!r}, '--quiet'])\n"
        "tops = {m.split('.')[0] for m in sys.modules}\n"
        "print(code, sorted(m for m in tops if m.startswith(('httpx', 'httpcore'))))"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.split(" ", 1) == ["0", "['httpcore2', 'httpx2']\n"]


# --- where requests go, in messages -------------------------------------------------------------------------------

SECRET_URL = "https://user:s3cret@proxy.example/v1?key=abc"


def _refused(request: httpx2.Request) -> httpx2.Response:
    raise httpx2.ConnectError("connection refused")


def _not_json(request: httpx2.Request) -> httpx2.Response:
    return httpx2.Response(200, text="<html>a proxy's page</html>")


async def _fail_gemini(answer: Handler) -> tuple[str, str]:
    async with GeminiClient(base_url=SECRET_URL, api_key=KEY, transport=httpx2.MockTransport(answer)) as client:
        with pytest.raises(ApiError) as info:
            await client.generate("m", BODY, timeout_s=10)
    return client.where, info.value.message


async def _fail_batch(answer: Handler) -> tuple[str, str]:
    from nanobatch.api.batch_api import BatchClient

    async with BatchClient(base_url=SECRET_URL, api_key=KEY, transport=httpx2.MockTransport(answer)) as client:
        with pytest.raises(ApiError) as info:
            await client.get("batches/1")
    return client.where, info.value.message


@pytest.mark.parametrize("fail", [_fail_gemini, _fail_batch], ids=["generate", "batch"])
@pytest.mark.parametrize("answer", [_refused, _not_json], ids=["refused", "html-200"])
async def test_a_base_url_with_a_password_or_a_query_never_shows_them(
    fail: Callable[[Handler], Any], answer: Handler
) -> None:
    where, message = await fail(answer)
    assert where == "https://proxy.example/v1"
    assert "s3cret" not in message and "key=abc" not in message
    if answer is _refused:
        assert "cannot connect to https://proxy.example/v1: " in message


async def test_the_batch_upload_that_never_starts_names_the_endpoint_without_its_password(tmp_path: Any) -> None:
    from nanobatch.api.batch_api import BatchClient

    path = tmp_path / "chunk.jsonl"
    path.write_bytes(b"{}\n")
    transport = httpx2.MockTransport(lambda request: httpx2.Response(200, json={}))
    async with BatchClient(base_url=SECRET_URL, api_key=KEY, transport=transport) as client:
        with pytest.raises(ApiError) as info:
            await client.upload(path, display_name="x")
    assert "https://proxy.example/v1 did not start an upload" in info.value.message
    assert "s3cret" not in info.value.message and "key=abc" not in info.value.message


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        pytest.param(SECRET_URL, "https://proxy.example/v1", id="userinfo-and-query"),
        pytest.param(
            "https://b.s3.amazonaws.com/a.png?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Signature=f00d",
            "https://b.s3.amazonaws.com/a.png",
            id="presigned-s3",
        ),
        pytest.param(
            "https://acct.blob.core.windows.net/c/a.png?sv=1&sig=abc%3D",
            "https://acct.blob.core.windows.net/c/a.png",
            id="azure-sas",
        ),
        pytest.param("s3://bucket/edited/a.png", "s3://bucket/edited/a.png", id="bucket-url"),
        pytest.param("http://[::1/x?sig=1", "http://[::1/x", id="not-parseable"),
    ],
)
def test_public_url_keeps_where_and_drops_what_could_be_a_credential(url: str, shown: str) -> None:
    assert client_module.public_url(url) == shown


async def test_an_api_error_echoing_a_signed_input_url_keeps_only_its_address() -> None:
    signed = "https://b.s3.amazonaws.com/a.png?X-Amz-Credential=AKIA%2F&X-Amz-Signature=f00dfeed"
    said = {"error": {"code": 400, "status": "INVALID_ARGUMENT", "message": f"Cannot fetch {signed}."}}
    transport = httpx2.MockTransport(lambda request: httpx2.Response(400, json=said))
    async with GeminiClient(base_url="https://api.example", api_key=KEY, transport=transport) as client:
        with pytest.raises(ApiError) as info:
            await client.generate("m", BODY, timeout_s=10)
    assert "Cannot fetch https://b.s3.amazonaws.com/a.png." in info.value.message
    assert "f00dfeed" not in info.value.message and "AKIA" not in info.value.message


def test_a_file_reference_never_shows_its_signed_url_in_a_repr() -> None:
    from nanobatch.api.gemini import FileRef

    ref = FileRef("image/png", "https://b.s3.amazonaws.com/a.png?X-Amz-Signature=f00dfeed")
    assert "f00dfeed" not in repr(ref) and ref.uri.endswith("f00dfeed")


@pytest.mark.parametrize("bytes_a_second", [1, 64], ids=["trickling past the limit", "slow but in time"])
def test_an_answer_trickling_in_is_cut_at_the_request_timeout_and_retryable(bytes_a_second: int) -> None:
    """api.timeout_s bounds the whole request, not each read: one byte a second never ends a 300 s request."""
    body = json.dumps(OK).encode() + b" " * 600  # JSON allows trailing white space: ~900 bytes in all

    async def trickle() -> AsyncIterator[bytes]:
        for start in range(0, len(body), bytes_a_second):
            await anyio.sleep(1)
            yield body[start : start + bytes_a_second]

    async def main() -> tuple[Any, float]:
        began = anyio.current_time()
        try:
            reply: Any = await send(lambda request: httpx2.Response(200, content=trickle()))
        except ApiError as exc:
            reply = exc
        return reply, anyio.current_time() - began

    outcome, took = run_virtual(main)
    if bytes_a_second == 1:
        assert isinstance(outcome, ApiError)
        assert outcome.kind == "timeout" and outcome.retryable
        assert "300 s" in outcome.message
        assert took == pytest.approx(300, abs=2)
    else:
        assert not isinstance(outcome, ApiError)
        assert outcome.images
