"""HTTP: one ``generateContent`` request through httpx2, errors translated to :class:`ApiError`.

The API key lives here and only here: it goes into a request header and is
redacted from every message that leaves this module.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from types import TracebackType
from typing import Any

import httpx2
import orjson

from ._transport import ShardedTransport
from .errors import ApiError
from .gemini import Reply, classify_error, parse_reply

__all__ = ["GeminiClient"]

logger = logging.getLogger("nanobatch")

_CONNECT_TIMEOUT_S = 20.0
_WRITE_TIMEOUT_S = 120.0  # a request with 14 reference images is tens of MB


class GeminiClient:
    """An async client for ``POST {base_url}/{api_version}/models/{model}:generateContent``.

    >>> async with GeminiClient(base_url="https://generativelanguage.googleapis.com",
    ...                         api_key=key, auth="x-goog-api-key") as client:
    ...     reply = await client.generate("gemini-2.5-flash-image", body, timeout_s=300)
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
    ) -> None:
        headers = {"Content-Type": "application/json", "User-Agent": "nanobatch"}
        if api_key:
            if auth == "x-goog-api-key":
                headers["x-goog-api-key"] = api_key
            else:
                headers["Authorization"] = f"Bearer {api_key}"
        self._secret = api_key
        self._prefix = f"/{api_version.strip('/')}/models/"
        limits = httpx2.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
        if transport is None and not _proxy_configured():
            transport = ShardedTransport(max_connections)
        self._http = httpx2.AsyncClient(
            base_url=base_url.rstrip("/"), headers=headers, transport=transport, limits=limits, follow_redirects=False
        )

    async def __aenter__(self) -> GeminiClient:
        await self._http.__aenter__()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._http.__aexit__(exc_type, exc, tb)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def generate(self, model: str, body: dict[str, Any], *, timeout_s: float) -> Reply:
        """Send one request; return the parsed 200 reply or raise :class:`ApiError` (one attempt, no retry)."""
        content = orjson.dumps(body)  # compact, UTF-8; several times faster than json.dumps with big base64 strings
        timeout = httpx2.Timeout(timeout_s, connect=_CONNECT_TIMEOUT_S, write=_WRITE_TIMEOUT_S, pool=None)
        try:
            response = await self._http.post(f"{self._prefix}{model}:generateContent", content=content, timeout=timeout)
        except httpx2.TimeoutException as exc:
            raise ApiError(
                self._redact(f"no answer within the time limit ({type(exc).__name__})"), kind="timeout", retryable=True
            ) from None
        except httpx2.TransportError as exc:
            raise ApiError(
                self._redact(f"connection failed: {type(exc).__name__}: {exc}"), kind="connection", retryable=True
            ) from None
        except httpx2.DecodingError as exc:  # a body cut off or mangled in its Content-Encoding
            raise ApiError(
                self._redact(f"the response body could not be decoded: {exc}"), kind="bad_response", retryable=True
            ) from None
        if response.status_code == 200:
            reply = parse_reply(response.content)
            return self._redact_reply(reply, self._secret) if self._secret else reply
        error = classify_error(response.status_code, response.headers, response.content)
        error.message = self._redact(error.message)
        error.args = (error.message,)
        raise error

    def _redact(self, text: str) -> str:
        return text.replace(self._secret, "[redacted]") if self._secret else text

    def _redact_reply(self, reply: Reply, secret: str) -> Reply:
        """The reply with the key taken out of everything it says in words: a proxy that echoes the
        request ("low balance on <key>") must not put the key into results.jsonl or the report."""
        # parse_reply made each of these text (or None), whatever a proxy sent.
        changes: dict[str, Any] = {
            name: self._redact(value)
            for name in _REPLY_TEXT_FIELDS
            if (value := getattr(reply, name)) is not None and secret in value
        }
        usage = orjson.dumps(reply.usage).decode()
        if secret in usage:
            changes["usage"] = orjson.loads(self._redact(usage))
        return dataclasses.replace(reply, **changes) if changes else reply


_REPLY_TEXT_FIELDS = ("text", "finish_reason", "finish_message", "block_reason", "model_version", "response_id")


def _proxy_configured() -> bool:
    """httpx2 honours *_PROXY variables only for transports it builds itself: keep to one pool then."""
    return any(name.lower() in ("http_proxy", "https_proxy", "all_proxy") for name in os.environ)
