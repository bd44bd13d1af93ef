"""Memory held per answer: each body held once, and the bytes of the answers read at once bounded."""

from __future__ import annotations

import base64
import functools
import os
import random
import socket
import sys
import threading
import time
import tracemalloc
from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx2
import orjson
import pytest

from nanobatch.api import transport
from nanobatch.api.budget import ByteBudget
from nanobatch.api.client import GeminiClient
from nanobatch.api.gemini import Image, build_request

PICTURE = b"\x89PNG\r\n\x1a\n" + random.Random(0).randbytes(3 * 2**20)  # 3 MB, 4 MB in base64
BODY = orjson.dumps(
    {
        "candidates": [
            {
                "content": {
                    "parts": [{"inlineData": {"mimeType": "image/png", "data": base64.b64encode(PICTURE).decode()}}]
                },
                "finishReason": "STOP",
            }
        ]
    }
)
CHUNK = 64 * 1024


class Trickle(httpx2.AsyncByteStream):
    """A body sent in chunks, letting other tasks run between them, as a socket does; counts the bodies being
    read at once."""

    reading = 0
    most = 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        Trickle.reading += 1
        Trickle.most = max(Trickle.most, Trickle.reading)
        try:
            for at in range(0, len(BODY), CHUNK):
                await anyio.lowlevel.checkpoint()
                yield BODY[at : at + CHUNK]
        finally:
            Trickle.reading -= 1


def answer(request: httpx2.Request) -> httpx2.Response:
    headers = {"content-type": "application/json", "content-length": str(len(BODY))}
    return httpx2.Response(200, headers=headers, stream=Trickle())


def chunked(request: httpx2.Request) -> httpx2.Response:
    return httpx2.Response(200, headers={"content-type": "application/json"}, stream=Trickle())


def client(**options: Any) -> GeminiClient:
    handler = options.pop("handler", answer)
    return GeminiClient(
        base_url="https://api.example.test", api_key="k", transport=httpx2.MockTransport(handler), **options
    )


@pytest.fixture(autouse=True)
def _count() -> None:
    Trickle.reading = Trickle.most = 0


@pytest.mark.parametrize("handler", [answer, chunked], ids=["content-length", "chunked"])
def test_answers_read_at_once_stay_within_the_byte_budget(handler: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Sixteen requests in flight, room for three bodies: no more than three are read and decoded at once,
    and every answer still comes back whole."""
    monkeypatch.setattr("nanobatch.api.client.WORKERS_FROM_BYTES", 1 << 40)  # the bytes alone, not their number
    budget = 3 * len(BODY)

    async def main() -> list[bytes]:
        async with client(answer_bytes=budget, handler=handler) as api:
            images = await _sixteen_at_once(api)
        # Known lengths are held before the first byte; unknown ones as they come, the oldest one's past it.
        assert api.answers.peak <= budget + (len(BODY) if handler is chunked else 0)
        assert api.answers.held == 0
        return images

    images = anyio.run(main)
    assert images == [PICTURE] * 16
    if handler is answer:
        assert Trickle.most == 3


def test_big_answers_are_read_ahead_no_further_than_one_more_than_can_be_decoded() -> None:
    """Sixteen big answers in flight and bytes for all of them: with this process decoding them one at a time,
    two bodies are in hand at once (one decoding, one read and waiting its turn), not sixteen."""

    async def main() -> list[bytes]:
        async with client(answer_bytes=16 * len(BODY), workers=0) as api:
            images = await _sixteen_at_once(api)
        assert api.answers.peak <= 2 * len(BODY) and api.answers.held == api.answers.big == 0
        return images

    assert anyio.run(main) == [PICTURE] * 16
    assert Trickle.most == 2


def test_with_worker_processes_one_big_answer_more_is_read_ahead_than_there_are_workers() -> None:
    """How many big bodies a client lets be read at once: one more than its decoder can decode at once, which
    is one until worker processes are in use (unset: once the run has read WORKERS_AFTER_BYTES), then one per
    worker. (No worker is started: the read-ahead follows the number of them, not their work.)"""
    from nanobatch.api.decoding import WORKERS_AFTER_BYTES

    async def main() -> list[int]:
        ahead = []
        for workers in (0, 3, None):
            api = client(workers=workers)
            assert api.answers.most_big is not None
            ahead.append(api.answers.most_big())
            if workers is None:
                api.decoder.takes(WORKERS_AFTER_BYTES + 1)  # the run has read that much: the workers are in use
                ahead.append(api.answers.most_big())
            await api.aclose()
        return ahead

    assert anyio.run(main) == [2, 4, 2, (os.cpu_count() or 1) + 1]


async def _sixteen_at_once(api: GeminiClient) -> list[bytes]:
    """Sixteen requests through *api* at once (each answered with BODY); their images, as they came."""
    images: list[bytes] = []

    async def one() -> None:
        reply = await api.generate("m", build_request("x"), timeout_s=60)
        images.append(reply.images[0].data)

    async with anyio.create_task_group() as tg:
        for _ in range(16):
            tg.start_soon(one)
    return images


def test_an_answer_is_held_once() -> None:
    """Reading and decoding one answer holds at most its body and its image at a time: no joined copy of the
    chunks, and no text of the image's base64 (it is decoded from the body's bytes)."""

    async def main() -> int:
        async with client() as api:
            tracemalloc.start()
            try:
                reply = await api.generate("m", build_request("x"), timeout_s=60)
                peak = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
            assert reply.images[0].data == PICTURE
            return peak

    # Body + image: 1.75x the body. Body + the image's base64 text, as before: 2.0x; with a joined copy of the
    # chunks beside them too: 2.75x or more.
    assert anyio.run(main) < 1.9 * len(BODY)


def test_a_request_in_flight_holds_its_body_at_its_size() -> None:
    """A request waits for its answer for up to minutes, holding its body: no more memory than the body's bytes
    (orjson's own buffer for a 0.6 MB body with one photo is 8 MB)."""
    photo = Image("image/jpeg", b"\xff\xd8\xff" + random.Random(5).randbytes(460_000))
    body = build_request("make the background white", [photo])
    held: list[tuple[int, int]] = []

    def handler(request: httpx2.Request) -> httpx2.Response:
        held.append((tracemalloc.get_traced_memory()[0], len(request.content)))
        return answer(request)

    async def main() -> None:
        async with client(handler=handler) as api:
            tracemalloc.start()
            try:
                await api.generate("m", body, timeout_s=60)
            finally:
                tracemalloc.stop()

    anyio.run(main)
    ((in_flight, size),) = held
    assert size > len(photo.data) and in_flight < 2 * size  # the body (and the mock's view of it): before, 13x


def test_a_body_bigger_than_the_whole_budget_goes_alone() -> None:
    async def main() -> None:
        async with client(answer_bytes=len(BODY) // 2) as api, anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(functools.partial(api.generate, "m", build_request("x"), timeout_s=60))

    anyio.run(main)  # finishes: none waits for room that never comes
    assert Trickle.most == 1


def test_a_cancelled_wait_gives_nothing_away() -> None:
    async def main() -> None:
        budget = ByteBudget(10)
        async with budget.hold(8):
            with anyio.move_on_after(0.01):
                async with budget.hold(8):
                    pytest.fail("no room for it")
            assert budget.held == 8
        assert budget.held == 0
        async with budget.hold(10):
            assert budget.held == 10

    anyio.run(main)


def trickling_server(pieces: int, piece: int) -> tuple[str, threading.Thread]:
    """A loopback HTTP server answering one request with BODY sent *piece* bytes at a time, a moment apart."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        with listener, listener.accept()[0] as conn:
            received = b""
            while b"\r\n\r\n" not in received:
                received += conn.recv(65536)
            head, _, body = received.partition(b"\r\n\r\n")
            length = int(next(line for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
                         .split(b":")[1])  # fmt: skip
            while len(body) < length:
                body += conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(BODY))
            for at in range(0, len(BODY), piece):
                conn.sendall(BODY[at : at + piece])
                time.sleep(0.002 if at // piece < pieces else 0)
            conn.recv(1)  # until the client closes

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return f"http://127.0.0.1:{listener.getsockname()[1]}", thread


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SO_RCVLOWAT holds back epoll on Linux")
def test_a_big_body_is_read_in_big_pieces_not_as_each_few_kb_arrive(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each read of a body costs the event loop a trip through anyio, h11 and httpx2 (a dozen Python calls):
    a 4 MB answer for a worker, arriving 16 KB at a time, is read in a few pieces of up to 1 MiB, not in ~250."""
    reads: list[int] = []
    read = transport._Stream.read

    async def counted(self: Any, max_bytes: int, timeout: float | None = None) -> bytes:  # noqa: ASYNC109
        data = await read(self, max_bytes, timeout)
        reads.append(len(data))
        return data

    monkeypatch.setattr(transport._Stream, "read", counted)
    url, server = trickling_server(pieces=len(BODY) // 16384, piece=16384)

    async def main() -> Any:
        async with GeminiClient(base_url=url, api_key="k", workers=1) as api:
            return await api.generate("m", build_request("x"), timeout_s=60)

    assert anyio.run(main).images[0].data == PICTURE
    server.join(timeout=10)
    # The head, the body's first ~3.75 MB in pieces of up to 1 MiB, then its last 256 KiB as it comes (at most
    # 16 pieces of 16 KB, fewer when the loop is slower than the sender): ~250 reads without the low-water mark.
    assert len(reads) <= 24, reads
