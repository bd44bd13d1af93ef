"""Many small connection pools instead of one big one.

httpcore2's ``AsyncConnectionPool`` visits every connection of the pool on each
request and each release (probing each idle one's socket), so a request costs
more CPU the bigger the pool: ten pools of ten cost less than one of 100 (bench
row "1 dispatch", its pool-split experiment; figures in bench/RESULTS.md, "Why
the code is shaped this way"). Each pool is httpx2's own transport; this only
picks one.

Each pool's network streams are also wrapped (:class:`_Stream`) for two more
costs httpcore2 adds per request: it writes a request's head and its
body with a send() each (on loopback each send costs as much as the client's
other work on a small request), and it asks anyio whether an idle connection is
readable through a path that calls getpeername() every time. The wrapper sends a
small request in one send() and keeps the socket at hand.
"""

# ruff: noqa: ASYNC109 - httpcore2's stream and backend interface takes its timeouts as arguments

from __future__ import annotations

import contextlib
import logging
import select
import socket
import ssl
import sys
from collections.abc import AsyncIterator, Iterable, Iterator
from contextvars import ContextVar
from typing import Any

import httpcore2
import httpx2

__all__ = ["ShardedTransport", "expect_body"]

POOL_SIZE = 10
_JOIN_UP_TO = 64 * 1024  # writes up to this size wait for the next one; bigger ones go out as they are
# A big body's reads (:func:`expect_body`) take up to this much of what has arrived: httpcore2 asks for 64 KB,
# anyio cuts what asyncio read (256 KB at a time) into pieces that size, copying the rest each time, and each
# piece goes through h11 and httpx2 on its own: a 4K answer's 32 MB took ~500 trips, now ~32
# (docs/performance.md). Other reads are as httpcore2 asks: bigger pieces in the run's own heap raised its peak RSS.
_READ_UP_TO = 1 << 20
# The bytes of a body still to come, while a reader expects them (:func:`expect_body`): a read waits until that
# many (up to _READ_UP_TO) have arrived (SO_RCVLOWAT), instead of waking for every few KB.
_BODY_LEFT: ContextVar[list[int] | None] = ContextVar("nanobatch_body_left", default=None)
_CAN_WAIT_FOR_BYTES = sys.platform.startswith("linux")  # where SO_RCVLOWAT holds back poll and epoll too


@contextlib.contextmanager
def expect_body(length: int) -> Iterator[list[int]]:
    """While the block runs, reads through this module's streams (in this task) wait for the bytes of a body
    of *length* to arrive in big pieces: keep ``left[0]`` at the bytes not yet read (never more: a read would
    wait for bytes that never come, until its timeout)."""
    left = [length]
    token = _BODY_LEFT.set(left)
    try:
        yield left
    finally:
        _BODY_LEFT.reset(token)


logger = logging.getLogger("nanobatch")


class ShardedTransport(httpx2.AsyncBaseTransport):
    """Sends each request through the least busy of ``ceil(max_connections / POOL_SIZE)`` pools."""

    def __init__(self, max_connections: int, per_pool: int = POOL_SIZE, *, tls: bool = True) -> None:
        """*tls*: whether requests may go to ``https://`` URLs; False (a plain ``http://`` endpoint, such as the
        simulator or a local proxy) spares loading the CA bundle (35-55 ms of CPU per run), and a TLS handshake,
        should one be asked for anyway, fails: its context trusts no certificate."""
        per_pool = min(per_pool, max_connections)
        count = max(1, -(-max_connections // per_pool))
        limits = httpx2.Limits(max_connections=per_pool, max_keepalive_connections=per_pool)
        # One TLS context for all pools: each of httpx2's own loads the CA bundle again (bench/RESULTS.md).
        context = httpx2.create_ssl_context() if tls else ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        self._pools = [httpx2.AsyncHTTPTransport(verify=context, limits=limits) for _ in range(count)]
        for pool in self._pools:
            _wrap_streams(pool)
        self._busy = [0] * count

    @property
    def pools(self) -> int:
        """How many connection pools requests are spread over."""
        return len(self._pools)

    @property
    def in_use(self) -> int:
        """Requests on their way or answers still being read, over all pools."""
        return sum(self._busy)

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        index = min(range(len(self._pools)), key=self._busy.__getitem__)
        self._busy[index] += 1
        try:
            response = await self._pools[index].handle_async_request(request)
        except BaseException:
            self._busy[index] -= 1
            raise
        # The connection stays busy until the body has been read and closed (the same response, its stream
        # wrapped: a new Response would parse its headers again, per request).
        response.stream = _Tracked(response.stream, self._busy, index)  # type: ignore[arg-type]
        return response

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


def _wrap_streams(transport: httpx2.AsyncHTTPTransport) -> None:
    """Give *transport*'s connection pool streams that join small writes (httpx2 has no option for a backend)."""
    pool = getattr(transport, "_pool", None)
    backend = getattr(pool, "_network_backend", None)
    if isinstance(backend, httpcore2.AsyncNetworkBackend):
        pool._network_backend = _Backend(backend)  # type: ignore[union-attr]
    else:  # an httpx2 that keeps it elsewhere: everything still works, at httpcore2's own cost per request
        logger.debug("httpx2's connection pool has no network backend to wrap; sending as httpcore2 does")


class _Backend(httpcore2.AsyncNetworkBackend):
    def __init__(self, inner: httpcore2.AsyncNetworkBackend) -> None:
        self._inner = inner

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore2.AsyncNetworkStream:
        return _Stream(await self._inner.connect_tcp(host, port, timeout, local_address, socket_options))

    async def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore2.AsyncNetworkStream:
        return _Stream(await self._inner.connect_unix_socket(path, timeout, socket_options))

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class _Stream(httpcore2.AsyncNetworkStream):
    """A stream whose small writes wait for the next write or read, so that a request leaves in one send().

    httpcore2 reads only once the whole request is written, so every byte is out before an answer is awaited."""

    def __init__(self, inner: httpcore2.AsyncNetworkStream) -> None:
        self._inner = inner
        self._held = b""
        self._timeout: float | None = None
        self._socket: socket.socket | None = inner.get_extra_info("socket")
        self._low = 1  # the socket's SO_RCVLOWAT
        # Through TLS the socket's bytes are records, some of them already taken into the TLS object while the
        # body's bytes still to come are counted in plain text: waiting for that many could wait for ever.
        self._plain = _CAN_WAIT_FOR_BYTES and inner.get_extra_info("ssl_object") is None
        self._transport = _asyncio_transport(inner)
        self._recv_size = getattr(self._transport, "max_size", None)  # asyncio's own, restored after a body

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._timeout = timeout
        if len(self._held) + len(buffer) <= _JOIN_UP_TO:
            self._held += buffer
            return
        await self._flush()
        await self._inner.write(buffer, timeout)  # a big body as it is: no copy

    async def _flush(self) -> None:
        if self._held:
            held, self._held = self._held, b""
            await self._inner.write(held, self._timeout)

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        await self._flush()
        left = _BODY_LEFT.get()
        big = left is not None and left[0] > _READ_UP_TO // 4
        self._wait_for(min(left[0], _READ_UP_TO) if big and left is not None else 1)
        return await self._inner.read(max(max_bytes, _READ_UP_TO) if big else max_bytes, timeout)

    def _wait_for(self, low: int) -> None:
        """Let the socket say it is readable only once *low* bytes have arrived (or it is closed), and asyncio
        take them in one recv(); 1: as it does by default."""
        if low != self._low and self._socket is not None and self._plain:
            try:
                self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, low)
            except OSError:  # not allowed here: reads wake as bytes come
                self._plain = False
                return
            self._low = low
            if isinstance(self._recv_size, int):  # bigger recv()s only for such a body (peak RSS: docs/performance.md)
                self._transport.max_size = max(low, self._recv_size)

    async def aclose(self) -> None:
        self._held = b""
        await self._inner.aclose()

    async def start_tls(
        self, ssl_context: Any, server_hostname: str | None = None, timeout: float | None = None
    ) -> Any:
        await self._flush()
        return _Stream(await self._inner.start_tls(ssl_context, server_hostname, timeout))

    def get_extra_info(self, info: str) -> Any:
        if info == "is_readable" and self._socket is not None:
            self._wait_for(1)  # an idle connection: any byte (or its close) makes it readable
            return _readable(self._socket)
        return self._inner.get_extra_info(info)


def _asyncio_transport(stream: httpcore2.AsyncNetworkStream) -> Any:
    """asyncio's transport under *stream* (httpcore2's anyio stream), whose ``max_size`` is how much one recv()
    takes (256 KB): with a body's bytes waited for in big pieces, it would read a quarter of them per wake-up.
    None where there is none (another event loop)."""
    return getattr(getattr(stream, "_stream", None), "_transport", None)


def _readable(sock: socket.socket) -> bool:
    """Whether a read would return at once (data, or the b"" of a connection the server closed)."""
    fd = sock.fileno()
    if fd < 0:
        return True
    if not hasattr(select, "poll"):  # Windows
        return bool(select.select([fd], [], [], 0)[0])
    poll = select.poll()
    poll.register(fd, select.POLLIN)
    return bool(poll.poll(0))
