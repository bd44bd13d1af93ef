"""The output folder: the one object that writes into it, and the rules about it.

:class:`OutDir` is checked once (:meth:`OutDir.check`), held with its lock (:meth:`OutDir.hold`), and then
passed on: the writer puts images through it and appends to its ``results.jsonl``, the workers note
requests in its ``journal.jsonl``, the runner replaces its ``summary.json``. The rules: nanobatch's own
files (``names.RESERVED_FILES``, names starting with ``names.RESERVED_PREFIX``) are never an output name
(``names.reserved_name_problem``); a file under those names that nanobatch did not write, or a link there,
refuses the folder (:mod:`nanobatch.output.own`); a glob never reads the folder's own results
(``Manifest.skipping`` hands it :attr:`OutDir.path`).

Durability rules: an image is written to a temporary file and renamed into place before its record is
appended; each batch of records is written, flushed and fsync'ed; ``summary.json`` is replaced
atomically. A record torn by a crash mid-write is cut off when the file is opened. Neither file takes a
credential: what :data:`~nanobatch.api.redaction.SECRETS` knows is cut out of each as it is written.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
import signal
import stat
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import anyio
import orjson

from ..api.redaction import SECRETS
from ..errors import ConfigError, Interrupted, NanobatchError, RunAborted
from ..names import BATCH_FOLDER, JOURNAL_FILE, RESULTS_FILE, SUMMARY_FILE
from .files import (
    Owned,
    Stamp,
    atomic_write,
    is_ours,
    move_file,
    remove_stale_temp_files,
    stamp_of,
    unchanged,
    write_image,
)
from .lock import RunLock
from .own import check_own_files, is_torn_record, open_own
from .record import ItemRecord

if TYPE_CHECKING:
    from ..api.gemini import Image
    from .results import ResultsIndex

__all__ = [
    "FOLDER_ERRNOS",
    "Journal",
    "OutDir",
    "ResultsLog",
]

logger = logging.getLogger("nanobatch")

# A claim on one file: its name, its size (None: a moved file that was not there), and a moved file's stamp.
Claim = tuple[str, "int | None", "Stamp | None"]

# Errors that no other item's write would escape: the run stops (exit 3) rather than pay for more answers.
FOLDER_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EMFILE, errno.ENFILE})


def write_report_file(path: Path, data: bytes) -> None:
    """``report.html``, atomically, readable by all (a report is meant to be shared); ConfigError, and nothing
    written, if a file nanobatch did not write is at *path* (``own.check_own_files``)."""
    check_own_files(path.parent, (path.name,))
    atomic_write(path, data, mode=0o644)


def write_all(file: IO[bytes], data: bytes) -> None:
    """*data* written to the unbuffered *file* in full (one system call, as a rule), or OSError: nothing is
    kept in a buffer for a later write or the close to try again (and fail again, a full disk's error twice)."""
    view = memoryview(data)
    while view:
        if not (written := file.write(view)):
            raise OSError(errno.EIO, "the file took none of the bytes written to it")
        view = view[written:]


class ResultsLog:
    """Append-only ``results.jsonl``: one record per line, flushed and fsync'ed before the next."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: IO[bytes] | None = None

    def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = open_own(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT)
        try:
            self._mend_torn_tail(fd)
        except BaseException:
            os.close(fd)
            raise
        self._file = os.fdopen(fd, "ab", buffering=0)  # no buffer: a write the disk refused is not tried again

    def _mend_torn_tail(self, fd: int) -> None:
        """End the last line with its newline, so that the next record starts a line of its own; cut it off
        instead if it is a record torn by a crash mid-write (never complete: its item will be sent again).

        Only what nanobatch tore is cut: a last line that is whole JSON (a record saved by an editor that
        drops the final newline) or that nanobatch did not begin (anyone's text) stays as it is.
        """
        size = os.fstat(fd).st_size
        if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
            return
        keep = end = size  # after the last newline, found by reading backwards a block at a time
        while end > 0:
            start = max(0, end - 65536)
            block = os.pread(fd, end - start, start)
            if (at := block.rfind(b"\n")) >= 0:
                keep = start + at + 1
                break
            keep = end = start
        if is_torn_record(os.pread(fd, size - keep, keep)):
            logger.warning("%s: removing a line torn by a crash (%d bytes); its item will run again", self.path,
                           size - keep)  # fmt: skip
            os.ftruncate(fd, keep)
        else:
            os.write(fd, b"\n")  # O_APPEND: at the end
            logger.info("%s: added the newline missing after the last line", self.path)

    def append_many(self, records: list[ItemRecord]) -> None:
        """Append *records* in one write and one fsync (group commit): all are durable when this returns. A
        crash mid-write can tear only the last line, which the next :meth:`open` cuts off."""
        assert self._file is not None, "open() first"
        lines = b"".join(orjson.dumps(record.to_json()) + b"\n" for record in records)
        write_all(self._file, SECRETS.cut_json(lines))  # (a server's words: its messages are cut, this is the last net)
        os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class Journal:
    """``journal.jsonl``: a line per request, written just before it is sent; one when it got an error
    answer (settled); and a line naming an item's files, written just before they are.

    A request whose line has no matching result record (same run, same item)
    and was not settled (an error answer, or no connection at all) was sent and
    its answer never saved: it may have been charged without a saved result
    (noted once it goes out; batch requests are in the batch ledger). A file
    named in the journal is nanobatch's, even when the run died before the
    record that names it (:func:`reset_journal` carries such lines over).
    Lines are flushed to the kernel, so they survive the process being killed;
    they are not fsync'ed (a power cut may lose them).
    """

    def __init__(self, out_dir: Path, run_id: str) -> None:
        self.path = out_dir / JOURNAL_FILE
        self.run_id = run_id
        self._file: IO[bytes] | None = None

    def open(self) -> None:
        if self._file is None:  # opened early by a line written before the engine starts (restored)
            self._file = os.fdopen(open_own(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT), "ab", buffering=0)

    def dispatched(self, item_id: str, key: str | None, attempt: int) -> None:
        self._write({"event": "dispatched", "run": self.run_id, "id": item_id, "key": key, "attempt": attempt})

    def settled(self, item_id: str, attempt: int) -> None:
        """The request *attempt* of *item_id* got a definite answer that is not a result (an HTTP error, or
        no connection): it is not in doubt, whatever becomes of its item."""
        self._write({"event": "settled", "run": self.run_id, "id": item_id, "attempt": attempt})

    def uploading(self, item_id: str, objects: list[tuple[str, int]]) -> None:
        """A claim on objects (URL, size) about to be PUT to ``output.upload_to`` for *item_id*: a run that dies
        before their record leaves them for the next to adopt (:func:`~nanobatch.output.journal.recover`)."""
        self._write({"event": "uploading", "run": self.run_id, "id": item_id, "urls": [u for u, _ in objects],
                     "sizes": [s for _, s in objects]})  # fmt: skip

    def restored(self, item_id: str, url: str, was: tuple[int, str] | None, now: tuple[int, str]) -> None:
        """An object of *item_id*'s that nanobatch put, no record names as it is (put back from the folder's copy,
        or PUT by a run that died before its record): it is now *now* (size, version), not the *was* a record
        keeps (None: no record names it). A later run counts it so while the records still say *was*
        (:func:`~nanobatch.output.journal.recover`), until a new record of the item names it."""
        self.open()
        self._write({"event": "restored", "run": self.run_id, "id": item_id, "url": url, "was": was, "now": now})

    def writing_many(self, items: list[tuple[str, list[Claim]]]) -> None:
        """A claim for each (item id, [(name, size, stamp)]): the files about to be written or moved there, in one
        write to the kernel (a batch of the writer's). A later run adopts a claimed file only if the one there has
        that size, and for a moved file that stamp (a rename keeps it; a copy of it, or a file of the same size,
        is not the file moved): :func:`~nanobatch.output.journal.recover`. A claim whose write or move was then
        refused is :meth:`withdrawn`."""
        if items:
            self._write(*({"event": "writing", "run": self.run_id, "id": item_id, "files": [n for n, _, _ in files],
                           "sizes": [s for _, s, _ in files], "stamps": [t for _, _, t in files]}
                          for item_id, files in items))  # fmt: skip

    def withdrawn(self, item_ids: Iterable[str]) -> None:
        """This run's claims for *item_ids* were not carried out (their moves were refused) and no record says so:
        what is at the names they claimed stays its owner's."""
        if lines := [{"event": "withdrawn", "run": self.run_id, "id": item_id} for item_id in item_ids]:
            self._write(*lines)

    def _write(self, *lines: dict[str, Any]) -> None:
        assert self._file is not None, "open() first"
        write_all(self._file, b"".join(orjson.dumps(line) + b"\n" for line in lines))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class OutDir:
    """One run's output folder. :meth:`check` it, :meth:`hold` it, then every write into it goes through here."""

    def __init__(self, path: Path, run_id: str = "") -> None:
        self.path = path
        self.results = ResultsLog(path / RESULTS_FILE)
        self.journal = Journal(path, run_id)
        self.waited = False  # whether hold() had to wait for another run to let the folder go
        self.held = False  # whether hold() took the folder (a run that did not leaves its metrics file alone)
        self._real: str | None = None  # its real path (escapes)
        self.upload_claims: list[tuple[str, str, int]] = []  # (item, URL, size) a dead run's journal claims (recover)

    @staticmethod
    def check(target: Path) -> None:
        """ConfigError if *target* cannot be made a folder (it, or the nearest existing folder above it, is a
        file), or holds files under nanobatch's own names that nanobatch did not write (``own.check_own_files``)."""
        for place in (target, *target.parents):
            try:
                if place.is_symlink() and not place.exists():
                    raise ConfigError(f"the output folder {target} cannot be made: {place} is a symbolic link to "
                                      f"{os.readlink(place)}, which does not exist (a disk not mounted?)")  # fmt: skip
                st = place.stat()
            except (FileNotFoundError, NotADirectoryError):  # not there (yet): look further up
                continue
            except (OSError, ValueError) as exc:  # a name too long, a folder we may not enter, a NUL in it
                why = getattr(exc, "strerror", None) or exc
                raise ConfigError(f"the output folder {target} cannot be used: {why}") from None
            if not stat.S_ISDIR(st.st_mode):
                where = "is a file" if place == target else f"cannot be made: {place} is a file"
                raise ConfigError(f"the output folder {target} {where}, not a folder")
            if not os.access(place, os.W_OK | os.X_OK):
                verb = "is" if place == target else f"cannot be made: {place} is"
                raise ConfigError(f"the output folder {target} {verb} not writable by this user")
            if place == target:
                check_own_files(target)
            return

    @asynccontextmanager
    async def hold(self, *, wait: bool, handle_signals: bool, deadline: float = math.inf) -> AsyncIterator[OutDir]:
        """Hold the folder's run lock; with *handle_signals*, SIGINT or SIGTERM while waiting for it ends the run, as
        does reaching *deadline* (anyio's clock: the run's time limit)."""
        lock = RunLock(self.path, wait=wait, deadline=deadline)
        if wait and handle_signals:
            await _acquire_interruptibly(lock)
        else:
            await lock.__aenter__()
        self.waited, self.held = lock.waited, True
        try:
            check_own_files(self.path)  # again, now that no other run can be writing them
            yield self
        finally:
            self.close()  # if the run ended before its engine could (closing twice is harmless)
            await lock.__aexit__(None, None, None)

    def recover(self, index: ResultsIndex) -> list[dict[str, Any]]:
        """What a dead run left: its requests in flight (reported and returned), its journal's claims on files
        (carried over), its half-written temporary files (removed). Call with the lock held."""
        from .journal import recover

        orphans, carried, self.upload_claims = recover(self.path / JOURNAL_FILE, index)  # one pass over it
        if orphans:
            ids = ", ".join(sorted({o["id"] for o in orphans})[:10])
            logger.warning("%d requests sent by a run that ended without saving their results (items %s): they may "
                           "have been charged; the items not done are sent again", len(orphans), ids)  # fmt: skip
        if carried:
            atomic_write(self.path / JOURNAL_FILE, b"".join(carried))
        else:
            (self.path / JOURNAL_FILE).unlink(missing_ok=True)
        remove_stale_temp_files(self.path)
        return orphans

    def open(self) -> None:
        self.results.open()
        self.journal.open()

    def close(self) -> None:
        self.results.close()
        self.journal.close()

    @property
    def batch_folder(self) -> Path:
        """Where the batch tier keeps its chunks, results files and ledger (:mod:`nanobatch.run.batch`)."""
        return self.path / BATCH_FOLDER

    def file(self, name: str) -> str:
        """The path of the output name *name* (checked by the manifest to stay inside the folder)."""
        return os.path.join(self.path, name)

    def escapes(self, name: str) -> bool:
        """Whether *name*'s folder leads out of the output folder through a symbolic link, as it is now (one put
        there since the manifest was checked, or under ``rejected/``, which no template names). A name at the
        folder's top costs nothing to ask about."""
        if not (folder := os.path.dirname(name)):
            return False
        if self._real is None:  # the folder itself, held by the run: resolved once
            self._real = os.path.realpath(self.path)
        real = os.path.realpath(self.file(folder))
        return real != self._real and not real.startswith(self._real + os.sep)

    def placed(self, name: str) -> str:
        """:meth:`file`, for a file about to be written, moved or deleted there: PermissionError if its folder
        leads out of the output folder (nothing outside it is ever written, moved or deleted)."""
        if self.escapes(name):
            raise PermissionError(errno.EACCES, "its folder leads out of the output folder through a symbolic link",
                                  self.file(name))  # fmt: skip
        return self.file(name)

    def put(
        self,
        files: list[tuple[str, Image]],
        moves: Sequence[tuple[str, str]],
        replaceable: Owned,
        folders: set[str],
    ) -> None:
        """Move one item's done files to their new names and write its new ones (*folders*: those touched, to
        fsync). Only a file in *replaceable* (nanobatch wrote it for this item), still as it left it, may be
        replaced; on an error, undo what was done here and raise (FileExistsError for a file that is not the item's,
        or was changed since)."""
        undo: list[tuple[str, str | None]] = []  # (path, where it was moved from; None: made here)
        target = ""
        try:
            for old, new in moves:
                if old == new:
                    continue  # moved there by a run that died before its record
                src = self.placed(old)
                if old in replaceable and not unchanged(src, replaceable[old]):  # retouched: it is the user's now
                    raise FileExistsError(errno.EEXIST, "was changed since nanobatch wrote it: not moved", src)
                target, existed = self._claim(new, replaceable)
                move_file(src, target, replace=existed)  # one that appears meanwhile is not the item's
                undo.append((target, src))
                folders.update((os.path.dirname(src), os.path.dirname(target)))
            for name, image in files:
                target, existed = self._claim(name, replaceable)
                write_image(target, image, replace=existed)  # one that appears meanwhile is not the item's
                if not existed:
                    undo.append((target, None))
                folders.add(os.path.dirname(target))
        except OSError as exc:
            if not isinstance(exc, FileExistsError) and target:
                exc.filename = target  # the image's name, not its temporary file's
            for done, origin in reversed(undo):
                with contextlib.suppress(OSError):
                    if origin is not None:
                        move_file(done, origin)  # back, across disks too (a rename could not)
                    else:
                        os.unlink(done)
            raise

    def claims(self, files: list[tuple[str, Image]], moves: Sequence[tuple[str, str]]) -> list[Claim]:
        """The names :meth:`put` is about to give files, with their sizes, and a moved file's stamp as it is now:
        the journal's claim on them, before they are written."""
        stamps = [(new, stamp_of(self.file(old))) for old, new in moves]
        return [(name, image.size, None) for name, image in files] + [(n, s[0] if s else None, s) for n, s in stamps]

    def stamped(self, record: ItemRecord) -> ItemRecord:
        """*record* with the stamp of each file it names, as :meth:`put` just left them."""
        if not (files := record.files):
            return record
        return replace(record, file_stamps=tuple(stamp_of(self.file(name)) for name in files))

    def _claim(self, name: str, replaceable: Owned) -> tuple[str, bool]:
        """The path of *name* and whether a file of this item's is there to replace (one look); FileExistsError
        if something is there that nanobatch did not write for this item, or that was changed since."""
        path = self.placed(name)
        existed = os.path.lexists(path)
        if existed and not is_ours(replaceable, name, path):
            raise FileExistsError(errno.EEXIST, "already there, and not as nanobatch wrote it for this item", path)
        return path, existed

    def write_summary(self, summary: dict[str, Any]) -> None:
        """Raises :class:`RunAborted` (exit 3) if it cannot be written (a full disk)."""
        try:
            atomic_write(self.path / SUMMARY_FILE, SECRETS.cut_json(json.dumps(summary, indent=2).encode()) + b"\n")
        except OSError as exc:
            raise RunAborted(f"cannot write {SUMMARY_FILE} into {self.path}: {exc}") from exc


async def _acquire_interruptibly(lock: RunLock) -> None:
    """Wait for *lock*; a SIGINT or SIGTERM meanwhile raises :class:`Interrupted` (nothing was sent)."""
    received: list[signal.Signals] = []
    failed: NanobatchError | None = None
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with anyio.create_task_group() as tg:

            async def watch() -> None:
                async for signum in signals:
                    received.append(signal.Signals(signum))
                    tg.cancel_scope.cancel()  # stops the wait below

            tg.start_soon(watch)
            try:
                await lock.__aenter__()
            except NanobatchError as exc:  # its time limit came: said as itself, not in the task group's wrapping
                failed = exc
            tg.cancel_scope.cancel()
    if failed is not None:
        raise failed
    if received:
        await lock.__aexit__(None, None, None)  # taken just as the signal came: let it go (a no-op otherwise)
        raise Interrupted(
            f"interrupted by {received[0].name} while waiting for the run holding {lock.path.parent}; nothing was sent"
        )
