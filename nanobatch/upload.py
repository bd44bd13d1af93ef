"""``output.upload_to``: each finished image also PUT into a bucket, before its record is written.

The local output folder stays the source of truth (results.jsonl, journal, lock, summary, report, and a
copy of every image); the bucket holds the published images. A record lists its objects' URLs in
``uploads``; a re-run asks, for all ok items at once (:func:`~nanobatch.storage.exists_many`: a listing of
the prefix, 1,000 objects a request, nothing downloaded), whether their objects are still there, and sends
again the items whose objects are gone.

>>> uploads = Uploads.check("s3://catalog/edited/")  # doctest: +SKIP
>>> uploads.url("sku-1001.png")  # doctest: +SKIP
's3://catalog/edited/sku-1001.png'
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable

import anyio
import anyio.to_thread

from . import storage
from .errors import ConfigError, StorageError, sole_error

__all__ = ["Uploads"]

logger = logging.getLogger("nanobatch")


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
            raise ConfigError(f"output.upload_to: {prefix!r} is not a bucket URL (s3://, gs://, az:// or abfs://)")
        try:
            storage.check_bucket(prefix)
        except StorageError as exc:
            raise ConfigError(f"output.upload_to: {exc}") from None
        return cls(prefix)

    def url(self, name: str) -> str:
        """The object URL of the output name *name* (a path relative to the output folder)."""
        return self.prefix + name.replace(os.sep, "/")

    async def put(self, files: list[tuple[str, bytes]]) -> tuple[str, ...]:
        """PUT each file (one request per object, so none is ever seen half-written), all at once in worker
        threads; their URLs, in order. Raises StorageError if any could not be written."""
        urls = tuple(self.url(name) for name, _ in files)
        try:
            async with anyio.create_task_group() as tg:
                for url, (_, data) in zip(urls, files, strict=True):
                    tg.start_soon(anyio.to_thread.run_sync, storage.put, url, data)
        except BaseExceptionGroup as group:
            if (error := sole_error(group)) is not None:
                raise error from None
            raise
        return urls

    async def find_gone(self, done: Iterable[tuple[str, tuple[str, ...]]]) -> None:
        """Ask, for every (id, file names) of an ok item, whether its objects are there, in one batched check
        (a worker thread); the ids of items with a missing object go into :attr:`gone`."""
        wanted = {self.url(name): item_id for item_id, names in done for name in names}
        if not wanted:
            return
        found = await anyio.to_thread.run_sync(storage.exists_many, list(wanted))
        self.gone = frozenset(wanted[url] for url, there in found.items() if not there)
        if self.gone:
            logger.warning("%d done items have images missing under %s: they will be sent again",
                           len(self.gone), self.prefix)  # fmt: skip
