"""The writer: finished items, in arrival order, into the output folder (images, then their records).

It runs outside the workers' cancel scope, so whatever finished is written even when the run is cut short.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import anyio

from ..api.gemini import Image
from ..errors import RunAborted
from .carried import is_carried
from .files import Owned, fsync_dir, is_ours
from .outdir import FOLDER_ERRNOS, OutDir
from .record import ItemRecord

__all__ = ["Finished", "Holding", "WriteQueue", "Writer", "in_memory"]

logger = logging.getLogger("nanobatch")

# Finished items wait for the writer in memory (a 2K image is ~6 MB): past this many bytes, workers wait for it.
WRITE_QUEUE_BYTES = 32 * 1024 * 1024
# ... or past this many items: with small answers the bytes alone let tens of thousands of records (a few KB
# each in Python objects) pile up behind a writer that fsyncs every image, and memory grew with the manifest.
WRITE_QUEUE_ITEMS = 1024

# The error kinds of a record whose answer could not be saved (its images not written): see Writer._write_failed.
UNSAVED_KINDS = frozenset({"output_exists", "write"})
NOT_OURS = "exists and is not a file nanobatch wrote for this item (or it was changed since)"


@dataclass(frozen=True, slots=True)
class Finished:
    record: ItemRecord
    files: list[tuple[str, Image]]  # each output's name and image (in memory, or a worker's temporary file)
    # Files a record of this item says nanobatch wrote, from Resume.decide: the only files it may replace.
    replaceable: Owned = field(default_factory=dict)
    moves: tuple[tuple[str, str], ...] = ()  # done work, renamed: (old, new)
    saved: bool = True  # False: a move that failed; its item keeps its old record and names
    # Files of this item's to delete once its new ones are written, out of date now: what an earlier run set aside
    # under rejected/ for it, its earlier images of another type or number (nanobatch.output.verdicts.out_of_date);
    # each in *replaceable*.
    drops: tuple[str, ...] = ()
    earlier: Mapping[str, Any] | None = None  # the usage of steps an earlier run answered, in the record's usage

    @property
    def size(self) -> int:
        # 1 KB: about what a record takes
        return 1024 + in_memory(image for _, image in self.files)


def in_memory(images: Iterable[Image]) -> int:
    """The bytes of *images* held in this process (an image a worker wrote is on disk, not in memory)."""
    return sum(len(image.content) for image in images)


class Holding:
    """What one item holds on its way to the writer (:meth:`WriteQueue.holding`): :attr:`size` bytes."""

    def __init__(self, queue: WriteQueue) -> None:
        self._queue = queue
        self._size = 0

    @property
    def size(self) -> int:
        return self._size

    @size.setter
    def size(self, size: int) -> None:
        queue, less = self._queue, size < self._size
        queue.waiting += size - self._size
        self._size = size
        if less:  # maybe no longer full
            queue.wake()


class WriteQueue:
    """Finished items on their way to the writer, bounded by their bytes and by their count.

    The writer takes everything queued at once (one thread hand-off and one fsync for all of it), so
    workers wait only when the writer falls far behind: big results hold at most ``max_bytes`` in memory
    (queued or being written; one item bigger than that is let through alone), small ones at most
    ``max_items`` records. An item on its way to the queue holds its images all the same: waiting to be
    queued, or still being checked or uploaded (:meth:`holding`). While those and the queue's are past
    ``max_bytes``, :meth:`room` keeps the next answers unread (the client waits on it before reading a body),
    so a writer, checks or uploads behind the API do not leave an answer in memory per request in flight.
    """

    def __init__(self, max_bytes: int | None = None, max_items: int | None = None) -> None:
        self.max_bytes = WRITE_QUEUE_BYTES if max_bytes is None else max_bytes
        self.max_items = WRITE_QUEUE_ITEMS if max_items is None else max_items
        self.bytes = 0
        self.count = 0  # items queued or being written
        self.waiting = 0  # the bytes of the items on their way: waiting to be queued (in put), or held (holding)
        self._items: deque[Finished] = deque()
        self._closed = False  # no more items will come
        self._writing = True  # False: the writer has stopped, items are dropped
        self._letting_in = False  # the run is stopping: answers are read whatever waits (see let_in)
        self._ready = anyio.Event()
        self._room = anyio.Event()

    async def put(self, finished: Finished) -> bool:
        """Queue *finished*; False if the writer has stopped (the run is ending with its error)."""
        size = finished.size
        self.waiting += size
        try:
            while self._writing and self.count and (self.bytes + size > self.max_bytes or self.count >= self.max_items):
                await self._room.wait()
        except BaseException:  # cancelled: its bytes no longer wait, whoever waits for room looks again
            self.waiting -= size
            self.wake()
            raise
        self.waiting -= size
        if not self._writing:
            return False
        self._items.append(finished)
        self.bytes += size
        self.count += 1
        self._ready.set()
        return True

    @contextmanager
    def holding(self) -> Iterator[Holding]:
        """Count the images an item holds on its way to the queue (set :attr:`Holding.size`) until the block
        ends. Set it to 0 before the item waits for another answer: an answer it waits for must not wait for
        its own images to be written, nor for other items' doing the same."""
        hold = Holding(self)
        try:
            yield hold
        finally:
            hold.size = 0

    def full(self) -> bool:
        """Whether what waits for the writer (queued, being written, waiting to be queued, or held on the way:
        :meth:`holding`) is past ``max_bytes``: an answer read now would wait in memory too."""
        return self._writing and not self._letting_in and self.bytes + self.waiting > self.max_bytes

    def let_in(self) -> None:
        """The run is stopping: the answers still coming are paid for, and have only the grace period left to
        be read in; read them whatever waits for the writer (never :meth:`full` again)."""
        self._letting_in = True
        self.wake()

    async def room(self) -> None:
        """Wait until the queue is not :meth:`full`."""
        while self.full():
            await self._room.wait()

    async def take(self) -> list[Finished]:
        """All queued items, oldest first, once there is one; empty when closed and drained."""
        while not self._items:
            if self._closed:
                return []
            await self._ready.wait()
            self._ready = anyio.Event()
        batch = list(self._items)
        self._items.clear()
        return batch

    def written(self, batch: list[Finished]) -> None:
        """The writer is done with *batch*: its bytes make room."""
        self.bytes -= sum(finished.size for finished in batch)
        self.count -= len(batch)
        self.wake()

    def wake(self) -> None:
        """There may be room now: whoever waits for it looks again."""
        self._room.set()
        self._room = anyio.Event()

    def close(self) -> None:
        self._closed = True
        self._ready.set()

    def stop_writing(self) -> list[Finished]:
        """No more writing: returns what was still queued, for the caller to report lost."""
        self._writing = False
        left = list(self._items)
        self._items.clear()
        self._room.set()
        return left


def report_unsaved(lost: list[Finished]) -> None:
    """Name the finished items whose results could not be written: they were paid for and will be sent
    again by the next run (which also warns of them, from the journal)."""
    if lost:
        ids = ", ".join(finished.record.id for finished in lost[:20])
        more = f" and {len(lost) - 20} more" if len(lost) > 20 else ""
        logger.error(
            "%d finished items could not be saved and will be sent again by the next run: %s%s", len(lost), ids, more
        )


class Writer:
    """Persists finished items into *out* and hands each saved one to *count* (in the event loop's thread)."""

    def __init__(self, out: OutDir, count: Callable[[Finished], None], stop: Callable[[BaseException], None]) -> None:
        self.out = out
        self.count = count
        self.stop = stop

    async def run(self, done: WriteQueue) -> None:
        """Persist finished items in arrival order, in batches: whatever queued up while the last batch was
        written goes into one thread hand-off and one results.jsonl write + fsync (group commit)."""
        unsaved: list[Finished] = []
        try:
            while batch := await done.take():
                # First: a run killed before the records must still know them for its own. One write for the
                # batch, not one per item: each is a system call on the event loop's thread (bench row
                # "0 peers", small answers).
                claims = [(f.record.id, self.out.claims(f.files, f.moves)) for f in batch]
                self.out.journal.writing_many([(item_id, files) for item_id, files in claims if files])
                try:
                    handled, error = await anyio.to_thread.run_sync(self._persist, batch)
                except OSError as exc:
                    handled, error = [], exc
                done.written(batch)
                # A move refused writes no record: its claim is withdrawn, or the next run would take a file of
                # the claimed size there (a copy of the image) for the one it moved.
                self.out.journal.withdrawn(f.record.id for f in handled if not f.saved)
                for finished in handled:
                    self.count(finished)
                if error is not None:
                    unsaved = batch[len(handled) :]
                    # Exit 3, not 1: a cron wrapper must not take a full disk for "some items failed".
                    failure = RunAborted(f"cannot write results into {self.out.path}: {error}")
                    self.stop(failure)
                    raise failure from error
        finally:
            report_unsaved(unsaved + done.stop_writing())

    def _persist(self, batch: list[Finished]) -> tuple[list[Finished], OSError | None]:
        """Write the batch's images, then the records of the items whose images were all written, in one
        append. An item whose image cannot be written gets a failed record instead (and is sent again by the
        next run). Returns the items handled, from the start of the batch (as they are to be counted), and
        the error that stopped the rest: one no other write would escape (a full disk); an error appending
        the records propagates (then none of the batch counts)."""
        handled: list[Finished] = []
        error = None
        folders: set[str] = set()
        for finished in batch:
            try:
                self.out.put(finished.files, finished.moves, finished.replaceable, folders)
                self._drop(finished, folders, kept=False)
                handled.append(replace(finished, record=self.out.stamped(finished.record)))
            except OSError as exc:
                if exc.errno in FOLDER_ERRNOS:
                    error = exc
                    break
                handled.append(self._write_failed(finished, exc))
        # The renames are durable only once their folders are: fsync each once per batch, before the
        # records that point at the images (a power cut must not leave a record without its image).
        for folder in folders:
            fsync_dir(folder)
        if records := [finished.record for finished in handled if finished.saved]:
            self.out.results.append_many(records)
        # A kept step's image goes only once the record that no longer names it is written (a run killed before
        # it leaves the record that does, and the image it names).
        for finished in handled:
            if finished.saved:
                self._drop(finished, set(), kept=True)
        return handled, error

    def _drop(self, finished: Finished, folders: set[str], *, kept: bool) -> None:
        """Delete *finished*'s out-of-date files (nanobatch's, for this item: see :attr:`Finished.drops`), before
        the record that no longer names them; one that cannot be deleted is only told of."""
        for name in finished.drops:
            if is_carried(name) != kept:
                continue
            path = self.out.file(name)
            if self.out.escapes(name):
                continue  # through a link out of the output folder: never deleted
            if finished.replaceable.get(name) is None or not is_ours(finished.replaceable, name, path):
                continue  # not known to be nanobatch's (a record from before stamps names it alone), or changed
            try:
                os.unlink(path)
            except FileNotFoundError:
                continue
            except OSError as exc:
                logger.warning("%s: could not delete %s, which an earlier run wrote: %s", finished.record.id,
                               path, exc.strerror or exc)  # fmt: skip
                continue
            folders.add(os.path.dirname(path))

    def _write_failed(self, finished: Finished, exc: OSError) -> Finished:
        """*finished* with a failed record (its image could not be written), or, for a move, not saved."""
        item_id = finished.record.id
        where = str(exc.filename or self.out.path)
        if isinstance(exc, FileExistsError):
            kind = "output_exists"
            message = f"{where} {NOT_OURS}: it was left as it is"
        else:
            kind, message = "write", f"cannot write {where}: {exc.strerror or exc}"
        if finished.moves:
            logger.error("%s: its files could not be moved to their new names (%s); they stay where they were",
                         item_id, message)  # fmt: skip
            return replace(finished, saved=False)
        logger.error("%s failed: %s; the next run tries it again (a batch answer it read is kept for that)", item_id,
                     message)  # fmt: skip
        # The image of a step the item goes on from, not deleted (its drop came after the write): named again.
        kept = [n for n in finished.drops if is_carried(n) and is_ours(finished.replaceable, n, self.out.file(n))]
        return Finished(self.out.stamped(finished.record.failed_write(kind, message, kept=kept)), [])
