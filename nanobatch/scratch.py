"""Scratch SQLite databases: per-item state kept on disk, so memory stays flat however long the manifest.

A 100,000-item catalog would otherwise keep 100,000 ids, keys and input stamps in
Python objects (bench row "4 memory", manifest length, holds it flat). SQLite's private temporary database lives in its
page cache (capped below) and spills to a file that is unlinked as soon as it is
opened, so nothing is left behind even when the process is killed. :class:`ScratchTable` puts one table of
such a database behind a Bloom filter, its rows pickled in batches into an unlinked file of their own until
lookups make SQLite worth its B-tree.
"""

from __future__ import annotations

import os
import pickle
import sqlite3
import tempfile
from collections.abc import Iterator
from typing import IO

__all__ = ["ScratchTable", "scratch_db"]

# Pages of SQLite's cache per scratch database (negative: in KiB). Lookups by primary key touch a
# handful of B-tree pages, so a small cache costs little speed.
_CACHE_KIB = 1024


def scratch_db(schema: str) -> sqlite3.Connection:
    """A private, temporary SQLite database with *schema* created in it; gone when closed or on exit."""
    db = sqlite3.connect("", isolation_level=None, check_same_thread=True)
    # Throwaway data: no rollback journal, no fsync.
    db.execute("PRAGMA journal_mode = OFF")
    db.execute("PRAGMA synchronous = OFF")
    db.execute(f"PRAGMA cache_size = -{_CACHE_KIB}")
    db.executescript(schema)
    return db


class ScratchTable:
    """A table of a scratch database, written in batches: a Bloom filter (2 MiB, whatever the number of rows)
    tells a key never seen, the usual case, without asking SQLite. The batches go to a spill file (pickled,
    unlinked at once), and the first few keys the filter may have seen are looked for by reading it again: a
    real clash, or one of the filter's false alarms (about one 100,000-item catalog in seven has one). Only past
    those do the rows go into SQLite, looked up there from then on: a catalog without a clash, the usual case,
    builds no SQLite index at all."""

    _BITS = 1 << 24
    _BATCH = 256
    _SCANS = 8  # keys looked for in the spill file before the rows go into SQLite; only while it holds up to
    _SCAN_ROWS = 1 << 17  # this many rows (1,000,000 keys give the filter's false alarms from about 160,000)

    def __init__(self, db: sqlite3.Connection, table: str, columns: str) -> None:
        self._db = db
        self._insert = f"INSERT INTO {table} VALUES ({', '.join('?' * (columns.count(',') + 1))})"
        self._select = f"SELECT {columns} FROM {table} WHERE {columns.split(',')[0]} = ? LIMIT 1"
        self._bits = bytearray()  # made at the first row: a table left empty costs nothing
        self._pending: list[tuple[object, ...]] = []
        self._rows = 0
        self._spill: IO[bytes] | None = None
        self._in_db = False  # the rows are in SQLite (past the first keys the filter may have seen)
        self._scans = 0

    @property
    def empty(self) -> bool:
        return not self._rows

    def find(self, key: bytes) -> tuple[object, ...] | None:
        """The first row with *key*, or None."""
        if not self._rows:
            return None
        bits, h = self._bits, hash(key)
        a, b, c = h & 0xFF_FFFF, (h >> 24) & 0xFF_FFFF, (h >> 40) & 0xFF_FFFF  # three spots of 24 bits
        if not (bits[a >> 3] >> (a & 7)) & (bits[b >> 3] >> (b & 7)) & (bits[c >> 3] >> (c & 7)) & 1:
            return None
        return self._lookup(key)

    def add(self, row: tuple[object, ...]) -> None:
        """Add *row* (its first value the key), written with the next batch."""
        if not self._bits:
            self._bits = bytearray(self._BITS >> 3)
        bits, h = self._bits, hash(row[0])
        for spot in (h & 0xFF_FFFF, (h >> 24) & 0xFF_FFFF, (h >> 40) & 0xFF_FFFF):
            bits[spot >> 3] |= 1 << (spot & 7)
        self._rows += 1
        self._pending.append(row)
        if len(self._pending) >= self._BATCH:
            self.flush()

    def claim(self, row: tuple[object, ...]) -> tuple[object, ...] | None:
        """Add *row* unless a row has its key already; then that row. (find and add in one, the key hashed once:
        this runs for several tables per item.)"""
        key, h = row[0], hash(row[0])
        a, b, c = h & 0xFF_FFFF, (h >> 24) & 0xFF_FFFF, (h >> 40) & 0xFF_FFFF
        bits = self._bits
        if not bits:
            bits = self._bits = bytearray(self._BITS >> 3)
        elif (bits[a >> 3] >> (a & 7)) & (bits[b >> 3] >> (b & 7)) & (bits[c >> 3] >> (c & 7)) & 1:
            if (found := self._lookup(key)) is not None:  # type: ignore[arg-type]
                return found
        bits[a >> 3] |= 1 << (a & 7)
        bits[b >> 3] |= 1 << (b & 7)
        bits[c >> 3] |= 1 << (c & 7)
        self._rows += 1
        self._pending.append(row)
        if len(self._pending) >= self._BATCH:
            self.flush()
        return None

    def flush(self) -> None:
        if not self._pending:
            return
        if self._in_db:
            self._db.executemany(self._insert, self._pending)
        else:
            if self._spill is None:
                self._spill = tempfile.TemporaryFile(prefix="nanobatch-")
            pickle.dump(self._pending, self._spill, pickle.HIGHEST_PROTOCOL)
        self._pending.clear()

    def _lookup(self, key: bytes) -> tuple[object, ...] | None:
        if not self._in_db and self._scans < self._SCANS and self._rows <= self._SCAN_ROWS:
            self._scans += 1
            return self._scan(key)
        if not self._in_db:  # a key the filter may have seen once too often: the rows so far go into SQLite
            self._in_db = True
            if (spill := self._spill) is not None:
                self._spill = None
                with spill:
                    spill.seek(0)
                    for batch in _batches(spill):
                        self._db.executemany(self._insert, batch)
        self.flush()
        row: tuple[object, ...] | None = self._db.execute(self._select, (key,)).fetchone()
        return row

    def _scan(self, key: bytes) -> tuple[object, ...] | None:
        """The first row with *key*: in the spill file (read through, then left at its end), or not written yet."""
        if (spill := self._spill) is not None:
            spill.seek(0)
            try:
                for batch in _batches(spill):
                    if (row := next((row for row in batch if row[0] == key), None)) is not None:
                        return row
            finally:
                spill.seek(0, os.SEEK_END)
        return next((row for row in self._pending if row[0] == key), None)

    def close(self) -> None:
        if self._spill is not None:
            self._spill.close()


def _batches(spill: IO[bytes]) -> Iterator[list[tuple[object, ...]]]:
    while True:
        try:
            yield pickle.load(spill)  # noqa: S301 (this process's own rows, in its own unlinked file)
        except EOFError:
            return
