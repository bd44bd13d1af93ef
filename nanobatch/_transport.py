"""Many small connection pools instead of one big one.

httpcore 1.0's ``AsyncConnectionPool`` walked every connection on every request
and every release, so its cost per request grew with the square of the pool's
size: at 100 connections it was half of nanobatch's CPU per request. httpcore2
made that pass linear, but it still visits every connection of the pool on each
request and release (probing each idle one's socket), so pools of ten still
pay: measured with plain httpx2, 2,000 requests at concurrency 100, 1.31-1.37 ms
of CPU per request through ten pools against 1.51-1.79 ms through one (see the
README's performance section). Each pool is httpx2's own transport; this only
picks one.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx2

__all__ = ["ShardedTransport"]

POOL_SIZE = 10


class ShardedTransport(httpx2.AsyncBaseTransport):
    """Sends each request through the least busy of ``ceil(max_connections / POOL_SIZE)`` pools."""

    def __init__(self, max_connections: int, per_pool: int = POOL_SIZE) -> None:
        count = max(1, -(-max_connections // per_pool))
        limits = httpx2.Limits(max_connections=per_pool, max_keepalive_connections=per_pool)
        # One TLS context for all pools: each of httpx2's own loads the CA bundle (~20-30 ms apiece).
        context = httpx2.create_ssl_context()
        self._pools = [httpx2.AsyncHTTPTransport(verify=context, limits=limits) for _ in range(count)]
        self._busy = [0] * count

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        index = min(range(len(self._pools)), key=self._busy.__getitem__)
        self._busy[index] += 1
        try:
            response = await self._pools[index].handle_async_request(request)
        except BaseException:
            self._busy[index] -= 1
            raise
        # The connection stays busy until the body has been read and closed.
        return httpx2.Response(
            response.status_code,
            headers=response.headers,
            stream=_Tracked(response.stream, self._busy, index),  # type: ignore[arg-type]
            extensions=response.extensions,
        )

    async def aclose(self) -> None:
        for pool in self._pools:
            await pool.aclose()


class _Tracked(httpx2.AsyncByteStream):
    def __init__(self, stream: httpx2.AsyncByteStream, busy: list[int], index: int) -> None:
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
