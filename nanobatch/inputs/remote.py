"""Inputs that live elsewhere: objects in buckets (``s3://``, ``gs://``, ``az://``) and http(s) URLs.

* :class:`ObjectStamps`, one per run: the stamps (size and ETag/generation) of the bucket objects items use,
  asked for in batches a little ahead of the workers (:func:`nanobatch.api.storage.stat_many`: one listing gives
  1,000), so a re-run over finished work downloads nothing and asks little.
* :func:`endpoint_for` and :class:`Referrer`: which inputs go by reference (``inputs: by_reference|auto``),
  as ``fileData.fileUri`` the API fetches itself, and the digest of each input known without reading it.
* :class:`BucketChecklist`, for ``nanobatch validate``: every object the items use, stamped in batches.

Storage calls are synchronous and run in worker threads.
"""

from __future__ import annotations

import functools
import itertools
import logging
import mimetypes
import urllib.parse
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import anyio
import anyio.to_thread

from ..api import storage
from ..api.gemini import FileRef
from ..api.redaction import public_url
from ..api.storage import ObjectStamp, is_bucket_url
from ..errors import ApiError, InputError, Problem, StorageError
from ..item import WorkItem
from ..models import GOOGLE_HOST
from ..pictures import ACCEPTED_TYPES
from .stamps import is_url

__all__ = [
    "BucketChecklist",
    "Endpoint",
    "ObjectStamps",
    "Referrer",
    "endpoint_for",
    "input_field",
    "object_digest",
    "storage_error",
]

logger = logging.getLogger("nanobatch")

BATCH = 1000  # objects stamped together (one listing page)
PRESIGN_EXPIRES_S = 6 * 3600  # long enough for a flex request's retries
# A batch job may wait up to 48 h before the API reads its inputs (then it expires): the URLs outlive that.
BATCH_PRESIGN_EXPIRES_S = 49 * 3600


def object_digest(stamp: ObjectStamp) -> str:
    """What stands for a bucket object's bytes in a work key: its URL, size and ETag/generation."""
    return f"object:{stamp.url}@{stamp.key()}"


def input_field(item: WorkItem, n: int) -> str:
    return "image" if len(item.inputs) == 1 else f"images[{n}]"


def storage_error(exc: StorageError) -> InputError:
    """A bucket object that cannot be read fails its item (kind ``input``); only a network failure is retried."""
    return InputError(str(exc), retryable=exc.kind == "unreachable")


class ObjectStamps:
    """The stamps of the bucket objects items use, looked up in batches: pass the items through :meth:`watch`
    (it reads up to *batch* items ahead and notes their objects), then :meth:`get` a stamp: the first asks for
    every noted object not yet asked for (up to *batch*), in one :func:`~nanobatch.api.storage.stat_many`."""

    def __init__(self, batch: int = BATCH) -> None:
        self.batch = batch
        self._wanted: dict[str, None] = {}  # noted, not yet asked for (in order)
        self._uses: Counter[str] = Counter()  # items noted that have not taken their stamp yet
        self._found: dict[str, ObjectStamp | StorageError | None] = {}
        self._asking: dict[str, anyio.Event] = {}

    def watch(self, items: Iterable[WorkItem]) -> Iterator[WorkItem]:
        """*items*, read ahead (at most *batch* of them) only while they have bucket inputs: a manifest of
        local files is passed through as it is, one item at a time (a run reads ahead for the records anyway)."""
        stream = iter(items)
        for item in stream:
            chunk = [item]
            while self._note(chunk[-1]) and len(chunk) < self.batch and (more := next(stream, None)) is not None:
                chunk.append(more)
            yield from chunk

    def _note(self, item: WorkItem) -> bool:
        """Note *item*'s bucket objects; whether it has any."""
        noted = False
        for ref in item.inputs:
            if is_bucket_url(ref):
                noted = True
                self._uses[ref] += 1
                if ref not in self._found and ref not in self._asking:
                    self._wanted[ref] = None
        return noted

    async def get(self, url: str) -> ObjectStamp:
        """The object's stamp; raises ApiError (kind ``input``) if it is missing or cannot be asked about."""
        while url not in self._found:
            if (event := self._asking.get(url)) is not None:
                await event.wait()
                continue
            self._wanted.pop(url, None)
            asked = [url, *itertools.islice(self._wanted, self.batch - 1)]
            for other in asked[1:]:
                del self._wanted[other]
            await self._ask(asked)
        found = self._found[url]
        self._uses[url] -= 1
        if self._uses[url] <= 0:  # every item that noted it has it: forget it (a million objects do not pile up)
            self._found.pop(url, None)
            self._uses.pop(url, None)
        if isinstance(found, StorageError):
            raise storage_error(found)
        if found is None:
            raise ApiError(f"{url}: no such object", kind="input")
        return found

    async def _ask(self, urls: list[str]) -> None:
        event = anyio.Event()
        self._asking.update(dict.fromkeys(urls, event))
        try:
            self._found.update(await anyio.to_thread.run_sync(_stat_all, urls))
        finally:
            for url in urls:
                self._asking.pop(url, None)
            event.set()


def _stat_all(urls: list[str]) -> dict[str, ObjectStamp | StorageError | None]:
    """Each object's stamp, None if missing, or the error that stands in its way (per bucket, then per object)."""
    by_bucket: dict[tuple[str, str], list[str]] = {}
    for url in urls:
        scheme, bucket, _ = storage._split(url)
        by_bucket.setdefault((scheme, bucket), []).append(url)
    found: dict[str, ObjectStamp | StorageError | None] = {}
    for members in by_bucket.values():
        try:
            found.update(storage.stat_many(members))
        except StorageError as exc:
            if exc.kind in ("missing_extra", "no_bucket"):  # the same for every object in it
                found.update({url: StorageError(url, exc.kind, _reason(exc)) for url in members})
            else:  # maybe only some objects are refused: ask about each
                found.update({url: _stat_one(url) for url in members})
    return found


def _reason(exc: StorageError) -> str:
    return str(exc).removeprefix(f"{exc.url}: ")


def _stat_one(url: str) -> ObjectStamp | StorageError | None:
    try:
        return storage.stat(url)
    except StorageError as exc:
        return None if exc.kind == "not_found" else exc


@dataclass(frozen=True, slots=True)
class Endpoint:
    """What an endpoint fetches itself: https URLs (public or signed) and ``gs://`` URIs."""

    name: str
    urls: bool
    gs: bool


def endpoint_for(base_url: str, *, backend: str = "gemini", simulate: bool = False) -> Endpoint:
    """Google's Gemini API fetches public and signed https URLs (``gs://`` only once registered with its Files
    API, which nanobatch does not do); Vertex AI also takes ``gs://`` URIs; proxies take inline data only."""
    host = (urllib.parse.urlsplit(base_url).hostname or "").lower()
    if backend == "vertex" or host.endswith("aiplatform.googleapis.com"):
        return Endpoint("Vertex AI", urls=True, gs=True)
    if simulate:
        return Endpoint("the simulator", urls=True, gs=True)
    if host == GOOGLE_HOST:
        return Endpoint("the Gemini API", urls=True, gs=False)
    return Endpoint(host or public_url(base_url), urls=False, gs=False)


@dataclass(frozen=True, slots=True)
class Plan:
    """How an item's inputs go: the digest of each known without reading it, and those sent by reference."""

    digests: dict[str, str]
    refs: dict[str, FileRef]


class Referrer:
    """Decides, per input, whether it goes inline or by reference, and what stands for it in the work key."""

    def __init__(
        self, endpoint: Endpoint, default: str, stamps: ObjectStamps | None = None, *, batch: bool = False
    ) -> None:
        self.endpoint = endpoint
        self.default = default
        self.expires_s = BATCH_PRESIGN_EXPIRES_S if batch else PRESIGN_EXPIRES_S
        self.stamps = stamps if stamps is not None else ObjectStamps()
        self._warned: set[str] = set()

    async def plan(self, item: WorkItem) -> Plan:
        """Raises ApiError (kind ``input``) for a bucket object that is missing or refused."""
        mode = item.input_mode or self.default
        digests: dict[str, str] = {}
        refs: dict[str, FileRef] = {}
        for ref in dict.fromkeys(item.inputs):
            stamp = await self.stamps.get(ref) if is_bucket_url(ref) else None
            if stamp is not None:
                digests[ref] = object_digest(stamp)
            if mode != "inline" and (uri := self._uri(ref, mode)) is not None:
                refs[ref] = FileRef(_mime(ref) or "", uri)
                digests.setdefault(ref, f"url:{ref}")  # the URL is the input: no download to hash
        return Plan(digests, refs)

    def _uri(self, ref: str, mode: str) -> str | None:
        """The URI the endpoint would fetch *ref* by, or None to send it inline."""
        bucket, web = is_bucket_url(ref), is_url(ref)
        if not (bucket or web) or _mime(ref) is None:
            return None  # a local file, or a type its name does not tell (the bytes are sniffed instead)
        scheme = ref.split(":", 1)[0].lower()
        if web and self.endpoint.urls:
            return ref
        if scheme in ("gs", "gcs") and self.endpoint.gs:
            return "gs://" + ref.split("://", 1)[1]
        if bucket and scheme not in ("gs", "gcs") and self.endpoint.urls:
            return "signed"  # made when the item is sent: see sign()
        if mode == "by_reference" and scheme not in self._warned:
            self._warned.add(scheme)
            logger.warning("inputs: by_reference: %s does not fetch %s:// inputs; sending them inline",
                           self.endpoint.name, scheme)  # fmt: skip
        return None

    async def sign(self, refs: dict[str, FileRef]) -> dict[str, FileRef]:
        """*refs* with pre-signed https URLs for s3:// and az:// objects (raises ApiError kind ``input``)."""
        signed = dict(refs)
        for ref, file in refs.items():
            if file.uri == "signed":
                try:
                    url = await anyio.to_thread.run_sync(
                        functools.partial(storage.presign, ref, expires_s=self.expires_s)
                    )
                except StorageError as exc:
                    raise storage_error(exc) from None
                signed[ref] = FileRef(file.mime_type, url)
        return signed


def _mime(ref: str) -> str | None:
    """The image type a URL's name tells (``.jpg``, ``.png``, ...), as google-genai's Part.from_uri guesses it."""
    path = urllib.parse.urlsplit(ref).path if "://" in ref else ref
    mime, _ = mimetypes.guess_type(path.rsplit("/", 1)[-1])
    if mime is None and path.lower().endswith((".heic", ".heif", ".webp")):
        mime = "image/" + path.rsplit(".", 1)[-1].lower()
    return mime if mime in ACCEPTED_TYPES else None


class BucketChecklist:
    """The bucket objects of a manifest, gathered while it is checked, stamped in batches of *batch*."""

    def __init__(self, file: str, *, stat: bool = True, batch: int = 10 * BATCH) -> None:
        self.file = file
        self.stat = stat  # False: only check that each scheme's extra is installed (no request)
        self.batch = batch
        self.first_use: dict[str, tuple[str, str]] = {}  # url -> (item id, field), this batch
        self.problems: list[Problem] = []
        self._schemes: dict[str, str | None] = {}  # scheme -> what is missing

    def add(self, item: WorkItem) -> None:
        for n, ref in enumerate(item.inputs):
            if not is_bucket_url(ref):
                continue
            if (missing := self._extra_missing(ref)) is not None:
                self.problems.append(Problem(self.file, item.id, input_field(item, n), missing))
            elif self.stat and ref not in self.first_use:
                self.first_use[ref] = (item.id, input_field(item, n))
        if len(self.first_use) >= self.batch:
            self.flush()

    def _extra_missing(self, url: str) -> str | None:
        scheme = url.split(":", 1)[0].lower()
        if scheme not in self._schemes:
            try:
                storage._filesystem(url)
                self._schemes[scheme] = None
            except StorageError as exc:
                self._schemes[scheme] = _reason(exc) if exc.kind == "missing_extra" else None
        found = self._schemes[scheme]
        return None if found is None else f"{url}: {found}"

    def flush(self) -> list[Problem]:
        """Stamp what was gathered; every problem found so far."""
        if self.first_use:
            found = _stat_all(list(self.first_use))
            for url, stamp in found.items():
                if stamp is None or isinstance(stamp, StorageError):
                    message = str(stamp) if stamp is not None else f"{url}: no such object"
                    self.problems.append(Problem(self.file, *self.first_use[url], message))
            self.first_use.clear()
        return self.problems
