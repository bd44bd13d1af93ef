"""The output folder: images, ``results.jsonl``, ``summary.json``, and the index a re-run resumes from.

Durability rules: an image is written to a temporary file and renamed into
place before its record is appended; each record is one line, flushed and
fsync'ed; ``summary.json`` is replaced atomically. A torn last line (the
process died mid-write) is skipped with a warning when the file is read.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any, NamedTuple

import orjson

from ._scratch import scratch_db
from .lock import LOCK_FILE

__all__ = [
    "IndexEntry",
    "ResultsIndex",
    "ResultsLog",
    "atomic_write",
    "fsync_dir",
    "is_done",
    "move_file",
    "read_records",
    "renamed_files",
    "reserved_name_problem",
]

logger = logging.getLogger("nanobatch")

RESULTS_FILE = "results.jsonl"
SUMMARY_FILE = "summary.json"
JOURNAL_FILE = "journal.jsonl"
REPORT_FILE = "report.html"
# nanobatch's own files at the top of the output folder: no output name may use them, as a file or a folder.
RESERVED_FILES = frozenset({RESULTS_FILE, SUMMARY_FILE, JOURNAL_FILE, REPORT_FILE, LOCK_FILE})
# Names starting with this are nanobatch's anywhere in the output folder (its lock, its temporary files).
RESERVED_PREFIX = ".nanobatch"
# Errors that no other item's write would escape: the run stops (exit 3) rather than pay for more answers.
FOLDER_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EMFILE, errno.ENFILE})
TOKEN_FIELDS = ("promptTokenCount", "candidatesTokenCount", "thoughtsTokenCount", "totalTokenCount")


# Temporary file names: unique within the process (the pid makes them unique across processes), and in
# nanobatch's reserved namespace, so that cleaning up after a killed run never takes a file of the user's.
_temp_names = itertools.count()
_TEMP_NAME = re.compile(re.escape(RESERVED_PREFIX) + r"-[A-Za-z0-9_-]+\.tmp")


def reserved_name_problem(name: str) -> str | None:
    """Why the output name *name* (relative to the output folder) would fall on nanobatch's own files, or None."""
    parts = name.replace(os.sep, "/").split("/")
    if len(parts) > 1 and parts[0].casefold() in RESERVED_FILES:
        return f"the output name {name!r} would put a folder where nanobatch keeps its own file {parts[0]}"
    if any(part.casefold().startswith(RESERVED_PREFIX) for part in parts):
        return f"the output name {name!r} has a name starting with {RESERVED_PREFIX!r}: nanobatch's own files"
    return None


def atomic_write(path: str | os.PathLike[str], data: bytes) -> None:
    """Write *data* to *path* so that readers see the old file or the whole new one, never a part.

    Five system calls (open, write, fsync, close, rename), the fewest that keep that promise: the
    writer thread gives the GIL up at each one, and while the event loop is busy, taking it back
    is what an image's write mostly costs. Paths are strings (os.path, not pathlib, which interns
    every name it parses: on CPython 3.12 interned strings are immortal, so each name would stay for good).
    """
    folder = os.path.dirname(os.fspath(path))
    # O_EXCL: never another's temp file; the kernel applies the umask to 0o666 (what a plain open makes).
    tmp = os.path.join(folder, f"{RESERVED_PREFIX}-{os.getpid()}-{next(_temp_names)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    try:
        fd = os.open(tmp, flags, 0o666)
    except FileNotFoundError:  # a subfolder from the output template, not made yet
        os.makedirs(folder or ".", exist_ok=True)
        fd = os.open(tmp, flags, 0o666)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def fsync_dir(folder: str | os.PathLike[str]) -> None:
    """Make the renames and new files in *folder* durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except (OSError, AttributeError):  # O_DIRECTORY does not exist on Windows
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_stale_temp_files(out_dir: Path) -> int:
    """Delete half-written temporary files a killed run left behind (call with the folder's lock held).

    Only files named as nanobatch names them (``.nanobatch-<pid>-<n>.tmp``, ``.nanobatch-report-*.tmp``), in the output
    folder's own tree (symbolic links are not followed): nothing of the user's, whatever its name.
    """
    removed = 0
    for folder, _, names in os.walk(out_dir):
        for name in names:
            path = os.path.join(folder, name)
            if _TEMP_NAME.fullmatch(name) and os.path.isfile(path) and not os.path.islink(path):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                removed += 1
    if removed:
        logger.info("removed %d half-written temporary files left by an interrupted run", removed)
    return removed


def renamed_files(entry: IndexEntry, stem: str) -> list[tuple[str, str]]:
    """(old, new) for each file of *entry* (an ok record) whose name follows from an output name other than
    *stem*: ``<old>.png`` -> ``<stem>.png``, ``<old>-2.png`` -> ``<stem>-2.png``, ``<old>.step1.png`` -> ..."""
    if not entry.outputs:
        return []
    old = os.path.splitext(entry.outputs[0])[0]
    if len(entry.outputs) > 1:
        if not old.endswith("-1"):
            return []  # not a name nanobatch made: leave it be
        old = old[:-2]
    if old == stem:
        return []
    return [(name, stem + name[len(old) :]) for name in entry.files if name[: len(old) + 1] in (old + ".", old + "-")]


def move_file(src: str, dst: str) -> None:
    """Rename *src* to *dst*, making *dst*'s folder; copied where a rename cannot go (another disk)."""
    os.makedirs(os.path.dirname(dst) or ".", exist_ok=True)
    try:
        os.replace(src, dst)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        with open(src, "rb") as f:
            atomic_write(dst, f.read())
        os.unlink(src)


def read_records(path: Path) -> Iterator[dict[str, Any]]:
    """Item records from a results file, oldest first; torn or foreign lines are skipped with a warning."""
    if not path.exists():
        return
    with path.open("rb") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = orjson.loads(line)
            except orjson.JSONDecodeError:
                logger.warning("%s: line %d is not valid JSON (torn by a crash?); ignoring it", path, number)
                continue
            if _is_record(record):
                yield record


class IndexEntry(NamedTuple):
    """What a re-run and the summary need from an item's latest record."""

    status: str
    key: str | None
    outputs: tuple[str, ...]
    tokens: tuple[int, int, int, int]
    cost_usd: float
    error_kind: str | None
    # {path: (size, mtime_ns, sha256)} of each local input, so an unchanged file need not be read again.
    stamps: dict[str, tuple[int, int, str]] = {}  # shared default, never mutated
    run: str | None = None
    files: tuple[str, ...] = ()  # every file the record wrote: its outputs and its kept steps' outputs


def _stamps(encoded: bytes | None) -> dict[str, tuple[int, int, str]]:
    """Input stamps as stored by :func:`_row`; empty if unreadable (an old or hand-edited record: the files
    will simply be read again)."""
    if not encoded:
        return {}
    try:
        return {str(path): (int(st[0]), int(st[1]), str(st[2])) for path, st in orjson.loads(encoded)}
    except (orjson.JSONDecodeError, TypeError, ValueError, IndexError):
        return {}


_INDEX_SCHEMA = """
CREATE TABLE entries (
    id TEXT PRIMARY KEY, status TEXT NOT NULL, key TEXT, outputs BLOB NOT NULL,
    prompt INTEGER, candidates INTEGER, thoughts INTEGER, total INTEGER,
    cost_usd REAL NOT NULL, error_kind TEXT, stamps BLOB, run TEXT, files BLOB
) WITHOUT ROWID;
CREATE TABLE owned (name BLOB PRIMARY KEY, id TEXT NOT NULL) WITHOUT ROWID;
"""
_COLUMNS = "id, status, key, outputs, prompt, candidates, thoughts, total, cost_usd, error_kind, stamps, run, files"
_UPSERT = f"INSERT OR REPLACE INTO entries ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
_SELECT = f"SELECT {_COLUMNS} FROM entries WHERE id = ?"
_OWN = "INSERT OR REPLACE INTO owned VALUES (?, ?)"


def record_files(record: dict[str, Any]) -> list[str]:
    """The files *record* says its item wrote: its outputs, then its kept steps' outputs."""
    files = [str(name) for name in record.get("outputs") or ()]
    for step in record.get("steps") or ():
        if isinstance(step, dict):
            files += (str(name) for name in step.get("outputs") or ())
    return files


def _owned_rows(records: Iterable[dict[str, Any]]) -> Iterator[tuple[bytes, str]]:
    for record in records:
        item_id = str(record["id"])
        for name in record_files(record):
            yield _name_key(name), item_id


def _name_key(name: str) -> bytes:
    return name.replace(os.sep, "/").encode("utf-8", "surrogatepass")


def _row(record: dict[str, Any]) -> tuple[Any, ...]:
    # Hot when a re-run loads 100,000 records: positional, no conversions (nanobatch wrote these lines).
    usage = record.get("usage") or {}
    error = record.get("error")
    stamps = record.get("input_stamps")
    return (
        str(record["id"]),
        record["status"],
        record.get("key"),
        orjson.dumps(record.get("outputs") or []),
        usage.get("promptTokenCount", 0),
        usage.get("candidatesTokenCount", 0),
        usage.get("thoughtsTokenCount", 0),
        usage.get("totalTokenCount", 0),
        record.get("cost_usd") or 0.0,
        error.get("kind") if isinstance(error, dict) else None,
        orjson.dumps(list(zip(record.get("inputs") or (), stamps, strict=False))) if stamps else None,
        record.get("run"),
        orjson.dumps(record_files(record)) if record.get("steps") else None,  # None: the outputs, no steps
    )


def _int(value: Any) -> int:
    return value if isinstance(value, int) else 0


class ResultsIndex:
    """The latest record of each item id in an output folder.

    Kept in a scratch SQLite table, not in Python objects: a re-run of a 100,000-item
    catalog holds a few MB of page cache instead of a dictionary over 100 MB.
    Use it from one thread (the event loop's); :meth:`close` frees it.
    """

    def __init__(self) -> None:
        self._db = scratch_db(_INDEX_SCHEMA)

    @classmethod
    def load(cls, out_dir: Path) -> ResultsIndex:
        index = cls()
        records = read_records(out_dir / RESULTS_FILE)
        with index._db:  # one transaction: 100,000 inserts in one go
            index._db.execute("BEGIN")
            while chunk := list(itertools.islice(records, 1000)):
                index._db.executemany(_UPSERT, map(_row, chunk))
                index._db.executemany(_OWN, _owned_rows(chunk))
        return index

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> ResultsIndex:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __len__(self) -> int:
        count: int = self._db.execute("SELECT COUNT(*) FROM entries").fetchone()[0]
        return count

    def add(self, record: dict[str, Any]) -> None:
        self._db.execute(_UPSERT, _row(record))
        self._db.executemany(_OWN, _owned_rows([record]))

    def adopt(self, item_id: str, names: Iterable[str]) -> None:
        """Count *names* as files nanobatch wrote for *item_id* (the journal says so, though no record does)."""
        self._db.executemany(_OWN, ((_name_key(name), item_id) for name in names))

    def owned(self, item_id: str, names: Iterable[str]) -> frozenset[str]:
        """Those of *names* that a record of *item_id* says nanobatch wrote (any run's, not only the latest):
        files a new result of that item may replace."""
        return frozenset(
            name
            for name in names
            if self._db.execute("SELECT id FROM owned WHERE name = ?", (_name_key(name),)).fetchone() == (item_id,)
        )

    def get(self, item_id: str) -> IndexEntry | None:
        """The latest record of *item_id*, or None if it has none."""
        row = self._db.execute(_SELECT, (item_id,)).fetchone()
        if row is None:
            return None
        _, status, key, outputs, prompt, candidates, thoughts, total, cost, error_kind, stamps, run, files = row
        names = tuple(str(name) for name in orjson.loads(outputs))
        return IndexEntry(
            status,
            key,
            names,
            (_int(prompt), _int(candidates), _int(thoughts), _int(total)),
            cost if isinstance(cost, float) else 0.0,
            error_kind,
            _stamps(stamps),
            run,
            tuple(str(name) for name in orjson.loads(files)) if files else names,
        )

    def is_done(self, item_id: str, key: str, out_dir: Path) -> bool:
        """True when the latest record of *item_id* is ``ok`` for exactly this *key* and its files exist."""
        return is_done(self.get(item_id), key, out_dir)

    def totals(self) -> dict[str, Any]:
        db = self._db
        counts = dict(db.execute("SELECT status, COUNT(*) FROM entries GROUP BY status").fetchall())
        items, *sums = db.execute(
            "SELECT COUNT(*), TOTAL(prompt), TOTAL(candidates), TOTAL(thoughts), TOTAL(total), TOTAL(cost_usd) "
            "FROM entries"
        ).fetchone()
        by_kind = db.execute(
            "SELECT COALESCE(error_kind, 'unknown') AS kind, COUNT(*) FROM entries WHERE status != 'ok' "
            "GROUP BY kind ORDER BY COUNT(*) DESC, kind"
        )
        return {
            "items": items,
            "counts": {s: counts.get(s, 0) for s in ("ok", "failed", "blocked")},
            "tokens": dict(zip(TOKEN_FIELDS, (int(t) for t in sums[:4]), strict=True)),
            "cost_usd": round(sums[4], 6),
            "failures_by_kind": dict(by_kind.fetchall()),
        }


def is_done(entry: IndexEntry | None, key: str, out_dir: Path) -> bool:
    """True when *entry* (an item's latest record) is ``ok`` for exactly this *key* and its files exist."""
    return (
        entry is not None
        and entry.status == "ok"
        and entry.key == key
        and all(os.path.isfile(os.path.join(out_dir, name)) for name in entry.outputs)
    )


def _is_record(value: Any) -> bool:
    """Whether a parsed line is an item record (anything else in results.jsonl is skipped)."""
    return isinstance(value, dict) and "id" in value and "status" in value


def _is_record_line(line: bytes) -> bool:
    try:
        return _is_record(orjson.loads(line))
    except orjson.JSONDecodeError:
        return False


class ResultsLog:
    """Append-only ``results.jsonl``: one record per line, flushed and fsync'ed before the next."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: IO[bytes] | None = None

    def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("ab")
        self._mend_torn_tail()

    def _mend_torn_tail(self) -> None:
        """Cut off a line torn by a crash mid-write, so that every line of the file stays parseable.

        The torn record was never complete, so its item has no result and will be sent again.
        """
        assert self._file is not None
        with self.path.open("rb+") as f:
            size = f.seek(0, os.SEEK_END)
            if size == 0:
                return
            f.seek(max(0, size - 1))
            if f.read(1) == b"\n":
                return
            keep = 0  # after the last newline, found by reading backwards a block at a time
            end = size
            while end > 0:
                start = max(0, end - 65536)
                f.seek(start)
                block = f.read(end - start)
                if b"\n" in block:
                    keep = start + block.rfind(b"\n") + 1
                    break
                end = start
            f.seek(keep)
            if _is_record_line(f.read(size - keep)):
                # Whole, only its newline missing (an editor, a copy): it counts, so it stays.
                f.seek(size)
                f.write(b"\n")
                logger.info("%s: added the newline missing after the last record", self.path)
                return
            logger.warning(
                "%s: removing a line torn by a crash (%d bytes); its item will run again", self.path, size - keep
            )
            f.truncate(keep)

    def append(self, record: dict[str, Any]) -> None:
        self.append_many([record])

    def append_many(self, records: list[dict[str, Any]]) -> None:
        """Append *records* in one write and one fsync (group commit): all are durable when this returns.

        A crash mid-write can tear only the last line, which the next :meth:`open` cuts off.
        """
        assert self._file is not None, "open() first"
        self._file.write(b"".join(orjson.dumps(record) + b"\n" for record in records))
        self._file.flush()
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
    never answered: it may have been charged without a saved result. A file
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
        self._file = self.path.open("ab")

    def dispatched(self, item_id: str, key: str | None, attempt: int) -> None:
        self._write({"event": "dispatched", "run": self.run_id, "id": item_id, "key": key, "attempt": attempt})

    def settled(self, item_id: str, attempt: int) -> None:
        """The request *attempt* of *item_id* got a definite answer that is not a result (an HTTP error, or
        no connection): it is not in doubt, whatever becomes of its item."""
        self._write({"event": "settled", "run": self.run_id, "id": item_id, "attempt": attempt})

    def _write(self, line: dict[str, Any]) -> None:
        assert self._file is not None, "open() first"
        self._file.write(orjson.dumps(line) + b"\n")
        self._file.flush()

    def writing(self, item_id: str, names: list[str]) -> None:
        """Note that nanobatch is about to write (or move) *item_id*'s files *names*: they are its own."""
        assert self._file is not None, "open() first"
        line = {"event": "writing", "run": self.run_id, "id": item_id, "files": names}
        self._file.write(orjson.dumps(line) + b"\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def orphaned_requests(out_dir: Path, index: ResultsIndex | None = None) -> list[dict[str, Any]]:
    """Requests the journal says were sent whose item has no result from that run (the run died).

    *index* is the folder's loaded :class:`ResultsIndex`, if the caller has it (saves reading the results again).
    """
    path = out_dir / JOURNAL_FILE
    if not path.exists():
        return []
    if index is None:
        with ResultsIndex.load(out_dir) as loaded:
            return orphaned_requests(out_dir, loaded)
    # Requests in doubt, by (run, id, attempt): sent, not settled by an error answer, their item not recorded.
    open_requests: dict[tuple[Any, str, Any], dict[str, Any]] = {}
    with path.open("rb") as f:
        for line in f:
            try:
                entry = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue  # torn by the crash it is there to report
            if not isinstance(entry, dict) or "id" not in entry or entry.get("event") not in ("dispatched", "settled"):
                continue
            request = (entry.get("run"), entry["id"], entry.get("attempt"))
            if entry.get("event") == "settled":
                open_requests.pop(request, None)
                continue
            latest = index.get(entry["id"])
            if latest is None or latest.run != entry.get("run"):
                open_requests[request] = entry
    orphans = {(entry.get("run"), entry["id"]): entry for entry in open_requests.values()}  # one per item and run
    return list(orphans.values())


def reset_journal(out_dir: Path, index: ResultsIndex) -> list[dict[str, Any]]:
    """Report and clear what a dead run left in flight; called by a new run that holds the lock."""
    orphans = orphaned_requests(out_dir, index)
    if orphans:
        ids = ", ".join(sorted({o["id"] for o in orphans})[:10])
        logger.warning(
            "a previous run died with %d requests in flight (items %s): they may have been charged "
            "without a saved result; they will be sent again",
            len(orphans),
            ids,
        )
    carried = _adopt_writes(out_dir / JOURNAL_FILE, index)
    if carried:
        atomic_write(out_dir / JOURNAL_FILE, b"".join(carried))
    else:
        (out_dir / JOURNAL_FILE).unlink(missing_ok=True)
    return orphans


def _adopt_writes(path: Path, index: ResultsIndex) -> list[bytes]:
    """Files the journal says nanobatch wrote that no record names (the run died between the image and its
    record): made *index*'s, so they may be replaced; returns their lines, to keep until a record names them."""
    if not path.exists():
        return []
    carried = []
    with path.open("rb") as f:
        for line in f:
            try:
                entry = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            if not isinstance(entry, dict) or entry.get("event") != "writing" or not isinstance(entry.get("id"), str):
                continue
            names = [str(name) for name in entry.get("files") or ()]
            if unowned := sorted(set(names) - index.owned(entry["id"], names)):
                index.adopt(entry["id"], unowned)
                carried.append(orjson.dumps({**entry, "files": unowned}) + b"\n")
    return carried
