"""Local pictures checked as validate meets them (:class:`PictureCheck`), and looked at ahead of it on another
core (:func:`looked_ahead`): a catalog's stats and headers are read by a second process a few thousand items
before they are needed, while this one resolves items. What it finds stands for a look here: its verdicts are
of the pictures as they were a moment before (a run checks each picture again before it sends it); a picture it
was not given is looked at here, as without it."""

from __future__ import annotations

import collections
import concurrent.futures
import itertools
import logging
import multiprocessing
import os
import signal
import stat
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple, TypeVar

from ..children import die_with
from ..pictures import file_problem

__all__ = ["PictureCheck", "looked_ahead"]

logger = logging.getLogger("nanobatch")

T = TypeVar("T")


class Looked(NamedTuple):
    """A picture as the other process found it: its stat (the part asked of it; of the file a symbolic link
    leads to), and, if it read the picture (*read*), why it cannot be decoded; *link*: whether the path itself
    is a symbolic link."""

    st_mode: int
    st_size: int
    st_dev: int
    st_ino: int
    st_mtime_ns: int
    st_ctime_ns: int
    read: bool
    problem: str | None
    link: bool


Stat = os.stat_result | Looked  # a picture's stat: taken here, or by the other process


START_AFTER = 2048  # items resolved before the other process is started: a small job never starts it
_CHUNK = 512  # items whose pictures the other process looks at in one go
_DEPTH = 4  # chunks handed to it ahead of the one being resolved


def read_problem(path: str) -> str | None:
    """Why the picture at *path* cannot be decoded, or None; reading it failed is a problem of its own."""
    try:
        return file_problem(path)
    except OSError as exc:
        return f"cannot be read: {exc.strerror or exc}"


class PictureCheck:
    """Reads a local picture and says why it cannot be decoded; a picture many items share (by its path, or hard
    links to one file) is read once while its size and times stay the same. With *read* False it reads none:
    it only stats them (and tells which are symbolic links), for a check that does not decode."""

    def __init__(self, remember: int = 256, *, read: bool = True) -> None:
        self.read = read  # False: the pictures are only stat-ed (a run's check), none is read
        self._seen: OrderedDict[tuple[int, ...], str | None] = OrderedDict()
        self._remember = remember
        self._links: dict[str, bool] = {}  # whether each path just stat-ed is a symbolic link, until asked
        self._trusted: Mapping[str, tuple[int, int, str]] = {}
        self.unchanged: set[str] = set()  # the trusted pictures found as stamped since trust(): not read
        self.ahead: dict[str, Looked] = {}  # pictures looked at by looked_ahead(), by path

    def trust(self, stamps: Mapping[str, tuple[int, int, str]]) -> None:
        """Pictures with these (size, mtime) stamps decode (they were sent and answered): not read while unchanged."""
        self._trusted = stamps
        if self.unchanged:
            self.unchanged = set()

    def stat(self, path: str) -> Stat:
        """The stat of *path*: as looked at ahead, if it was (OSError, ValueError as :func:`os.stat` raises).
        Taken here, its lstat also tells :meth:`is_link` (for all but links it is the stat: one system call)."""
        if (looked := self.ahead.get(path)) is not None:
            return looked
        st, link = _stat(path)
        if len(self._links) >= 64:  # an item's few pictures; more were never asked about
            self._links.clear()
        self._links[path] = link
        return st

    def is_link(self, path: str) -> bool:
        """Whether *path* is a symbolic link: as looked at ahead or stat-ed just before, if it was
        (:func:`os.path.islink`)."""
        if (looked := self.ahead.get(path)) is not None:
            return looked.link
        link = self._links.pop(path, None)
        return os.path.islink(path) if link is None else link

    def __call__(self, path: str, st: Stat) -> str | None:
        """Why the picture at *path* (*st*: its stat, just taken) cannot be decoded, or None (always, unless
        *read*)."""
        if not self.read:
            return None
        if (stamp := self._trusted.get(path)) is not None and (st.st_size, st.st_mtime_ns) == stamp[:2]:
            self.unchanged.add(path)
            return None
        if isinstance(st, Looked) and st.read:
            return st.problem  # read by the other process (once for the pictures linked to it)
        key = _key(st)
        if key in self._seen:
            self._seen.move_to_end(key)
            return self._seen[key]
        message = self._seen[key] = read_problem(path)
        if len(self._seen) > self._remember:
            self._seen.popitem(last=False)
        return message


def _stat(path: str) -> tuple[os.stat_result, bool]:
    """The stat of *path* (of the file a symbolic link leads to), and whether it is a link: for all but links the
    lstat is the stat, one system call. Raises OSError, and ValueError (a NUL), as :func:`os.stat` does."""
    st = os.lstat(path)
    link = stat.S_ISLNK(st.st_mode)
    return (os.stat(path) if link else st), link


def _key(st: Stat) -> tuple[int, ...]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def look_at(paths: list[str], read: bool = True) -> list[tuple[Any, ...] | None]:
    """In the other process: for each of *paths* that is a regular file, its :class:`Looked` fields (a plain
    tuple: the cheapest to send back), the picture read only if *read*. Paths that cannot be stat-ed, and other
    kinds of file, are left for the check that needs them to say why."""
    found: list[tuple[Any, ...] | None] = []
    seen: dict[tuple[int, ...], str | None] = {}
    for path in paths:
        try:
            st, link = _stat(path)
        except (OSError, ValueError):
            found.append(None)
            continue
        if not stat.S_ISREG(st.st_mode):
            found.append(None)
            continue
        key = _key(st)
        if read and key not in seen:
            seen[key] = read_problem(path)
        found.append(
            (st.st_mode, st.st_size, st.st_dev, st.st_ino, st.st_mtime_ns, st.st_ctime_ns, read, seen.get(key), link)
        )
    return found


def _settle(parent: int) -> None:
    """In the other process, first: die with this one (a killed validate leaves nothing behind holding its
    output open), and leave Ctrl-C to it (it stops the look-ahead itself)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    die_with(parent)


def looked_ahead(
    things: Iterator[T], paths_of: Callable[[T], list[str]], pictures: PictureCheck, *, read: bool = True
) -> Iterator[T]:
    """*things*, in order, their pictures (*paths_of* each: the local files it names, as far as cheaply known)
    stat-ed and (if *read*) read ahead by another process into *pictures*, once :data:`START_AFTER` have gone
    by without it, if this process can be forked (:func:`can_fork`) onto a second CPU. Each chunk's answer is
    waited for: the verdicts are of the pictures as that process found them, a few thousand items earlier."""
    things = iter(things)
    yield from itertools.islice(things, START_AFTER)
    if not can_fork() or not (chunk := _next_chunk(things)):
        yield from things
        return
    context = multiprocessing.get_context("fork")
    pool = concurrent.futures.ProcessPoolExecutor(1, mp_context=context, initializer=_settle, initargs=(os.getpid(),))
    with pool:
        queued: collections.deque[tuple[list[T], list[str], concurrent.futures.Future[Any]]] = collections.deque()
        try:
            while True:
                while chunk and len(queued) < _DEPTH:
                    paths = [p for thing in chunk for p in paths_of(thing)]
                    queued.append((chunk, paths, pool.submit(look_at, paths, read)))
                    chunk = _next_chunk(things)
                if not queued:
                    break
                ready, paths, future = queued.popleft()
                pictures.ahead = _looked(paths, future)
                yield from ready
        finally:
            pictures.ahead = {}
            pool.shutdown(wait=False, cancel_futures=True)


def can_fork() -> bool:
    """Whether the other process can be forked: on Linux with a second CPU for it, and only while this process
    has no other thread (a lock another thread holds would stay held in the fork). It is never started afresh
    ("spawn"), since that imports the program's main module again: a script that checks and then runs a job at
    its top level would run it twice."""
    if sys.platform != "linux" or threading.active_count() != 1:
        return False
    return len(os.sched_getaffinity(0)) > 1


def _next_chunk(things: Iterator[T]) -> list[T]:
    chunk = []
    for thing in things:
        chunk.append(thing)
        if len(chunk) == _CHUNK:
            break
    return chunk


def _looked(paths: list[str], future: concurrent.futures.Future[Any]) -> dict[str, Looked]:
    """What the other process found of *paths*, or nothing if it could not look (they are looked at here)."""
    try:
        found = future.result()
    except (concurrent.futures.process.BrokenProcessPool, OSError) as exc:
        logger.debug("pictures not looked at ahead: %s", exc)
        return {}
    return {path: Looked(*fields) for path, fields in zip(paths, found, strict=True) if fields is not None}
