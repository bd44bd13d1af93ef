"""HTTP: one ``generateContent`` request through httpx2, errors translated to :class:`ApiError`.

The API key lives here and only here: it goes into a request header and is
redacted from every message that leaves this module.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import os
import socket
from collections.abc import AsyncIterator, Iterator
from types import TracebackType
from typing import Any, Protocol, Self

import anyio
import httpx2
import orjson

from ..errors import ApiError
from .budget import ByteBudget, Held
from .decoding import WORKERS_FROM_BYTES, Decoder
from .gemini import Reply, redact_reply
from .redaction import SECRETS, public_url, scrub, scrubbed_error
from .transport import ShardedTransport, expect_body

__all__ = [
    "ApiClient",
    "Backlog",
    "GeminiClient",
    "api_error",
    "auth_headers",
    "http_errors",
]

logger = logging.getLogger("nanobatch")

_CONNECT_TIMEOUT_S = 20.0
# Where the Gemini API says which tier served an answer (https://ai.google.dev/gemini-api/docs/priority-inference,
# read 2026-12-07): "standard" for a priority request past priority's limit, served and billed at standard.
SERVED_TIER_HEADER = "x-gemini-service-tier"
# orjson's bytes keep what it reserved to escape strings (8 MB for a 0.6 MB body): bodies this big are copied to size.
_RIGHT_SIZE_FROM = 64 * 2**10
_WRITE_TIMEOUT_S = 120.0  # a request with 14 reference images is tens of MB
# Answers' bodies read and being decoded at once, in bytes: two 4K answers (32 MB of JSON each), eight 2K ones.
# Peak memory per answer is its body and its image (decoded from the body's bytes: nanobatch.api.lifting), and
# the decoding, not the reading, is what takes time: docs/performance.md.
ANSWER_BYTES = 64 * 2**20
# An answer waits unread for a run's backlog (see GeminiClient._held) at most this long, then is read anyway:
# a response stalled for longer may be dropped by the server or a proxy, and a request sent again is paid again.
BACKLOG_WAIT_S = 60.0


class Backlog(Protocol):
    """Where a run's answers go once read (:class:`nanobatch.output.writer.WriteQueue`): :meth:`full` while an
    answer read now would wait in memory for it; :meth:`room` waits until it is not."""

    def full(self) -> bool: ...

    async def room(self) -> None: ...


class ApiClient:
    """What :class:`GeminiClient` and :class:`~nanobatch.api.batch_api.BatchClient` share: one httpx2 client at
    *base_url* carrying the key as *auth* says, used as an async context manager, and :attr:`where` to name it
    in messages (no user name, password or query: a key could hide there)."""

    def __init__(
        self,
        *,
        base_url: str,
        api_key: str | None,
        auth: str,
        transport: httpx2.AsyncBaseTransport | None,
        request_auth: httpx2.Auth | None = None,
        workers: int | None = 0,
        spool: str | None = None,
        **options: Any,
    ) -> None:
        # Big answers decoded in *workers* processes (0: in this one), their images written into *spool*.
        self.decoder = Decoder(workers, spool)
        self._secret = api_key
        SECRETS.add(api_key)  # and what the base URL carries: a proxy's password or ?key= (redaction.py)
        SECRETS.add_url(base_url)
        self._http = httpx2.AsyncClient(
            base_url=base_url.rstrip("/"), headers=auth_headers(api_key, auth), transport=transport,
            follow_redirects=False, auth=request_auth, **options,
        )  # fmt: skip
        self.where = public_url(self._http.base_url).rstrip("/")

    @property
    def base_url(self) -> str:
        """The whole base URL, credentials and all: for another client to the same endpoint, never for a message."""
        return str(self._http.base_url).rstrip("/")

    async def __aenter__(self) -> Self:
        await self._http.__aenter__()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.decoder.close()
        await self._http.__aexit__(exc_type, exc, tb)

    async def aclose(self) -> None:
        self.decoder.close()
        await self._http.aclose()


class GeminiClient(ApiClient):
    """An async client for ``POST {base_url}/{api_version}/models/{model}:generateContent``.

    >>> async with GeminiClient(base_url="https://generativelanguage.googleapis.com",
    ...                         api_key=key, auth="x-goog-api-key") as client:
    ...     reply = await client.generate("gemini-nano-banana-2.1", body, timeout_s=300)
    """

    def __init__(
        self,
        *,
        base_url: str,
        api_key: str | None,
        auth: str = "bearer",
        api_version: str = "v1beta",
        max_connections: int = 100,
        transport: httpx2.AsyncBaseTransport | None = None,
        path_prefix: str | None = None,
        request_auth: httpx2.Auth | None = None,
        answer_bytes: int | None = None,
        workers: int | None = 0,
        spool: str | None = None,
    ) -> None:
        """*path_prefix* replaces ``/{api_version}/models/`` (Vertex AI's path); *request_auth* signs each
        request (Vertex AI's OAuth2 bearer token); *answer_bytes* bounds the answers read and decoded at once
        (:class:`~nanobatch.api.budget.ByteBudget`); *workers* processes decode big answers and write their
        images into *spool*, the output folder (:class:`~nanobatch.api.decoding.Decoder`; 0: this process does)."""
        # Big bodies (those a worker would decode) are read ahead no further than one more than can be decoded
        # at once: one waiting its turn is as good as six, and each holds up to 32 MB (docs/performance.md).
        self.answers = ByteBudget(
            ANSWER_BYTES if answer_bytes is None else answer_bytes,
            big_from=WORKERS_FROM_BYTES,
            most_big=lambda: self.decoder.at_once() + 1,
        )
        # What takes the answers (a run's writer): while it is full, a body is left unread, in its socket.
        self.backlog: Backlog | None = None
        self._last_size = 0
        self._prefix = path_prefix or f"/{api_version.strip('/')}/models/"
        limits = httpx2.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
        if transport is None and not _proxy_configured():
            transport = ShardedTransport(max_connections, tls=not base_url.lower().startswith("http://"))
        super().__init__(
            base_url=base_url, api_key=api_key, auth=auth, transport=transport, request_auth=request_auth,
            limits=limits, workers=workers, spool=spool,
        )  # fmt: skip
        # Straight to the transport when nothing of httpx2's client is needed between: no request signing, no
        # proxy (which the client mounts), no redirects followed, no cookies: less CPU per small request
        # (docs/performance.md). A signed request (Vertex AI), or one to a proxy whose user name and password
        # the base URL holds (the client sends them as Basic auth), goes through the client.
        self._direct = transport if request_auth is None and not self._http.base_url.userinfo else None
        # Each model's full URL, joined to the base URL once: httpx2 parses and joins a relative path again on
        # every request (bench row "0 peers", small answers; bench/RESULTS.md).
        self._urls: dict[str, httpx2.URL] = {}

    async def list_models(self, *, page_size: int = 50, timeout_s: float = 60.0) -> list[dict[str, Any]]:
        """Every entry of ``GET /{version}/models``, following ``nextPageToken`` across pages."""
        entries: list[dict[str, Any]] = []
        token: str | None = None
        for _ in range(1000):  # a server that never stops paging is not followed forever
            params: dict[str, Any] = {"pageSize": page_size, **({"pageToken": token} if token else {})}
            with http_errors(self._secret, self.where):
                response = await self._http.get(self._prefix.rstrip("/"), params=params, timeout=timeout_s)
            if response.status_code != 200:
                raise api_error(response, self._secret)
            data = orjson.loads(response.content)
            entries += [m for m in data.get("models", []) if isinstance(m, dict)]
            token = data.get("nextPageToken") or None
            if token is None:
                break
        return entries

    async def generate(self, model: str, body: dict[str, Any], *, timeout_s: float) -> Reply:
        """Send one request; return the parsed 200 reply or raise :class:`ApiError` (one attempt, no retry)."""
        content = orjson.dumps(body)  # compact, UTF-8; faster than json.dumps on big base64 strings: bench/RESULTS.md
        if len(content) > _RIGHT_SIZE_FROM:  # held as long as its answer takes: at its size (see the constant)
            content = bytes(memoryview(content))
        timeout = httpx2.Timeout(timeout_s, connect=_CONNECT_TIMEOUT_S, write=_WRITE_TIMEOUT_S, pool=None)
        if (url := self._urls.get(model)) is None:
            url = self._urls[model] = self._http.build_request("POST", f"{self._prefix}{model}:generateContent").url
        # httpx's timeouts bound each read: an answer trickling a byte at a time would never end. The whole
        # request, from connecting to its last byte, gets timeout_s.
        reply: Reply | None = None
        with anyio.move_on_after(timeout_s) as whole, http_errors(self._secret, self.where):
            async with self._post(url, content, timeout) as response:
                if response.status_code == 200:
                    reply = await self._read_reply(response, whole)
                    if said := response.headers.get(SERVED_TIER_HEADER):
                        reply = dataclasses.replace(reply, served_tier=said)
                else:
                    await response.aread()
        if whole.cancelled_caught:
            raise ApiError(
                f"no whole answer within {timeout_s:g} s (api.timeout_s): the answer came too slowly",
                kind="timeout",
                retryable=True,
            )
        if reply is not None:
            return redact_reply(reply, self._secret)
        raise api_error(response, self._secret)

    @contextlib.asynccontextmanager
    async def _post(self, url: httpx2.URL, content: bytes, limits: httpx2.Timeout) -> AsyncIterator[httpx2.Response]:
        """POST *content* to *url* under httpx's per-phase time *limits*; the response's body is for the caller
        to read."""
        if self._direct is None:
            async with self._http.stream("POST", url, content=content, timeout=limits) as response:
                yield response
            return
        request = httpx2.Request(
            "POST", url, content=content, headers=self._http.headers, extensions={"timeout": limits.as_dict()}
        )
        response = await self._direct.handle_async_request(request)
        response.request = request
        try:
            yield response
        finally:
            await response.aclose()

    @contextlib.asynccontextmanager
    async def _held(self, size: int, whole: anyio.CancelScope) -> AsyncIterator[Held]:
        """*size* bytes of the byte budget, and room at :attr:`backlog` (for at most :data:`BACKLOG_WAIT_S`),
        both waited for outside the request's own time (*whole*'s deadline, moved on by the wait): the answer is
        there, its headers read; one kept waiting for the answers before it, or for a slow disk, is not one that
        came too slowly, to be paid for again. (Waits once its body is read, for a worker process, still count.)"""
        if self.answers.free_for(size) and (self.backlog is None or not self.backlog.full()):
            async with self.answers.hold(size) as held:  # the usual case: the deadline is left alone
                yield held
            return
        deadline, whole.deadline = whole.deadline, math.inf
        started = anyio.current_time()
        waiting = True
        try:
            async with self.answers.hold(size) as held:
                if self.backlog is not None:
                    # Holding its bytes, so that no more answers are read meanwhile than the budget holds; the
                    # limit counts from the answer's arrival, so a wait for the budget behind answers that wait
                    # here too does not leave it unread longer.
                    with anyio.CancelScope(deadline=started + BACKLOG_WAIT_S):
                        await self.backlog.room()
                whole.deadline, waiting = deadline + (anyio.current_time() - started), False
                yield held
        finally:
            if waiting:
                whole.deadline = deadline + (anyio.current_time() - started)

    async def _read_reply(self, response: httpx2.Response, whole: anyio.CancelScope) -> Reply:
        """A 200 answer, read and decoded within the byte budget; its body is held once (no list of chunks
        joined into a copy), and its images decoded from it, with no text of them made
        (:func:`~nanobatch.api.gemini.parse_reply`)."""
        length = _plain_length(response)
        # A body of unknown length (compressed, or chunked) is expected to be as big as the last one.
        async with self._held(self._last_size if length is None else length, whole) as held:
            if length is not None and self.decoder.takes(length):  # read straight into a worker's shared memory
                self._last_size = length
                return await self.decoder.read_reply(length, functools.partial(_fill, response, big_pieces=True))
            body = await _read_body(response, length, held)
            self._last_size = len(body)
            return await self.decoder.reply(body, asked=length is not None)


async def _read_body(response: httpx2.Response, length: int | None, held: Held) -> bytearray:
    """*response*'s body in one buffer: of *length* bytes, filled in place, or grown as it comes (its bytes
    held as they arrive) when its length is not known beforehand."""
    if length is None:
        grown = bytearray()
        async for chunk in response.aiter_bytes():
            if len(grown) + len(chunk) > held.size:
                await held.grow(len(grown) + len(chunk) - held.size)
            grown += chunk
        return grown
    buffer = bytearray(length)
    with memoryview(buffer) as view:
        await _fill(response, view)
    return buffer


async def _fill(response: httpx2.Response, view: memoryview, *, big_pieces: bool = False) -> None:
    """Fill *view* with *response*'s body, exactly as long as it (its Content-Length); with *big_pieces*, read in
    pieces of up to 1 MiB, not as each few KB arrive (:func:`~nanobatch.api.transport.expect_body`): less CPU per
    body, but in this process's own heap the bigger pieces raised peak RSS (docs/performance.md)."""
    at, length = 0, len(view)
    with expect_body(length if big_pieces else 0) as left:
        async for chunk in response.aiter_bytes():
            if at + len(chunk) > length:  # h11 enforces Content-Length; this keeps the buffer honest anyway
                raise ApiError("the answer is longer than it said", kind="bad_response", retryable=True)
            view[at : at + len(chunk)] = chunk
            at += len(chunk)
            left[0] = length - at
    if at != length:
        raise ApiError("the answer is shorter than it said", kind="bad_response", retryable=True)


def _plain_length(response: httpx2.Response) -> int | None:
    """The body's length from Content-Length, if it is the body as it is read (no Content-Encoding)."""
    headers = response.headers
    if headers.get("content-encoding", "identity").lower() not in ("identity", ""):
        return None
    try:
        length = int(headers.get("content-length", ""))
    except ValueError:
        return None
    return length if length >= 0 else None


def auth_headers(api_key: str | None, auth: str) -> dict[str, str]:
    """The headers every request to the API carries: JSON, our name, and the key as *auth* says."""
    headers = {"Content-Type": "application/json", "User-Agent": "nanobatch"}
    if api_key:
        if auth == "x-goog-api-key":
            headers["x-goog-api-key"] = api_key
        else:
            headers["Authorization"] = f"Bearer {api_key}"
    return headers


@contextlib.contextmanager
def http_errors(secret: str | None, where: str = "the API") -> Iterator[None]:
    """Translate httpx's failures to a retryable :class:`ApiError`, the key (and any URL's query) taken out of
    the message.

    A connection that could not be made names *where* and why, and is marked ``sent=False``: the request
    never left, so it cost nothing.
    """
    try:
        yield
    except (httpx2.ConnectError, httpx2.ConnectTimeout, httpx2.PoolTimeout) as exc:
        raise ApiError(
            scrub(f"cannot connect to {where}: {_connect_failure(exc)}", secret),
            kind="timeout" if isinstance(exc, httpx2.TimeoutException) else "connection",
            retryable=True,
            sent=False,
        ) from None
    except httpx2.TimeoutException as exc:
        raise ApiError(
            scrub(f"no answer within the time limit ({type(exc).__name__})", secret), kind="timeout", retryable=True
        ) from None
    except httpx2.TransportError as exc:
        raise ApiError(
            scrub(f"connection failed: {type(exc).__name__}: {exc}", secret), kind="connection", retryable=True
        ) from None
    except httpx2.DecodingError as exc:  # a body cut off or mangled in its Content-Encoding
        raise ApiError(
            scrub(f"the response body could not be decoded: {exc}", secret), kind="bad_response", retryable=True
        ) from None


def api_error(response: httpx2.Response, secret: str | None) -> ApiError:
    """The classified error for a non-200 *response* (its body already read), without the key."""
    return scrubbed_error(response.status_code, response.headers, response.content, secret)


def _connect_failure(exc: httpx2.HTTPError) -> str:
    """Why a connection could not be made, in words (``connection refused``), from the OS error beneath *exc*."""
    if isinstance(exc, httpx2.TimeoutException):
        return f"no connection within {_CONNECT_TIMEOUT_S:g} s ({type(exc).__name__})"
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, socket.gaierror):
            return f"host name not found ({cause.strerror or cause})"
        if isinstance(cause, OSError) and isinstance(cause.errno, int) and cause.errno > 0:
            return os.strerror(cause.errno).lower()  # "connection refused", "network is unreachable"
        cause = cause.__cause__ or cause.__context__
    return str(exc) or type(exc).__name__


def _proxy_configured() -> bool:
    """httpx2 honours *_PROXY variables only for transports it builds itself: keep to one pool then."""
    return any(name.lower() in ("http_proxy", "https_proxy", "all_proxy") for name in os.environ)
