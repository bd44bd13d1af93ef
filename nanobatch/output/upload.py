"""``output.upload_to``: each finished image also PUT into a bucket, before its record is written.

The local output folder stays the source of truth (results.jsonl, journal, lock, summary, report, and a
copy of every image); the bucket holds the published images. A record lists its objects' URLs in
``uploads``; a re-run asks, for all ok items at once (:func:`~nanobatch.api.storage.exists_many`: a listing of
the prefix, 1,000 objects a request, nothing downloaded), whether their objects are still there: a missing
object is PUT again from the output folder's copy, and an item whose copy is gone too is sent again.

>>> uploads = Uploads.check("s3://catalog/edited/")  # doctest: +SKIP
>>> uploads.url("sku-1001.png")  # doctest: +SKIP
's3://catalog/edited/sku-1001.png'
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import anyio.to_thread

from ..api import storage
from ..api.redaction import public_url
from ..errors import ApiError, ConfigError, StorageError, sole_error
from .files import Owned, is_ours
from .reading import UploadStamp
from .record import ErrorInfo, ItemRecord
from .results import ResultsIndex

if TYPE_CHECKING:
    from ..api.gemini import Image
    from .outdir import Journal, OutDir
    from .writer import Finished

__all__ = ["Uploads", "keep_version"]

logger = logging.getLogger("nanobatch")

NOT_OURS = "an object is already there, and no record says nanobatch put it there"
CHANGED = "the object nanobatch put there was replaced since (its size or version changed)"


class Uploads:
    """Where an output folder's images are published, and whether the objects of done items are still there."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix if prefix.endswith("/") else prefix + "/"
        self.gone: frozenset[str] = frozenset()  # ids of ok items whose objects are missing (see find_gone)

    @classmethod
    def check(cls, prefix: str) -> Uploads:
        """The uploads for ``output.upload_to`` *prefix*; ConfigError (exit 2, nothing sent) if it is not a
        bucket URL, its extra is not installed, or its bucket does not exist or cannot be asked about."""
        if not storage.is_bucket_url(prefix):
            # Not shown: what is pasted there may be a signed URL (an Azure SAS container URL, its signature and all).
            raise ConfigError(f"output.upload_to: {public_url(prefix)!r} is not a bucket URL (s3://, gs://, az:// "
                              "or abfs://)")  # fmt: skip
        try:
            storage.check_bucket(prefix)
        except StorageError as exc:
            raise ConfigError(f"output.upload_to: {exc}") from None
        return cls(prefix)

    def url(self, name: str) -> str:
        """The object URL of the output name *name* (a path relative to the output folder)."""
        return self.prefix + name.replace(os.sep, "/")

    def holds(self, index: ResultsIndex, item_id: str, outputs: Iterable[str]) -> bool:
        """Whether a record of *item_id* put each of *outputs* here: a run finds such an item done, its local
        copies deleted or not (it lists the bucket, :meth:`find_gone`; this assumes the objects are still there)."""
        urls = [self.url(name) for name in outputs]
        return len(index.uploaded(item_id, urls)) == len(urls)

    async def put(
        self, files: list[tuple[str, bytes]], ours: Mapping[str, UploadStamp | None] | None = None
    ) -> tuple[tuple[str, ...], tuple[UploadStamp, ...]]:
        """PUT each file (one request per object, so none is ever seen half-written), all at once in worker
        threads; their URLs and the stamps they were written with, in order. An object already there is replaced
        only if it is one of *ours* (a record of the item says nanobatch put it there) and still as it was put
        (its size and ETag/generation; an older record's, without a stamp, on its URL alone). Raises StorageError
        if any could not be written, or one is there that nanobatch may not replace (kind ``exists``)."""
        ours = ours or {}
        urls = tuple(self.url(name) for name, _ in files)
        stamps: dict[str, UploadStamp] = {}

        def put(url: str, data: bytes) -> None:
            replace, version = url in ours, None
            if (recorded := ours.get(url)) is not None:
                now = storage.stat_many([url], buckets_checked=True)[
                    url
                ]  # one HEAD: is it still the object nanobatch put there?
                if now is not None and now.pair != recorded:
                    raise StorageError(url, "exists", f"{CHANGED}: it was left as it is")
                replace = now is not None  # gone since: put back only if no one else's appears meanwhile
                version = recorded[1] if now is not None else None  # and the PUT asks for it (S3, Azure)
            stamps[url] = storage.put(url, data, replace=replace, version=version).pair

        try:
            async with anyio.create_task_group() as tg:
                for url, (_, data) in zip(urls, files, strict=True):
                    tg.start_soon(anyio.to_thread.run_sync, put, url, data)
        except BaseExceptionGroup as group:
            if (error := sole_error(group)) is not None:
                raise error from None
            raise
        return urls, tuple(stamps[url] for url in urls)

    async def publish(
        self, record: ItemRecord, files: list[tuple[str, Image]], index: ResultsIndex, journal: Journal
    ) -> ItemRecord:
        """*record* with its objects' URLs, once each of its *files* is PUT; a failed record (kind ``upload``) if
        one could not be: its images are still written into the output folder."""
        try:
            # An image a worker wrote is read back from its temporary file, off the event loop.
            put = await anyio.to_thread.run_sync(lambda: [(name, image.data) for name, image in files])
            ours = index.uploaded(record.id, [self.url(name) for name, _ in put])
            journal.uploading(record.id, [(self.url(name), len(data)) for name, data in put])
            urls, stamps = await self.put(put, ours)
            return replace(record, uploads=urls, upload_stamps=stamps)
        except StorageError as exc:
            logger.error("%s failed: %s; its images are kept in the output folder", record.id, exc)
            return replace(record, status="failed", error=ErrorInfo(kind="upload", message=str(exc)))

    async def publish_moved(self, finished: Finished, index: ResultsIndex, out: OutDir) -> Finished | None:
        """Done work whose files move to new names: PUT them under those names too, so that the record's
        ``uploads`` follow its ``outputs``; None (left as it was, for the next run) if that cannot be done."""

        def read(name: str) -> bytes:
            with open(out.file(name), "rb") as f:
                return f.read()

        try:
            files = [(new, await anyio.to_thread.run_sync(read, old)) for old, new in finished.moves]
            ours = index.uploaded(finished.record.id, [self.url(name) for name, _ in files])
            out.journal.uploading(finished.record.id, [(self.url(n), len(d)) for n, d in files])
            uploads, stamps = await self.put(files, ours)
        except (OSError, StorageError) as exc:
            logger.error("%s: its files keep their old names (%s); the next run tries again", finished.record.id, exc)
            return None
        return replace(finished, record=replace(finished.record, uploads=uploads, upload_stamps=stamps))

    async def adopt(self, claims: list[tuple[str, str, int]], index: ResultsIndex, journal: Journal) -> None:
        """Count each claimed object (item, URL, size: a dead run's journal) as nanobatch's, with the stamp it has
        now, if one of that size is there: the run PUT it and died before its record (see :func:`keep_version`).
        Any other object there stays someone else's."""
        if not claims:
            return
        found = await anyio.to_thread.run_sync(
            functools.partial(storage.stat_many, buckets_checked=True), list({url for _, url, _ in claims})
        )
        for item_id, url, size in claims:
            if (stamp := found.get(url)) is not None and stamp.size == size:
                keep_version(index, journal, item_id, url, stamp.pair)

    async def free(self, names: list[str], ours: Mapping[str, UploadStamp | None]) -> None:
        """ApiError (kind ``upload``) if an object nanobatch may not replace is at one of *names*: one it did not
        put there (*ours*: those a record of the item says it did, with their stamps), or one of those changed
        since. The upload would refuse to replace it, after its answer was paid for."""
        try:
            taken = await anyio.to_thread.run_sync(self.taken, names, ours)
        except StorageError as exc:
            raise ApiError(f"cannot look in output.upload_to: {exc}", kind="upload") from None
        if taken is not None:
            url, why = taken
            raise ApiError(f"{url}: {why}: nothing was sent (move it away, or change output.upload_to or the output "
                           "name)", kind="upload")  # fmt: skip

    def taken(self, names: list[str], ours: Mapping[str, UploadStamp | None]) -> tuple[str, str] | None:
        """The URL of the first object at one of *names* that nanobatch may not replace for the item, and why;
        None if there is none. All are asked about at once, except those *ours* knows only by URL (a record from
        before stamps). Blocking (HEAD requests): call it in a worker thread. StorageError if the bucket cannot
        be asked."""
        urls = [self.url(name) for name in names]
        found = storage.stat_many((u for u in urls if u not in ours or ours[u] is not None), buckets_checked=True)
        for url in urls:
            if (now := found.get(url)) is None:
                continue
            if url not in ours:
                return url, NOT_OURS
            if now.pair != ours[url]:
                return url, CHANGED
        return None

    async def find_gone(
        self, done: Iterable[tuple[str, tuple[str, ...]]], folder: Path, index: ResultsIndex, journal: Journal
    ) -> None:
        """Ask, for every (id, file names) of an ok item, whether its objects are there, in one batched check
        (a worker thread). A missing object whose image is still in *folder* is PUT again from it (nothing is
        sent to the model; the *journal* keeps its new stamp); the ids of items with an object neither there
        nor restorable go into :attr:`gone`."""
        wanted = {self.url(name): (item_id, name) for item_id, names in done for name in names}
        if not wanted:
            return
        found = await anyio.to_thread.run_sync(
            functools.partial(storage.exists_many, buckets_checked=True), list(wanted)
        )
        missing = [url for url, there in found.items() if not there]
        # Each one's stamp from its record (the index: on this thread), then the folder looked at in a worker thread
        stamps = {url: index.owned(wanted[url][0], [wanted[url][1]]) for url in missing}
        copies = await anyio.to_thread.run_sync(_own_copies, folder, {url: wanted[url][1] for url in missing}, stamps)
        restored = await self._restore(list(copies), copies)
        for url, now in restored.items():
            keep_version(index, journal, wanted[url][0], url, now)
        self.gone = frozenset(wanted[url][0] for url in missing if url not in restored)
        if missing:
            logger.warning(
                "%d images were missing under %s: %d put again from the output folder, %d items will be sent again",
                len(missing), self.prefix, len(restored), len(self.gone),
            )  # fmt: skip

    async def _restore(self, missing: list[str], local: dict[str, Path]) -> dict[str, UploadStamp]:
        """PUT each of *missing* from its local copy, 32 at a time; the stamps of those put (not those that have
        no copy, or failed)."""
        restored: dict[str, UploadStamp] = {}
        limiter = anyio.CapacityLimiter(storage.HEAD_CONCURRENCY)

        def restore(url: str) -> None:
            try:  # it was missing: one that appeared since is not replaced
                restored[url] = storage.put(url, local[url].read_bytes(), replace=False).pair
            except (OSError, StorageError):
                return

        async with anyio.create_task_group() as tg:
            for url in missing:
                tg.start_soon(functools.partial(anyio.to_thread.run_sync, restore, url, limiter=limiter))
        return restored


def _own_copies(folder: Path, names: Mapping[str, str], owned: Mapping[str, Owned]) -> dict[str, Path]:
    """Of the files *names* (by URL) in *folder*, those that are the ones nanobatch wrote for their items, as it left
    them (*owned*: each one's record's stamp), in the folder itself (no symbolic link): what may be published again.
    Not a file retouched since (the user's now), nor one reached through a link (perhaps outside the folder)."""
    inside = os.path.join(os.path.realpath(folder), "")
    copies = {}
    for url, name in names.items():
        path = folder / name
        if (
            not os.path.islink(path)
            and os.path.realpath(path).startswith(inside)
            and is_ours(owned[url], name, str(path))
        ):
            copies[url] = path
    return copies


def keep_version(index: ResultsIndex, journal: Journal, item_id: str, url: str, now: UploadStamp) -> None:
    """*now* is the object nanobatch put at *url* for *item_id* (put back from the folder's copy, or PUT by a run
    that died before its record): counted so, and, unless a record says so already, noted in the *journal*
    (``restored``) until a record names it (:func:`~nanobatch.output.journal.recover`). A record from
    before stamps trusts the URL as it is."""
    recorded = index.uploaded(item_id, [url])
    if url in recorded and recorded[url] in (None, now):
        return
    journal.restored(item_id, url, recorded.get(url), now)
    index.adopt_uploads(item_id, {url: now})
