"""For the plain-script baseline: one connection pool of N split into pools of 10.

httpcore 1.0.9's ``AsyncConnectionPool._assign_requests_to_connections`` walks
every connection, and counts the idle ones once per connection, on every
request and every release: its cost per request grows with the square of the
pool's size. Splitting 100 connections into ten pools of 10 cuts that work a
hundredfold. :mod:`run` measures the plain script both ways, so the table
shows how much of its time is the pool's (nanobatch's client splits its own).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx

__all__ = ["SplitPoolTransport"]


class SplitPoolTransport(httpx.AsyncBaseTransport):
    """Sends each request through the least busy of several small pools."""

    def __init__(self, max_connections: int, per_pool: int = 10) -> None:
        count = max(1, -(-max_connections // per_pool))
        limits = httpx.Limits(max_connections=per_pool, max_keepalive_connections=per_pool)
        self._pools = [httpx.AsyncHTTPTransport(limits=limits) for _ in range(count)]
        self._busy = [0] * count

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        index = min(range(len(self._pools)), key=self._busy.__getitem__)
        self._busy[index] += 1
        try:
            response = await self._pools[index].handle_async_request(request)
        except BaseException:
            self._busy[index] -= 1
            raise
        # The connection stays busy until the body is read and closed.
        return httpx.Response(
            response.status_code,
            headers=response.headers,
            stream=_Tracked(response.stream, self._busy, index),  # type: ignore[arg-type]
            extensions=response.extensions,
        )

    async def aclose(self) -> None:
        for pool in self._pools:
            await pool.aclose()


class _Tracked(httpx.AsyncByteStream):
    def __init__(self, stream: httpx.AsyncByteStream, busy: list[int], index: int) -> None:
        self._stream, self._busy, self._index = stream, busy, index
        self._closed = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._stream:
            yield chunk

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            self._busy[self._index] -= 1
        await self._stream.aclose()
