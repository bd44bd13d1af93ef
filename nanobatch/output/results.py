"""What an output folder holds so far: its records (:func:`read_records`) and the index a re-run resumes from.

Writing into the folder is :mod:`nanobatch.output.outdir`'s.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple, Protocol, TypeVar

import orjson

from ..names import RESULTS_FILE, plain_path
from ..scratch import scratch_db
from .files import Stamp
from .index_cache import MIN_LINES, Restored, prune_superseded, restore_index, save_index
from .reading import UploadStamp, read_file_stamps, read_float, read_stamps, read_strs, read_upload_stamps
from .record import (
    TOKEN_FIELDS,
    ErrorInfo,
    ItemRecord,
    PaidIn,
    files_of,
    line_costs,
    read_steps,
    usage_tokens,
)
from .record_lines import records_at

__all__ = ["IndexEntry", "ResultsIndex"]

logger = logging.getLogger("nanobatch")


FileStamps = tuple[int, int, str]  # an input's (size, mtime_ns, sha256), as inputs.stamps.FileStamp


class IndexEntry(NamedTuple):
    """What a re-run and the summary need from an item's latest record."""

    status: str
    key: str | None
    outputs: tuple[str, ...]
    tokens: tuple[int, int, int, int]
    cost_usd: float  # what the requests that made its result cost (a moved result: what they cost when sent)
    error_kind: str | None
    # {path: (size, mtime_ns, sha256)} of each local input, so an unchanged file need not be read again.
    stamps: dict[str, tuple[int, int, str]] = {}  # shared default, never mutated
    run: str | None = None
    files: tuple[str, ...] = ()  # every file the record wrote: its outputs and its kept steps' outputs
    paid_in: str | None = None  # the run that paid for its result (None: not known)


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
    cost_usd REAL NOT NULL, error_kind TEXT, stamps BLOB, run TEXT, files BLOB, paid_in TEXT, at INTEGER
) WITHOUT ROWID;
CREATE TABLE owned (name BLOB PRIMARY KEY, id TEXT NOT NULL, size INTEGER, mtime INTEGER) WITHOUT ROWID;
CREATE TABLE uploaded (url TEXT PRIMARY KEY, id TEXT NOT NULL, size INTEGER, version TEXT) WITHOUT ROWID;
CREATE TABLE superseded (at INTEGER NOT NULL, id TEXT NOT NULL, status TEXT, outputs BLOB, run TEXT, was_at INTEGER);
CREATE TRIGGER supersede BEFORE UPDATE ON entries WHEN NEW.at IS NOT NULL BEGIN
    INSERT INTO superseded VALUES (NEW.at, OLD.id, OLD.status, OLD.outputs, OLD.run, OLD.at);
END;
"""
_INDEX_VERSION = hashlib.sha256(_INDEX_SCHEMA.encode()).hexdigest()[:16]  # a kept copy must have these tables
_COLUMNS = (
    "id, status, key, outputs, prompt, candidates, thoughts, total, cost_usd, error_kind, stamps, run, files, paid_in"
)
# `at`: where in results.jsonl the entry's line starts (None: added by a run, not read). A line that replaces
# an entry read from an earlier one leaves that entry in `superseded` (the trigger), so the index can tell what
# each item's latest record was before any offset (:meth:`ResultsIndex.changes_since`).
_UPSERT = (
    f"INSERT INTO entries ({_COLUMNS}, at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(id) DO "
    f"UPDATE SET ({_COLUMNS}, at) = ({', '.join(f'excluded.{c.strip()}' for c in _COLUMNS.split(','))}, excluded.at)"
)
_SELECT = f"SELECT {_COLUMNS} FROM entries WHERE id = ?"
_SELECT_MANY = f"SELECT {_COLUMNS} FROM entries WHERE id IN ({{}})"
_AHEAD = 256  # items whose records read_ahead() reads in one query
_SELECT_OK = "SELECT key, outputs, stamps FROM entries WHERE id = ? AND status = 'ok'"
_SELECT_OKS = "SELECT id, key, outputs, stamps FROM entries WHERE id IN ({}) AND status = 'ok'"
# Each item with a line at or after an offset: the entry its first such line replaced (the superseded row with
# the lowest `at` past the offset; SQLite takes the bare columns from that row), and its entry now.
_CHANGES = """
SELECT e.id, s.status, s.was_at, s.outputs, e.status, e.outputs FROM entries e
LEFT JOIN (SELECT id, status, was_at, outputs, MIN(at) FROM superseded WHERE at >= ? GROUP BY id) s ON s.id = e.id
WHERE e.at >= ?
"""
_TOTALS = (
    "SELECT status, COALESCE(error_kind, 'unknown'), COUNT(*), TOTAL(prompt), TOTAL(candidates), TOTAL(thoughts), "
    "TOTAL(total), TOTAL(cost_usd) FROM entries GROUP BY status, error_kind"
)
_OWN = "INSERT OR REPLACE INTO owned VALUES (?, ?, ?, ?)"
_OWNED_UNDER = "SELECT name, size, mtime FROM owned WHERE name >= ? AND name < ? AND id = ?"


def _owned_rows(
    item_id: str, files: Sequence[str], stamps: Sequence[Stamp | None] | None
) -> Iterator[tuple[bytes, str, int | None, int | None]]:
    """The ``owned`` rows of a record's *files*, each with its stamp (none for a line from before stamps)."""
    for name, stamp in zip(files, stamps or (None,) * len(files), strict=True):
        yield _name_key(name), item_id, *(stamp or (None, None))


def _stamp(size: int | None, mtime: int | None) -> Stamp | None:
    return None if size is None or mtime is None else (size, mtime)


def _name_key(name: str) -> bytes:
    """*name*'s key in the index: plain (a record from before names were made plain may say "a/./x.png")."""
    return plain_path(name).encode("utf-8", "surrogatepass")


def _row(record: ItemRecord) -> tuple[Any, ...]:
    stamps, paid_in = record.input_stamps, record.paid_in
    return (
        record.id,
        record.status,
        record.key,
        orjson.dumps(list(record.outputs)),
        *record.tokens(),
        record.costs()[0],
        (record.error.kind or None) if record.error is not None else None,
        orjson.dumps(list(zip(record.inputs, stamps, strict=False))) if stamps else None,
        record.run,
        orjson.dumps(record.files) if record.steps else None,  # None: the outputs, no steps
        _paid_in(record.run, paid_in, record.moved_from is not None, record.costs()[1]),
    )


def _paid_in(run: str | None, paid_in: PaidIn | None, moved: bool, paid: float) -> str | None:
    """The run that paid for a line's result: its own; a move's ``paid_in`` (unknown for older moves); or, for a
    line whose run paid nothing for it (a step kept by an earlier run, that run failing again at no cost), the
    run its ``paid_in`` names."""
    if not moved and (paid or paid_in is None):
        return run
    return paid_in.run if paid_in is not None else None


# A record's files, their stamps if it has them, and its objects' URLs (output.upload_to).
_Files = tuple[list[str], "tuple[Stamp | None, ...] | None", "list[tuple[str, UploadStamp | None]]"]
_UPLOADED = "INSERT OR REPLACE INTO uploaded VALUES (?, ?, ?, ?)"


def _uploaded_rows(item_id: str, objects: Iterable[tuple[str, UploadStamp | None]]) -> Iterator[tuple[Any, ...]]:
    """The ``uploaded`` rows of an item's objects, each with its stamp (none for a line from before stamps)."""
    for url, stamp in objects:
        yield url, item_id, *(stamp or (None, None))


def _objects(uploads: Sequence[str] | None, stamps: Sequence[UploadStamp | None] | None) -> list[tuple[str, Any]]:
    """A record's (URL, stamp) pairs."""
    return list(zip(uploads or (), stamps or (None,) * len(uploads or ()), strict=True))


def _line_row(line: dict[str, Any]) -> tuple[tuple[Any, ...], _Files, float]:
    """What :func:`_row` makes of ``ItemRecord.from_json(line)``, the record's files (with their stamps) and what
    its run paid, read from the line with the functions ``from_json`` reads it with, without building the record
    (tests/test_results.py checks the two agree on old, sparse, multi-step, failed and moved lines)."""
    get = line.get
    outputs = read_strs(get("outputs"))
    steps, error, stamps = get("steps"), get("error"), get("input_stamps")
    steps = read_steps(steps) if steps is not None else None  # (the calls cost more than the tests: most are null)
    files = files_of(outputs, steps)
    error = ErrorInfo.from_json(error) if error is not None else None
    stamps = read_stamps(stamps) if stamps is not None else None
    moved, paid_in = "moved_from" in line, get("paid_in")
    paid_in = PaidIn.from_json(paid_in) if paid_in is not None else None
    made, paid = line_costs(read_float(get("cost_usd")), paid_in, moved)
    row = (
        str(line["id"]),
        str(line["status"] or "unknown"),
        get("key"),
        orjson.dumps(outputs),
        *usage_tokens(get("usage")),
        made,
        (error.kind or None) if error is not None else None,
        orjson.dumps(list(zip(read_strs(get("inputs")), stamps, strict=False))) if stamps else None,
        get("run"),
        orjson.dumps(files) if steps else None,
        _paid_in(get("run"), paid_in, moved, paid),
    )
    uploads = read_strs(get("uploads")) if "uploads" in line else ()
    objects = _objects(uploads, read_upload_stamps(get("upload_stamps"), len(uploads)) if uploads else None)
    return row, (files, read_file_stamps(get("file_stamps"), len(files)), objects), paid


class _Identified(Protocol):
    @property
    def id(self) -> str: ...


_HasId = TypeVar("_HasId", bound=_Identified)


def _int(value: Any) -> int:
    return value if isinstance(value, int) else 0


class ResultsIndex:
    """The latest record of each item id in an output folder.

    Kept in a scratch SQLite table, not in Python objects, so memory stays flat with the number of
    records (bench/RESULTS.md, "index load" and the memory rows).
    Use it from one thread (the event loop's); :meth:`close` frees it.
    """

    def __init__(self) -> None:
        self._db = scratch_db(_INDEX_SCHEMA)
        self._paid_usd = 0.0  # what every record read or added says its run paid, superseded ones too
        self._ahead: dict[str, tuple[Any, ...] | None] = {}  # the last few hundred rows read ahead, by id

    @classmethod
    def load(cls, out_dir: Path) -> ResultsIndex:
        """The index of *out_dir*'s results: from the copy kept of it (:mod:`nanobatch.output.index_cache`) and
        the lines appended since, or from every line."""
        index = cls()
        path = out_dir / RESULTS_FILE
        start = restore_index(index._db, path, _INDEX_VERSION) if path.exists() else None
        index._paid_usd = start.paid_usd if start is not None else 0.0
        end: list[Restored] = []
        # The index's columns straight from the parsed lines, not through ItemRecord: building the frozen
        # records made a re-run's start much slower (bench/RESULTS.md, "Why the code is shaped this way").
        rows = ((at, *_line_row(line)) for at, line in records_at(path, start=start, end=end))
        with index._db:  # one transaction: 100,000 inserts in one go
            index._db.execute("BEGIN")
            while chunk := list(itertools.islice(rows, 1000)):
                index._db.executemany(_UPSERT, ((*row, at) for at, row, _, _ in chunk))
                owned = (own for _, row, (names, stamps, _), _ in chunk for own in _owned_rows(row[0], names, stamps))
                index._db.executemany(_OWN, owned)
                index._db.executemany(
                    _UPLOADED, (u for _, row, (*_, ups), _ in chunk for u in _uploaded_rows(row[0], ups))
                )
                index._paid_usd += sum(paid for *_, paid in chunk)
        prune_superseded(index._db, path)
        if end and end[0].lines - (start.lines if start is not None else 0) >= MIN_LINES:
            at = Restored(offset=end[0].offset, lines=end[0].lines, paid_usd=index._paid_usd)
            save_index(index._db, path, _INDEX_VERSION, at)
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

    def add(self, record: ItemRecord) -> None:
        self._ahead.pop(record.id, None)
        self._db.execute(_UPSERT, (*_row(record), None))
        self._db.executemany(_OWN, _owned_rows(record.id, record.files, record.file_stamps))
        self._db.executemany(_UPLOADED, _uploaded_rows(record.id, _objects(record.uploads, record.upload_stamps)))
        self._paid_usd += record.costs()[1]

    def adopt(self, item_id: str, files: Mapping[str, Stamp]) -> None:
        """Count *files* (names and stamps) as written by nanobatch for *item_id* (the journal says so, though no
        record does)."""
        self._db.executemany(_OWN, _owned_rows(item_id, list(files), list(files.values())))

    def owned(self, item_id: str, names: Iterable[str]) -> dict[str, Stamp | None]:
        """Those of *names* that a record of *item_id* says nanobatch wrote (any run's, not only the latest),
        each with the stamp it left the file with: files a new result of that item may replace while they are
        still so (:func:`~nanobatch.output.files.unchanged`)."""
        return {name: owner[1] for name in names if (owner := self.owner(name)) is not None and owner[0] == item_id}

    def owner(self, name: str) -> tuple[str, Stamp | None] | None:
        """The item a record says nanobatch wrote the file *name* for, and the file's stamp then; None if none."""
        row = self._db.execute("SELECT id, size, mtime FROM owned WHERE name = ?", (_name_key(name),)).fetchone()
        return (row[0], _stamp(row[1], row[2])) if row is not None else None

    def adopt_uploads(self, item_id: str, objects: Mapping[str, UploadStamp]) -> None:
        """Count *objects* (URLs and stamps) as put there by nanobatch for *item_id* (the journal says so, and
        they are there)."""
        self._db.executemany(_UPLOADED, _uploaded_rows(item_id, objects.items()))

    def uploaded(self, item_id: str, urls: Iterable[str]) -> dict[str, UploadStamp | None]:
        """Those of *urls* whose objects a record of *item_id* says nanobatch put there (``uploads``), each with the
        stamp it was put with (None: a record from before stamps): the only objects in ``output.upload_to`` a new
        result of that item may replace, and only while each is still so."""
        find = "SELECT id, size, version FROM uploaded WHERE url = ?"
        found = {url: self._db.execute(find, (url,)).fetchone() for url in urls}
        return {
            url: None if row[1] is None else (int(row[1]), str(row[2]))
            for url, row in found.items()
            if row is not None and row[0] == item_id
        }

    def owned_under(self, item_id: str, stem: str) -> dict[str, Stamp | None]:
        """:meth:`owned` for every name an item with the stem *stem* writes (``<stem>.*``, ``<stem>-*``), in
        one look: the files its new answer may replace, whatever their number and extensions."""
        low = _name_key(stem)
        # "-", "." and "/" are consecutive bytes: the range holds the names that go on with "-" or "."
        rows = self._db.execute(_OWNED_UNDER, (low + b"-", low + b"/", item_id))
        # *stem* as given (on Windows a key has "/" for its separators), then the rest of the name
        return {stem + name[len(low) :].decode("utf-8", "surrogatepass"): _stamp(s, m) for name, s, m in rows}

    def owns_between(self, low: str, high: str) -> bool:
        """Whether a file nanobatch wrote for any item has a name from *low* up to, not including, *high*."""
        keys = (_name_key(low), _name_key(high))
        return self._db.execute("SELECT 1 FROM owned WHERE name >= ? AND name < ? LIMIT 1", keys).fetchone() is not None

    def read_ahead(self, items: Iterable[_HasId]) -> Iterator[_HasId]:
        """*items*, as they are taken: the latest records of each few hundred are read in one query, for
        :meth:`get` to answer from (a query per item costs several times as much). A record added since is read
        again."""
        stream = iter(items)
        while chunk := list(itertools.islice(stream, _AHEAD)):
            ids = [item.id for item in chunk]
            rows = {row[0]: row for row in self._db.execute(_SELECT_MANY.format(", ".join("?" * len(ids))), ids)}
            # The last batch's: its items were each asked for as taken (one not asked yet is read alone)
            self._ahead = {item_id: rows.get(item_id) for item_id in ids}
            yield from chunk

    def get(self, item_id: str) -> IndexEntry | None:
        """The latest record of *item_id*, or None if it has none."""
        if item_id in self._ahead:
            row = self._ahead.pop(item_id)
        else:
            row = self._db.execute(_SELECT, (item_id,)).fetchone()
        if row is None:
            return None
        _, status, key, outputs, prompt, candidates, thoughts, total, cost, error_kind, stamps, run, files, paid = row
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
            paid,
        )

    def ok_entry(self, item_id: str) -> tuple[str | None, tuple[str, ...], dict[str, FileStamps]] | None:
        """The work key, outputs and input stamps of *item_id*'s latest record if it is ok; else None (what a
        check of the manifest asks of each item: less than :meth:`get` reads)."""
        row = self._db.execute(_SELECT_OK, (item_id,)).fetchone()
        if row is None:
            return None
        return row[0], tuple(map(str, orjson.loads(row[1]))), _stamps(row[2])

    def ok_entries(self, ids: list[str]) -> dict[str, tuple[str | None, tuple[str, ...], dict[str, FileStamps]]]:
        """:meth:`ok_entry` of each of *ids* (at most a few hundred) that has one, in one query."""
        query = _SELECT_OKS.format(", ".join("?" * len(ids)))
        return {
            str(item_id): (key, tuple(map(str, orjson.loads(outputs))), _stamps(stamps))
            for item_id, key, outputs, stamps in self._db.execute(query, ids)
        }

    def every_entry(self) -> Iterator[tuple[str, tuple[str, ...], dict[str, FileStamps]]]:
        """(status, outputs, input stamps) of every item's latest record."""
        for status, outputs, stamps in self._db.execute("SELECT status, outputs, stamps FROM entries"):
            yield status, tuple(str(name) for name in orjson.loads(outputs)), _stamps(stamps)

    def ok_files(self) -> Iterator[tuple[str, tuple[str, ...]]]:
        """(id, every file its record wrote) of each item whose latest record is ok."""
        for item_id, outputs, files in self._db.execute("SELECT id, outputs, files FROM entries WHERE status = 'ok'"):
            yield item_id, tuple(str(name) for name in orjson.loads(files or outputs))

    def changes_since(self, offset: int) -> Iterator[tuple[str, tuple[str, ...] | None, tuple[str, ...] | None]]:
        """(id, outputs of its latest record before *offset* in results.jsonl if that was ok, outputs of its latest
        record now if ok) of each item with a record read at or after *offset* (None: not ok, or none)."""
        rows = self._db.execute(_CHANGES, (offset, offset))
        for item_id, before, was_at, before_outputs, status, outputs in rows:
            was_ok = before == "ok" and (was_at is None or was_at < offset)  # else the item's first line came later
            yield (
                str(item_id),
                tuple(map(str, orjson.loads(before_outputs))) if was_ok else None,
                tuple(map(str, orjson.loads(outputs))) if status == "ok" else None,
            )

    def runs_since(self, offset: int) -> frozenset[str | None]:
        """The runs that wrote the records read at or after *offset* in results.jsonl (None: a record naming none)."""
        rows = self._db.execute(
            "SELECT run FROM entries WHERE at >= ? UNION SELECT run FROM superseded WHERE was_at >= ?", (offset, offset)
        )
        return frozenset(run for (run,) in rows)

    def totals(self) -> dict[str, Any]:
        """The folder's totals, as ``summary.json``, ``status`` and the report show them: counts, tokens and
        ``cost_usd`` of each item's latest record (what the results held now cost when they were made), and
        ``paid_usd``: what every run into the folder paid, each request once (superseded records too, moves not)."""
        counts: dict[str, int] = {}
        by_kind: dict[str, int] = {}
        sums = [0.0] * 5
        for status, kind, count, *group in self._db.execute(_TOTALS):  # one pass over the table
            counts[status] = counts.get(status, 0) + count
            if status != "ok":
                by_kind[kind] = by_kind.get(kind, 0) + count
            sums = [total + part for total, part in zip(sums, group, strict=True)]
        return {
            "items": sum(counts.values()),
            "counts": {s: counts.get(s, 0) for s in ("ok", "failed", "blocked", "rejected")},
            "tokens": dict(zip(TOKEN_FIELDS, (int(t) for t in sums[:4]), strict=True)),
            "cost_usd": round(sums[4], 6),
            "paid_usd": round(self._paid_usd, 6),
            "failures_by_kind": dict(sorted(by_kind.items(), key=lambda kind: (-kind[1], kind[0]))),
        }
