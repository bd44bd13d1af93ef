"""Messages fit to leave nanobatch: no credential, and no URL's user name, password, query or signature, in what an
error, a log line, a record or the report says (a server, a proxy or a library may echo what it was sent).

Each credential is known by :data:`SECRETS` from the moment the settings that lead to it are read
(:meth:`Secrets.learn`: the API key, a base URL's password and query values and the Basic header they make, the
webhook's URL), or, for one fetched later, as it is fetched (each Vertex access token). Every message made from
what came back is cut of them *before* it is shortened or quoted, and each way out of the process cuts them
again: the command line's log filter and error output, the webhook's body, ``results.jsonl`` and ``summary.json``
(:meth:`Secrets.cut_json`). Tokens shaped like Google's access tokens or like signed JWTs (a token endpoint may
echo the assertion it was sent) are cut whatever they are.
"""

from __future__ import annotations

import base64
import json
import os
import re
import urllib.parse
from collections.abc import Mapping
from typing import TYPE_CHECKING

import orjson

from ..errors import ApiError
from .causes import classify_error

if TYPE_CHECKING:  # the command line's log filter uses this module at start-up: nothing heavy at run time
    import httpx2

    from ..config import Settings

__all__ = [
    "SECRETS",
    "Secrets",
    "StreamCut",
    "public_url",
    "redact",
    "redact_urls",
    "scrub",
    "scrubbed_error",
]

MIN_SECRET = 6  # shorter values (a query's "1" or "true") would cut ordinary words out of messages
STREAM_MIN_SECRET = 12  # in a downloaded results file (see StreamCut)


def _tokens(access_token_min: int) -> str:
    """Tokens cut whatever they are, not inside a word (an item's id "freya29.summer-dress" is no token): a Google
    OAuth access token with at least *access_token_min* characters after ``ya29.``, and a signed JWT."""
    return (
        rf"(?<![A-Za-z0-9])ya29\.[A-Za-z0-9_.-]{{{access_token_min},}}"
        r"|(?<![A-Za-z0-9])eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]*"  # header.payload.signature
    )


_TOKENS = re.compile(_tokens(8))
# In a whole record (ids, file names, inputs: what finds its work again), only a token as long as real ones are:
# a record cut wrongly is an item sent, and paid for, again.
_TOKEN_BYTES = re.compile(_tokens(24).encode())


class Secrets:
    """The credentials this process sends, to cut out of what it says (see the module's docstring)."""

    def __init__(self) -> None:
        self._values: tuple[str, ...] = ()  # longest first: a secret inside another is cut with it
        self._json: tuple[bytes, ...] = ()  # the same, as JSON writes them inside a string (see cut_json)

    def __bool__(self) -> bool:
        return bool(self._values)

    def add(self, *values: str | None) -> None:
        new = {value for value in values if value and len(value) >= MIN_SECRET}.difference(self._values)
        if new:
            self._values = tuple(sorted({*self._values, *new}, key=len, reverse=True))
            # orjson writes UTF-8, json.dumps \u escapes; both escape " and \ (a key may hold them)
            # (in a whole record only a value as long as STREAM_MIN_SECRET: a short one, a proxy's password, could
            # be part of an id or a file's name; the messages that could quote it are cut of it as they are made)
            long = (value for value in self._values if len(value) >= STREAM_MIN_SECRET)
            forms = {form for value in long for form in (orjson.dumps(value), json.dumps(value).encode())}
            self._json = tuple(sorted((form[1:-1] for form in forms), key=len, reverse=True))

    def learn(self, settings: Settings, env: Mapping[str, str] | None = None) -> None:
        """Know the credentials *settings* lead to as soon as they are read, before anything is checked, sent or
        told: the key in the variable ``api.api_key_env`` names (and in ``GEMINI_API_KEY``, its fallback), what
        ``api.base_url`` carries, and the webhook's URL in the variable ``notify.url_env`` names. A value the
        settings would refuse is known all the same: the refusal does not show it, but a later message might."""
        from ..config import FALLBACK_KEY_ENV  # (not at start-up: the log filter imports this module)

        env = os.environ if env is None else env
        self.add(*(env.get(name, "").strip() for name in (settings.api.api_key_env, FALLBACK_KEY_ENV)))
        self.add_url(settings.api.base_url)
        if hook := env.get(settings.notify.url_env, "").strip():
            self.add(hook)
            self.add_url(hook)

    def add_url(self, url: str) -> None:
        """A URL's password (as written, decoded, with its user name, and as the Basic header sends it) and the
        values of its query, where a proxy's key hides (``?key=...``)."""
        try:
            parts = urllib.parse.urlsplit(url)
            password, user = parts.password, parts.username or ""
        except ValueError:
            return
        if password:
            pair = f"{urllib.parse.unquote(user)}:{urllib.parse.unquote(password)}"
            self.add(password, urllib.parse.unquote(password), pair, base64.b64encode(pair.encode()).decode())
        self.add(*(value for _, value in urllib.parse.parse_qsl(parts.query)))
        self.add(*(value for value in parts.query.split("&")))

    @property
    def values(self) -> tuple[str, ...]:
        return self._values

    def found_in(self, text: str) -> bool:
        return any(value in text for value in self._values)

    def cut(self, text: str) -> str:
        for value in self._values:
            if value in text:
                text = text.replace(value, "[redacted]")
        return _TOKENS.sub("[redacted]", text) if ("ya29." in text or "eyJ" in text) else text

    def cut_json(self, data: bytes) -> bytes:
        """*data*, serialized JSON (a batch of ``results.jsonl`` lines, ``summary.json``, the webhook's body), with
        every secret cut out of the strings it holds, as JSON wrote them: looked for once, cut only where found.

        >>> secrets = Secrets()
        >>> secrets.add("sk-live-0123456789")
        >>> secrets.cut_json(b'{"error": "no credit on sk-live-0123456789"}')
        b'{"error": "no credit on [redacted]"}'
        """
        if any(form in data for form in self._json):
            for form in self._json:
                data = data.replace(form, b"[redacted]")
        return _TOKEN_BYTES.sub(b"[redacted]", data) if (b"ya29." in data or b"eyJ" in data) else data


SECRETS = Secrets()  # the process's: what its settings lead to, its clients and its Vertex tokens put in


class StreamCut:
    """*secret* (a client's key) and what :data:`SECRETS` knows cut out of bytes that come in pieces (a batch
    results file as it downloads, before it reaches the disk): one split between two pieces is cut too, by
    holding back the last bytes of each piece until the next (fewer than the longest secret's length)."""

    def __init__(self, secret: str | None) -> None:
        # Not the shortest: a results file is mostly base64 image data, where 6 characters that happen to spell a
        # short query value would be cut out of a picture; 12 or more never do by chance (64**12 spellings).
        values = {value for value in (*SECRETS.values, secret or "") if len(value) >= STREAM_MIN_SECRET}
        self._values = tuple(value.encode() for value in sorted(values, key=len, reverse=True))
        self._hold = max(map(len, self._values), default=1) - 1
        self._held = b""

    def feed(self, data: bytes) -> bytes:
        """What of *data* (and the bytes held back before it) can be written now."""
        if not self._values:
            return data
        data = self._held + data
        for value in self._values:
            if value in data:
                data = data.replace(value, b"[redacted]")
        keep = max(len(data) - self._hold, 0)
        self._held = data[keep:]
        return data[:keep]

    def end(self) -> bytes:
        """The bytes held back, once the last piece has been fed."""
        held, self._held = self._held, b""
        return held


def scrubbed_error(
    status: int, headers: Mapping[str, str], content: bytes, secret: str | None, *, one_request: bool = False
) -> ApiError:
    """The classified error for an answer of *status* (:func:`~nanobatch.api.causes.classify_error`), its message
    without the key and without any URL's password, query or signature: the body is cut of them before the
    message is taken from it (and shortened, which would leave the start of a key)."""
    text = content.decode("utf-8", "replace")
    if (secret and secret in text) or SECRETS.found_in(text) or "ya29." in text or "eyJ" in text:
        content = redact(text, secret).encode()
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
    """*text* without *secret* (a client's key, unless shorter than :data:`MIN_SECRET`: a test key ``k`` would cut
    every ``k`` out of the answer, ``promptTokenCount`` too) and anything :data:`SECRETS` knows."""
    return SECRETS.cut(text.replace(secret, "[redacted]") if secret and len(secret) >= MIN_SECRET else text)


def scrub(text: str, secret: str | None) -> str:
    """A message fit to leave this module: no key, no URL's password, query or signature."""
    return redact_urls(redact(text, secret))
