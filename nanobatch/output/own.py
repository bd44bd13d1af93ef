"""Which files under nanobatch's own names are nanobatch's, told by what they hold, and the one way nanobatch
opens such a file for writing.

nanobatch's names are common ones (``results.jsonl``, ``summary.json``, ``journal.jsonl``, ``report.html``,
``.nanobatch.lock``, the ``.nanobatch-batches`` folder): a folder may already hold someone else's file under one
of them (``output_dir: .`` in a folder with its own ``summary.json``), and a run would append to it, cut its last
line, replace it or delete it. So each counts as nanobatch's only when its first bytes say so (:data:`OWN_FILES`:
what every nanobatch version wrote there), and :func:`check_own_files` refuses a folder where one does not
(``validate`` and ``run`` before anything is sent, ``run`` again once it holds the lock, ``report`` for its page).

No file nanobatch writes there is reached through a symbolic link: a link at one of those names refuses the
folder, and :func:`open_own` opens with ``O_NOFOLLOW``, so a link put there after the check fails the open
instead of being written through (``summary.json`` and ``report.html`` are replaced by a rename, which replaces
a link itself, never its target).
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from ..errors import ConfigError
from ..names import (
    BATCH_FOLDER,
    JOURNAL_FILE,
    LEDGER_FILE,
    LOCK_FILE,
    REPORT_FILE,
    RESULTS_FILE,
    STEPS_FOLDER,
    SUMMARY_FILE,
)  # fmt: skip

__all__ = [
    "OWN_FILES",
    "OwnFile",
    "check_own_files",
    "is_own_record",
    "is_torn_record",
    "open_own",
]

# O_NOFOLLOW is POSIX (Windows has none); O_NONBLOCK: a FIFO put at the name must not hang the open.
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_LINK_ERRNOS = frozenset({errno.ELOOP, errno.EMLINK})  # what O_NOFOLLOW gives on a link (EMLINK: FreeBSD)

# Fields every results.jsonl line nanobatch ever wrote carries (ItemRecord.to_json writes them all, null or not;
# the first version's records had them too). Another tool's {"id": ..., "status": ...} lines have not.
_RECORD_MARK = ("id", "status", "attempts", "key", "started_at")
# How nanobatch's lines begin, as orjson writes them and as json.dumps did: a line torn by a crash is a prefix.
_RECORD_STARTS = (b'{"id":"', b'{"id": "')
_JOURNAL_STARTS = (b'{"event":"', b'{"event": "')
_JOURNAL_EVENTS = frozenset({"dispatched", "settled", "writing", "uploading", "restored"})
_REPORT_MARK = b'<meta name="generator" content="nanobatch">'  # in the head of every report.html version


def is_own_record(line: Any) -> bool:
    """Whether a parsed results.jsonl line is an item record nanobatch wrote (another tool's lines are not)."""
    # Spelled out, not a set comparison: this runs for every line a re-run's index loads, at a third of the cost.
    return (
        type(line) is dict and "id" in line and "status" in line and "attempts" in line and "key" in line
        and "started_at" in line
    )  # fmt: skip


def is_torn_record(tail: bytes) -> bool:
    """Whether *tail* (a last line without its newline) is the start of a record a crash cut short: not JSON, and
    begun as nanobatch begins its lines (or only NUL bytes, as a file system may leave after a power cut)."""
    return _is_torn(tail, _RECORD_STARTS) or (bool(tail) and not tail.strip(b"\x00"))


def _is_torn(line: bytes, starts: tuple[bytes, ...]) -> bool:
    line = line.strip()
    if not line or not (line.startswith(starts) or any(start.startswith(line) for start in starts)):
        return False
    try:
        orjson.loads(line)
    except orjson.JSONDecodeError:
        return True
    return False


def _first_line(head: bytes, accept: Callable[[Any], bool], starts: tuple[bytes, ...]) -> bool:
    """Whether the first line of a JSON-lines file is nanobatch's (blank: nothing in it to lose)."""
    text = head.lstrip()
    end = text.find(b"\n")
    line = text if end < 0 else text[:end]
    if not line:
        return True
    try:
        return accept(orjson.loads(line))
    except orjson.JSONDecodeError:
        return _is_torn(line, starts)  # torn by a crash (the first version ended such a line and went on)


def _json(head: bytes, accept: Callable[[Any], bool]) -> bool:
    try:
        return accept(orjson.loads(head))
    except orjson.JSONDecodeError:
        return False


def _is_journal_line(line: Any) -> bool:
    return type(line) is dict and line.get("event") in _JOURNAL_EVENTS and "run" in line and "id" in line


def _is_summary(value: Any) -> bool:
    return type(value) is dict and value.keys() >= {"job", "out_dir", "last_run"} and type(value["last_run"]) is dict


def _is_lock(value: Any) -> bool:
    return type(value) is dict and value.keys() >= {"pid", "host", "since"}


def _is_ledger_line(line: Any) -> bool:
    return type(line) is dict and "event" in line and "chunk" in line


@dataclass(frozen=True, slots=True, kw_only=True)
class OwnFile:
    """One of nanobatch's files in an output folder and how to tell nanobatch wrote it: *test* on its first
    *head* bytes (an empty file counts when *empty* says so: one appended to, with nothing in it to lose)."""

    name: str
    mark: str  # what nanobatch's holds, for the message about one that does not
    head: int
    empty: bool
    test: Callable[[bytes], bool]

    def problem(self, folder: str | os.PathLike[str]) -> str | None:
        """Why the file at this name in *folder* is not nanobatch's to write (a link, not a regular file, content
        that is not nanobatch's), or None (it is, or there is none)."""
        path = os.path.join(folder, self.name)
        try:
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                return f"{self.name} is a symbolic link (to {os.readlink(path)}): nanobatch never writes through one"
            if not stat.S_ISREG(st.st_mode):
                return f"{self.name} is not a regular file"
            if st.st_size == 0:
                return None if self.empty else f"{self.name} is empty: {self.mark}"
            fd = open_own(path, os.O_RDONLY)
            try:
                head = os.read(fd, self.head)
            finally:
                os.close(fd)
        except FileNotFoundError:
            return None
        except OSError as exc:
            return f"{self.name} cannot be read ({exc.strerror or exc})"
        return None if self.test(head) else f"{self.name} was not written by nanobatch: {self.mark}"


OWN_FILES = (
    OwnFile(
        name=RESULTS_FILE, head=65536, empty=True, test=lambda head: _first_line(head, is_own_record, _RECORD_STARTS),
        mark="nanobatch's first line is an item record with " + ", ".join(f'"{f}"' for f in _RECORD_MARK),
    ),
    OwnFile(
        name=JOURNAL_FILE, head=65536, empty=True,
        test=lambda head: _first_line(head, _is_journal_line, _JOURNAL_STARTS),
        mark='nanobatch\'s lines are {"event": "dispatched" | "settled" | "writing" | "uploading" | "restored", '
        '"run": ..., "id": ...}',
    ),
    OwnFile(
        name=SUMMARY_FILE, head=4 << 20, empty=False, test=lambda head: _json(head, _is_summary),
        mark='nanobatch\'s is a JSON object with "job", "out_dir" and "last_run"',
    ),
    OwnFile(
        name=REPORT_FILE, head=4096, empty=False, test=lambda head: _REPORT_MARK in head,
        mark=f"nanobatch's has {_REPORT_MARK.decode()} in its head",
    ),
    OwnFile(
        name=LOCK_FILE, head=4096, empty=True, test=lambda head: _json(head, _is_lock),
        mark='nanobatch\'s is empty or {"pid": ..., "host": ..., "since": ...}',
    ),
)  # fmt: skip
_BY_NAME = {own.name: own for own in OWN_FILES}
_LEDGER = OwnFile(
    name=f"{BATCH_FOLDER}/{LEDGER_FILE}", head=65536, empty=True,
    test=lambda head: _first_line(head, _is_ledger_line, _JOURNAL_STARTS),
    mark='nanobatch\'s lines are {"event": ..., "chunk": ...}',
)  # fmt: skip


def _own_folder_problem(folder: str | os.PathLike[str], name: str, holds: str) -> str | None:
    """What is wrong with nanobatch's own folder *name* in *folder* (where it keeps *holds*), if anything."""
    path = os.path.join(folder, name)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"{name} cannot be read ({exc.strerror or exc})"
    if stat.S_ISLNK(st.st_mode):
        return f"{name} is a symbolic link (to {os.readlink(path)}): nanobatch never writes through one"
    if not stat.S_ISDIR(st.st_mode):
        return f"{name} is not a folder (nanobatch keeps {holds} in it)"
    return _LEDGER.problem(folder) if name == BATCH_FOLDER else None


_OWN_FOLDERS = ((BATCH_FOLDER, "its batch jobs' files"), (STEPS_FOLDER, "the images of steps its items go on from"))


def check_own_files(folder: Path, names: tuple[str, ...] | None = None) -> None:
    """ConfigError naming each file under nanobatch's names in *folder* (*names*: those of :data:`OWN_FILES`
    to look at; all, and the batch folder, by default) that nanobatch did not write, or that is a link."""
    if names is None:
        problems = [own.problem(folder) for own in OWN_FILES] + [_own_folder_problem(folder, *f) for f in _OWN_FOLDERS]
    else:
        problems = [_BY_NAME[name].problem(folder) for name in names]
    found = [problem for problem in problems if problem is not None]
    if not found:
        return
    raise ConfigError(
        f"the output folder {folder} holds files under nanobatch's own names that are not nanobatch's to write "
        "(a run would write over them, or through them):\n  "
        + "\n  ".join(found)
        + "\nHINT: move them out of the folder (or rename them), or give the run another output folder "
        "(--out, or output_dir: in the manifest)"
    )


def open_own(path: str | os.PathLike[str], flags: int, mode: int = 0o644) -> int:
    """``os.open`` for a file of nanobatch's in the output folder, never through a symbolic link at *path* and
    never anything but a regular file: OSError rather than either (ELOOP for a link, EINVAL for a FIFO or a
    device). Every file nanobatch opens for writing there is opened through here."""
    try:
        fd = os.open(path, flags | _NOFOLLOW | _NONBLOCK | os.O_CLOEXEC, mode)
    except OSError as exc:
        if exc.errno not in _LINK_ERRNOS:
            raise
        raise OSError(exc.errno, "a symbolic link is there, and nanobatch never writes through one", path) from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file, and nanobatch writes only files of its own", path)
        if _NONBLOCK:
            os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd
