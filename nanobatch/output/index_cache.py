"""A copy of an output folder's resume index, kept outside the folder, so that loading it reads only the records
appended since (``status``, ``validate`` and a run's start stay flat in the work already done).

results.jsonl only grows (a run appends; it cuts a line a crash tore, then appends again). The copy notes how
far into the file it has read, and a digest of the first and the last 64 KiB before that point: it is used only
while the file still starts with those bytes (the same file, not shorter), else thrown away and made again. It
lives in the user's cache folder (``$XDG_CACHE_HOME/nanobatch/index``, else ``~/.cache/nanobatch/index``), one
SQLite file per results file, and is written only after a load that read at least
:data:`MIN_LINES` lines: small folders never leave one. Deleting it is always safe.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from ..names import SUMMARY_FILE

__all__ = ["MIN_LINES", "Restored", "prefix_digest", "prune_superseded", "restore_index", "save_index"]

logger = logging.getLogger("nanobatch")

MIN_LINES = 10_000  # a load that read fewer lines leaves the copy as it is
_WINDOW = 1 << 16


@dataclass(frozen=True, slots=True)
class Restored:
    """Where the copy stops: the byte offset in results.jsonl, the lines before it, what their runs paid."""

    offset: int
    lines: int
    paid_usd: float


def _copy_path(results: Path) -> Path:
    base = os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "nanobatch"
    )
    real = os.path.realpath(results).encode("utf-8", "surrogatepass")
    return Path(base) / "index" / f"{hashlib.sha256(real).hexdigest()[:32]}.sqlite"


def prefix_digest(path: Path, offset: int) -> str:
    """A digest of the file at *path* (which file: its device and inode), of *offset* and of the first and the
    last 64 KiB before it: while the file is only appended to, it stays the same; a file replaced (by an editor
    that writes a new one), cut or rewritten (its head or the bytes before *offset* changed) almost always
    changes it. Raises OSError if the file cannot be read."""
    with path.open("rb") as f:
        st = os.fstat(f.fileno())
        digest = hashlib.sha256(f"{st.st_dev}:{st.st_ino}:{offset}:".encode())
        digest.update(f.read(min(_WINDOW, offset)))
        f.seek(max(0, offset - _WINDOW))
        digest.update(f.read(offset - max(0, offset - _WINDOW)))
    return digest.hexdigest()


def _fingerprint(results: Path, offset: int, version: str) -> str:
    """:func:`prefix_digest` of *results* at *offset*, with the *version* of the index's tables."""
    return hashlib.sha256(f"{version}:{prefix_digest(results, offset)}".encode()).hexdigest()


def restore_index(db: sqlite3.Connection, results: Path, version: str) -> Restored | None:
    """Fill *db* (empty, with the index's tables, whose *version* the copy's must be) from the copy of
    *results*' index if it still holds; None if there is none that does (then *db* is left as it was)."""
    copy = _copy_path(results)
    if not copy.is_file():
        return None
    try:
        source = sqlite3.connect(f"file:{copy}?mode=ro", uri=True)
    except sqlite3.Error:
        return None
    try:
        meta = dict(source.execute("SELECT key, value FROM meta").fetchall())
        offset = int(meta["offset"])
        if os.stat(results).st_size < offset or _fingerprint(results, offset, version) != meta["fingerprint"]:
            return None
        source.backup(db)
        db.execute("DROP TABLE meta")
        return Restored(offset=offset, lines=int(meta["lines"]), paid_usd=float(meta["paid_usd"]))
    except (sqlite3.Error, OSError, KeyError, ValueError) as exc:
        logger.debug("the copy of the index of %s is not used: %s", results, exc)
        return None
    finally:
        source.close()


def save_index(db: sqlite3.Connection, results: Path, version: str, at: Restored) -> None:
    """Keep a copy of *db*, the index of *results* read up to *at*; quietly nothing if it cannot be written."""
    copy = _copy_path(results)
    part = copy.with_name(f"{copy.stem}.{os.getpid()}.part")
    try:
        copy.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        target = sqlite3.connect(part)
        try:
            db.backup(target)
            rows = {"offset": at.offset, "lines": at.lines, "paid_usd": at.paid_usd,
                    "fingerprint": _fingerprint(results, at.offset, version)}  # fmt: skip
            target.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value)")
            target.executemany("INSERT INTO meta VALUES (?, ?)", rows.items())
            target.commit()
        finally:
            target.close()
        os.replace(part, copy)
    except (OSError, sqlite3.Error) as exc:
        logger.debug("no copy of the index of %s kept: %s", results, exc)
        part.unlink(missing_ok=True)


def prune_superseded(db: sqlite3.Connection, results: Path) -> None:
    """Forget what the records before the folder's last count replaced (the ``superseded`` rows of lines before
    ``state.results`` in its summary.json): ``status`` asks only what changed after that point. Without it the
    index, and its copy, would grow by a row for every record each night replaces. Nothing is forgotten while
    the folder has no such summary."""
    try:
        with (results.parent / SUMMARY_FILE).open("rb") as f:
            size = json.load(f)["state"]["results"][0]
    except (OSError, ValueError, LookupError, TypeError):
        return
    if isinstance(size, int):
        db.execute("DELETE FROM superseded WHERE at < ?", (size,))
