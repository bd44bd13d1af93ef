"""Messages fit to leave nanobatch: no API key, and no URL's user name, password, query or signature, in what an
error, a log line, a record or the report says (a server, a proxy or a library may echo what it was sent)."""

from __future__ import annotations

import dataclasses
import re
import urllib.parse
from collections.abc import Mapping
from typing import Any

import httpx2
import orjson

from ..errors import ApiError
from .causes import classify_error
from .gemini import Reply

__all__ = ["public_url", "redact", "redact_reply", "redact_urls", "scrub", "scrubbed_error"]

_REPLY_TEXT_FIELDS = ("text", "finish_reason", "finish_message", "block_reason", "model_version", "response_id")


def scrubbed_error(
    status: int, headers: Mapping[str, str], content: bytes, secret: str | None, *, one_request: bool = False
) -> ApiError:
    """The classified error for an answer of *status* (:func:`~nanobatch.api.causes.classify_error`), its message
    without the key and without any URL's password, query or signature."""
    error = classify_error(status, headers, content, one_request=one_request)
    error.message = scrub(error.message, secret)
    error.args = (error.message,)
    return error


def public_url(url: str | httpx2.URL) -> str:
    """*url* fit for a message or a log: without user name, password, query or fragment, where a key or a
    signature hides (a pre-signed URL's ``X-Amz-Signature``, an Azure SAS ``sig``, a proxy's ``?key=``).

    >>> public_url("https://user:s3cret@proxy.example/v1?key=abc")
    'https://proxy.example/v1'
    """
    text = str(url)
    try:
        parts = urllib.parse.urlsplit(text)
    except ValueError:  # not a URL as urllib reads them (a bad IPv6 host): cut by hand
        parts = urllib.parse.SplitResult("", "", text.split("?", 1)[0].split("#", 1)[0].rpartition("@")[2], "", "")
    host = parts.netloc.rpartition("@")[2]
    return urllib.parse.urlunsplit((parts.scheme, host, parts.path, "", ""))


def redact_urls(text: str) -> str:
    """*text* with every URL that carries a user name, password or query shown by :func:`public_url`: what a
    server or a library says may echo the URL it was asked for, signature and all.

    >>> redact_urls("cannot fetch https://b.example/a.png?X-Amz-Signature=f00d: 403")
    'cannot fetch https://b.example/a.png: 403'
    """
    if "://" not in text:
        return text
    return _URL.sub(lambda m: public_url(m[0]) if "@" in m[0] or "?" in m[0] else m[0], text)


_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s\"'<>]*[^\s\"'<>.,:;)\]]")  # not the sentence's punctuation


def redact(text: str, secret: str | None) -> str:
    return text.replace(secret, "[redacted]") if secret else text


def scrub(text: str, secret: str | None) -> str:
    """A message fit to leave this module: no key, no URL's password, query or signature."""
    return redact_urls(redact(text, secret))


def redact_reply(reply: Reply, secret: str | None) -> Reply:
    """The reply with the key taken out of everything it says in words: a proxy that echoes the
    request ("low balance on <key>") must not put the key into results.jsonl or the report."""
    if not secret:
        return reply
    # parse_reply made each of these text (or None), whatever a proxy sent.
    changes: dict[str, Any] = {
        name: redact(value, secret)
        for name in _REPLY_TEXT_FIELDS
        if (value := getattr(reply, name)) is not None and secret in value
    }
    usage = orjson.dumps(reply.usage).decode()
    if secret in usage:
        changes["usage"] = orjson.loads(redact(usage, secret))
    return dataclasses.replace(reply, **changes) if changes else reply
