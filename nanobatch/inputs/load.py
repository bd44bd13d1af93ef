"""Input images, read when an item is dispatched (never before): local files and http(s) URLs.

* :class:`InputLoader`, one per run: one ``httpx2.AsyncClient`` for downloads,
  which never carries the API key; downloads are streamed under a size limit,
  retried like API calls, and cached, so a URL that many items share is fetched
  once. Pictures too big to send inline are refused, or downscaled with Pillow
  when the item says ``resize_inputs: true``.
* :func:`check_urls`, for ``nanobatch validate``: does each URL answer 2xx?
* Local stamps and the work key are in :mod:`nanobatch.inputs.stamps`.

A picture that cannot be loaded fails its item (error kind ``input``), not the run.
"""

from __future__ import annotations

import io
import logging
import math
import os
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType

import anyio
import httpx2

from ..api.gemini import Image
from ..api.redaction import public_url, redact_urls
from ..api.retry import RetryPolicy, retrying
from ..api.storage import is_bucket_url
from ..errors import ApiError, InputError, Problem
from ..item import WorkItem
from ..models import MAX_INPUT_BYTES, MAX_TOTAL_INPUT_BYTES, MB
from ..pictures import ACCEPTED_TYPES, picture_problem, sniff_mime
from .remote import input_field
from .stamps import is_remote, is_url, unreadable

__all__ = ["MAX_DOWNLOAD_BYTES", "InputLoader", "UrlChecklist", "check_urls", "load_inputs"]

logger = logging.getLogger("nanobatch")

# A download larger than this is refused without reading it whole (even with resize_inputs).
MAX_DOWNLOAD_BYTES = 20 * MB
# validate checks the URLs only when there are at most this many distinct ones.
URL_CHECK_LIMIT = 2000

_RETRYABLE_STATUS = {408, 425, 429, 500, 502, 503, 504}
_TIMEOUT = httpx2.Timeout(60.0, connect=20.0)
# What a check of a URL (httpx2, in a thread) raises, before any request, for one that cannot be fetched: one it
# cannot parse (a bad port, "URL too long"), or whose host the resolver cannot encode (UnicodeError: a part of the
# name longer than 63 characters).
_NOT_A_URL = (httpx2.InvalidURL, UnicodeError)
_CACHE_ENTRIES = 32
_CACHE_BYTES = 256 * MB


class _Cache:
    """Least-recently-used downloads, bounded by count and by bytes."""

    def __init__(self, entries: int, max_bytes: int) -> None:
        self.entries, self.max_bytes = entries, max_bytes
        self.items: OrderedDict[str, Image | InputError] = OrderedDict()
        self.size = 0

    def get(self, url: str) -> Image | InputError | None:
        value = self.items.get(url)
        if value is not None:
            self.items.move_to_end(url)
        return value

    def put(self, url: str, value: Image | InputError) -> None:
        self.size += _weight(value)
        self.items[url] = value
        while self.items and (len(self.items) > self.entries or self.size > self.max_bytes):
            _, dropped = self.items.popitem(last=False)
            self.size -= _weight(dropped)


def _weight(value: Image | InputError) -> int:
    return len(value.data) if isinstance(value, Image) else 0


class InputLoader:
    """Loads items' input images for one run; an async context manager (it owns a lazily made HTTP client).

    >>> async with InputLoader() as loader:
    ...     images = await loader.load(item.inputs, resize=item.resize_inputs)
    """

    def __init__(
        self,
        *,
        transport: httpx2.AsyncBaseTransport | None = None,
        max_input_bytes: int = MAX_INPUT_BYTES,
        max_total_bytes: int = MAX_TOTAL_INPUT_BYTES,
        max_download_bytes: int = MAX_DOWNLOAD_BYTES,
        cache_entries: int = _CACHE_ENTRIES,
        cache_bytes: int = _CACHE_BYTES,
    ) -> None:
        self.transport = transport
        self.max_input_bytes = max_input_bytes
        self.max_total_bytes = max_total_bytes
        self.max_download_bytes = max_download_bytes
        self.cache = _Cache(cache_entries, cache_bytes)
        self.downloads = 0  # URLs fetched (not counting retries); cache hits are not downloads
        self._http: httpx2.AsyncClient | None = None
        self._pending: dict[str, anyio.Event] = {}

    async def __aenter__(self) -> InputLoader:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    async def load(
        self,
        refs: Sequence[str],
        *,
        resize: bool = False,
        retry: RetryPolicy | None = None,
        contents: Mapping[str, bytes] | None = None,
    ) -> list[Image]:
        """The images of *refs*, in order, within the inline size limits; raises :class:`InputError`.

        *contents*: bytes of local files already read (by :func:`local_stamps`), not read again.
        Every other local file is read in one worker thread hand-off; only downscaling takes another.
        """
        policy = retry if retry is not None else RetryPolicy()
        known = contents or {}
        unread = [ref for ref in refs if not is_remote(ref) and ref not in known]
        read: dict[str, Image | InputError] = {}
        if unread:
            read = await anyio.to_thread.run_sync(self._read_locals, unread, resize)
        images = []
        for ref in refs:  # the first failing input, in order, fails the item (and later URLs are not fetched)
            if is_remote(ref):
                images.append(await self._fetch(ref, policy))
            elif ref in known:
                images.append(_as_image(ref, known[ref]))
            elif isinstance(loaded := read[ref], InputError):
                raise loaded
            else:
                images.append(loaded)
        if not images or self._fits(refs, images, resize):
            return images
        return await anyio.to_thread.run_sync(self._downscale_all, list(refs), images)

    def _read_locals(self, paths: list[str], resize: bool) -> dict[str, Image | InputError]:
        found: dict[str, Image | InputError] = {}
        for path in paths:
            try:
                found[path] = self._read_local(path, resize)
            except InputError as exc:
                found[path] = exc
        return found

    def _read_local(self, path: str, resize: bool) -> Image:
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size > self.max_input_bytes and not resize:
                    raise InputError(_too_big(path, size, self.max_input_bytes))
                data = f.read()
        except OSError as exc:
            raise unreadable(path, exc) from None
        return _as_image(path, data)

    def _fits(self, refs: Sequence[str], images: list[Image], resize: bool) -> bool:
        """True if the pictures fit the per-image and per-request limits; if not, without *resize*, the error."""
        total = sum(len(i.data) for i in images)
        if not resize:
            for ref, image in zip(refs, images, strict=True):
                if len(image.data) > self.max_input_bytes:
                    raise InputError(_too_big(ref, len(image.data), self.max_input_bytes))
            if total > self.max_total_bytes:
                raise InputError(
                    f"the {len(images)} input images take {total / MB:.1f} MB together, but one request can carry "
                    f"{self.max_total_bytes / MB:.0f} MB of images: set resize_inputs: true to downscale them"
                )
            return True
        return all(len(i.data) <= self.max_input_bytes for i in images) and total <= self.max_total_bytes

    def _downscale_all(self, refs: list[str], images: list[Image]) -> list[Image]:
        """Downscale the pictures over their share of the limits (Pillow: run in a worker thread)."""
        share = min(self.max_input_bytes, self.max_total_bytes // len(images))
        return [
            _downscale(ref, image, share) if len(image.data) > share else image
            for ref, image in zip(refs, images, strict=True)
        ]

    async def _fetch(self, url: str, policy: RetryPolicy) -> Image:
        while True:
            hit = self.cache.get(url)
            if isinstance(hit, Image):
                return hit
            if isinstance(hit, InputError):
                raise InputError(hit.message, status_code=hit.status_code)
            pending = self._pending.get(url)
            if pending is None:
                break
            await pending.wait()  # another item is fetching the same URL: share its result

        async def attempt() -> Image:  # a coroutine function: tenacity would not await a lambda's coroutine
            return await self._download(url)

        done = self._pending[url] = anyio.Event()
        try:
            self.downloads += 1
            image = await retrying(attempt, policy, on_retry=_log_retry)
        except InputError as exc:
            if not exc.retryable:
                self.cache.put(url, exc)  # a 404 stays a 404 for this run
            raise
        finally:
            del self._pending[url]
            done.set()
        self.cache.put(url, image)
        return image

    def _client(self) -> httpx2.AsyncClient:
        if self._http is None:
            # Its own client, so the API key (a header of the API client) can never reach an image host.
            self._http = httpx2.AsyncClient(
                transport=self.transport,
                headers={"User-Agent": "nanobatch"},
                follow_redirects=True,
                timeout=_TIMEOUT,
                limits=httpx2.Limits(max_connections=16),
            )
        return self._http

    async def _download(self, url: str) -> Image:
        if is_bucket_url(url):
            return await self._get_object(url)
        limit = self.max_download_bytes
        shown = public_url(url)  # for messages: a signed URL's query is a credential
        try:
            async with self._client().stream("GET", url) as response:
                if not response.is_success:
                    raise _status_error(shown, response)
                length = response.headers.get("content-length", "")
                if length.isdigit() and int(length) > limit:
                    raise InputError(_too_big(shown, int(length), limit, download=True))
                chunks, size = [], 0
                async for chunk in response.aiter_bytes():
                    size += len(chunk)
                    if size > limit:
                        raise InputError(_too_big(shown, size, limit, download=True, at_least=True))
                    chunks.append(chunk)
                content_type = response.headers.get("content-type")
        except (httpx2.UnsupportedProtocol, httpx2.InvalidURL, httpx2.TooManyRedirects) as exc:
            raise InputError(f"cannot download {shown}: {redact_urls(str(exc))}") from None
        except httpx2.TimeoutException as exc:
            raise InputError(f"downloading {shown} timed out ({type(exc).__name__})", retryable=True) from None
        except httpx2.TransportError as exc:
            reason = f"{type(exc).__name__}: {redact_urls(str(exc))}"
            raise InputError(f"downloading {shown} failed: {reason}", retryable=True) from None
        return _as_image(shown, b"".join(chunks), content_type)

    async def _get_object(self, url: str) -> Image:
        """A bucket object's bytes (one GET, in a worker thread), within the download limit."""
        from ..api import storage
        from ..errors import StorageError
        from .remote import storage_error

        try:
            data = await anyio.to_thread.run_sync(storage.read_bytes, url)
        except StorageError as exc:
            raise storage_error(exc) from None
        if len(data) > self.max_download_bytes:
            raise InputError(_too_big(url, len(data), self.max_download_bytes, download=True))
        return _as_image(url, data)


async def load_inputs(
    refs: Sequence[str],
    *,
    resize: bool = False,
    loader: InputLoader | None = None,
    retry: RetryPolicy | None = None,
    contents: Mapping[str, bytes] | None = None,
) -> list[Image]:
    """The bytes of each input, in order: through the run's *loader*, or a one-off loader when None.

    *contents*: local files' bytes already read (see :func:`local_stamps`).
    """
    if loader is not None:
        return await loader.load(refs, resize=resize, retry=retry, contents=contents)
    async with InputLoader() as one_off:
        return await one_off.load(refs, resize=resize, retry=retry, contents=contents)


def _log_retry(exc: ApiError, wait: float, attempt: int) -> None:
    logger.info("download attempt %d: %s; retrying in %.1f s", attempt, exc.message, wait)


def _status_error(url: str, response: httpx2.Response) -> InputError:
    status = response.status_code
    retry_after = response.headers.get("retry-after", "")
    hint = ""
    if status in (401, 403):
        hint = ": is the URL public (or its signature expired)?"
    elif status in (404, 410):
        hint = ": no such picture"
    return InputError(
        f"downloading {url} failed: HTTP {status}{hint}",
        retryable=status in _RETRYABLE_STATUS,
        status_code=status,
        retry_after=min(float(retry_after), 300.0) if retry_after.isdigit() else None,
    )


def _too_big(name: str, size: int, limit: int, *, download: bool = False, at_least: bool = False) -> str:
    more = "more than " if at_least else ""
    if download:
        return f"{name} is {more}{size / MB:.1f} MB, over the {limit / MB:.0f} MB download limit: refused"
    return (
        f"{name} is {size / MB:.1f} MB, but an input image can be at most {limit / MB:.0f} MB (Gemini takes "
        "20 MB of inline data per request): set resize_inputs: true to downscale it, or make it smaller"
    )


def _as_image(name: str, data: bytes, content_type: str | None = None) -> Image:
    mime = sniff_mime(data)
    if mime not in ACCEPTED_TYPES:
        sent = f" (it is {mime})" if mime else f" (the server said {content_type})" if content_type else ""
        raise InputError(f"{name} is not a PNG, JPEG, WEBP or HEIC/HEIF image{sent}")
    if problem := picture_problem(data):  # never pay for a request the API must refuse
        raise InputError(f"{name}: {problem}")
    return Image(mime, data)


def _downscale(name: str, image: Image, limit: int) -> Image:
    """*image* re-encoded (JPEG, or PNG when it has transparency) and shrunk until it takes at most *limit* bytes."""
    from PIL import Image as Pillow
    from PIL import ImageOps, UnidentifiedImageError

    from ..checks import eight_bit  # (numpy: only where a picture is downscaled)

    try:
        with Pillow.open(io.BytesIO(image.data)) as opened:
            picture = ImageOps.exif_transpose(opened)  # re-encoding drops EXIF: apply the rotation first
            picture = eight_bit(picture)  # a 16-bit grey: converted as it is, it would be all white
            alpha = picture.mode in ("RGBA", "LA", "PA") or "transparency" in picture.info
            picture = picture.convert("RGBA" if alpha else "RGB")
    except (UnidentifiedImageError, OSError, ValueError, Pillow.DecompressionBombError) as exc:
        raise InputError(f"{name} ({image.mime_type}) is too big and cannot be downscaled: {exc}") from None
    fmt, mime = ("PNG", "image/png") if alpha else ("JPEG", "image/jpeg")
    # A photo kept as PNG often fits as JPEG at full size; otherwise shrink by area, then by steps.
    scales = [1.0] if mime != image.mime_type else []
    scales += [math.sqrt(limit / len(image.data)) * 0.95 * 0.8**n for n in range(8)]
    for scale in scales:
        size = (max(1, round(picture.width * scale)), max(1, round(picture.height * scale)))
        buffer = io.BytesIO()
        resized = picture if scale == 1.0 else picture.resize(size, Pillow.Resampling.LANCZOS)
        resized.save(buffer, fmt, **({"quality": 90} if fmt == "JPEG" else {"optimize": True}))
        if buffer.tell() <= limit:
            logger.info(
                "%s: downscaled from %d to %d bytes (%dx%d %s)", name, len(image.data), buffer.tell(), *size, fmt
            )
            return Image(mime, buffer.getvalue())
    raise InputError(f"{name} could not be downscaled under {limit / MB:.1f} MB")


class UrlChecklist:
    """The distinct image URLs of a manifest, gathered while it is checked (up to *limit*; beyond, none are kept)."""

    def __init__(self, limit: int = URL_CHECK_LIMIT) -> None:
        self.limit = limit
        self.first_use: dict[str, tuple[str, str]] = {}  # url -> (item id, field)
        self.too_many = False

    def add(self, item: WorkItem) -> None:
        if self.too_many:
            return
        for n, ref in enumerate(item.inputs):
            if is_url(ref) and ref not in self.first_use:
                self.first_use[ref] = (item.id, input_field(item, n))
        if len(self.first_use) > self.limit:
            self.too_many = True
            self.first_use.clear()

    def problems(self, manifest_file: str, *, transport: httpx2.BaseTransport | None = None) -> list[Problem]:
        """One problem per URL that does not answer 2xx (named by the first item that uses it)."""
        if self.too_many:
            logger.warning(
                "more than %d distinct image URLs: not checking them now; each is checked when its item runs",
                self.limit,
            )
            return []
        failed = check_urls(list(self.first_use), transport=transport)
        return [Problem(manifest_file, *self.first_use[url], message) for url, message in failed.items()]


def check_urls(
    urls: Sequence[str], *, transport: httpx2.BaseTransport | None = None, concurrency: int = 8
) -> dict[str, str]:
    """What is wrong with each URL that does not answer 2xx (a GET that stops after the headers), by URL."""
    if not urls:
        return {}
    failed: dict[str, str] = {}
    with httpx2.Client(
        transport=transport, headers={"User-Agent": "nanobatch"}, follow_redirects=True, timeout=_TIMEOUT
    ) as client:

        def probe(url: str) -> None:
            try:
                # HEAD is refused by many image hosts and signed URLs: ask for the body, read only the headers.
                with client.stream("GET", url) as response:
                    if not response.is_success:
                        failed[url] = f"{public_url(url)} answered HTTP {response.status_code}"
            except httpx2.HTTPError as exc:
                failed[url] = f"{public_url(url)} cannot be reached: {type(exc).__name__}: {redact_urls(str(exc))}"
            except _NOT_A_URL as exc:
                failed[url] = f"{public_url(url)} is not a URL that can be fetched: {redact_urls(str(exc))}"

        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            list(pool.map(probe, urls))
    return {url: failed[url] for url in urls if url in failed}
