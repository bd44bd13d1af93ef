"""Files in the output folder, written so that a crash leaves either the old file or the whole new one: atomic
writes, images put in place without replacing what appeared meanwhile, moves, durable renames, and the clean-up of
the temporary files a killed run left behind."""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from ..names import LOCK_FILE, RESERVED_PREFIX

if TYPE_CHECKING:
    from ..api.gemini import Image

__all__ = [
    "Owned",
    "Stamp",
    "atomic_write",
    "fsync_dir",
    "is_ours",
    "move_file",
    "remove_stale_temp_files",
    "stamp_of",
    "unchanged",
    "write_image",
]

logger = logging.getLogger("nanobatch")

# A file as nanobatch left it: its size and modification time (ns). A rename or a link keeps both, so an image
# keeps its stamp when it takes its name or moves to another; a file put there by someone else, or edited in
# place, has another. Records and the journal's claims carry the stamps of the files they name.
Stamp = tuple[int, int]
# Files a record (or a claim in the journal) of an item says nanobatch wrote for it, with the stamps it left them with.
Owned = Mapping[str, "Stamp | None"]

# Temporary file names: unique within the process (the pid makes them unique across processes), and in
# nanobatch's reserved namespace, so that cleaning up after a killed run never takes a file of the user's.
_temp_names = itertools.count()
_TEMP_NAME = re.compile(re.escape(RESERVED_PREFIX) + r"-[A-Za-z0-9_-]+\.tmp")


def atomic_write(path: str | os.PathLike[str], data: bytes, *, replace: bool = True, mode: int | None = None) -> None:
    """Write *data* to *path* so that readers see the old file or the whole new one, never a part.

    Five system calls (open, write, fsync, close, rename), the fewest that keep that promise: the
    writer thread gives the GIL up at each one, and while the event loop is busy, taking it back
    is what an image's write mostly costs. Paths are strings (os.path, not pathlib, which interns
    every name it parses: on CPython 3.12 interned strings are immortal, so each name would stay for good).
    Without *replace*, anything at *path* when the write ends stays there (FileExistsError), even what
    appeared while *data* was being written: a link and an unlink instead of the rename (:func:`_name_new_file`).
    *mode* sets the permissions (default: as a plain open makes them) before the file takes its name.
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
            if mode is not None:
                os.fchmod(fd, mode)
            os.fsync(fd)
        finally:
            os.close(fd)
        if replace:
            os.replace(tmp, path)
        else:
            _name_new_file(tmp, os.fspath(path))
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


# link() errors that mean "this file system has no hard links" (FAT, exFAT, some network shares).
_NO_HARD_LINKS = frozenset({errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS})


def _name_new_file(tmp: str, path: str) -> None:
    """Give the written *tmp* the name *path* unless something is there: a hard link fails where a rename
    would replace (then *tmp* is removed). Without hard links, a last look just before the rename."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), path) from None
    except OSError as exc:
        if exc.errno not in _NO_HARD_LINKS:
            raise
        if os.path.lexists(path):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), path) from None
        os.replace(tmp, path)
        return
    os.unlink(tmp)


def write_image(path: str, image: Image, *, replace: bool) -> None:
    """An image into the output folder, atomically: readers (and a crash) see no part of one; one a worker process
    wrote (``image.spooled``) is renamed into place. Without *replace*, a file that appeared at *path* while the
    image was written stays, and this raises FileExistsError."""
    if image.spooled is None:
        atomic_write(path, image.content, replace=replace)
    else:
        move_file(image.spooled.path, path, replace=replace)
        image.spooled.taken()


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
    folder's own tree (symbolic links are not followed): nothing of the user's, whatever its name. A folder inside
    it with a lock file of its own is another output folder, whose own runs (perhaps one writing now) clean it.
    """
    removed = 0
    for folder, subfolders, names in os.walk(out_dir):
        subfolders[:] = [s for s in subfolders if not os.path.lexists(os.path.join(folder, s, LOCK_FILE))]
        for name in names:
            path = os.path.join(folder, name)
            if _TEMP_NAME.fullmatch(name) and os.path.isfile(path) and not os.path.islink(path):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                removed += 1
    if removed:
        logger.info("removed %d half-written temporary files left by an interrupted run", removed)
    return removed


def move_file(src: str, dst: str, *, replace: bool = True) -> None:
    """Rename *src* to *dst*, making *dst*'s folder; copied where a rename cannot go (another disk). Without
    *replace*, a file at *dst* stays and this raises FileExistsError (a link and an unlink, as new images)."""
    os.makedirs(os.path.dirname(dst) or ".", exist_ok=True)
    try:
        if replace:
            os.replace(src, dst)
        else:
            _name_new_file(src, dst)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        with open(src, "rb") as f:
            atomic_write(dst, f.read(), replace=replace)
        os.unlink(src)


def stamp_of(path: str) -> Stamp | None:
    """The :data:`Stamp` of the file at *path* (not followed if a link); None if nothing is there."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return st.st_size, st.st_mtime_ns


def is_ours(owned: Owned, name: str, path: str) -> bool:
    """Whether the file *name* (at *path*) is one nanobatch wrote for the item that *owned* belongs to, as it left
    it: the one rule for replacing, moving over, moving away or deleting a file of the output folder."""
    return name in owned and unchanged(path, owned[name])


def unchanged(path: str, stamp: Stamp | None) -> bool:
    """Whether what is at *path* is still the file nanobatch left there with *stamp* (or nothing is there).
    A stamp of None, a file named by a record from before records kept stamps, is taken on its name alone."""
    return stamp is None or stamp_of(path) in (None, stamp)
