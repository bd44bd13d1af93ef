"""An answer's image in a temporary file a worker process wrote (:mod:`nanobatch.api.decoding`), for the run's
writer to rename into place: the image's bytes never come back into the run's process.

The worker writes the file under a name of nanobatch's own (``.nanobatch-<pid>-<n>-<k>.tmp``, the run's process's
pid and count: ``O_EXCL``, never another's file), in the output folder itself so that the rename is one system
call, and fsyncs it there. The run's process owns the file from then on (:class:`Spooled`): the writer renames it
into place (:meth:`Spooled.taken`); one that is never taken (an answer refused, a run cut short) is deleted when its
image is let go, or when the process ends. A file left by a killed run is removed by the next run
(``files.remove_stale_temp_files``), as any half-written temporary file.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import weakref

from ..names import RESERVED_PREFIX

__all__ = ["Spooled", "drop_spooled", "spool_name", "write_spooled"]

_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
# One count for the whole process: a run has several decoders (the online client's, the batch client's) spooling
# into the same folder, and no two answers may share a name.
_ANSWERS = itertools.count()


def spool_name(folder: str) -> str:
    """The prefix, new in this process, of the temporary files of one answer's images: ``<prefix>-<k>.tmp`` for
    its k-th image."""
    return os.path.join(folder, f"{RESERVED_PREFIX}-{os.getpid()}-{next(_ANSWERS)}")


def write_spooled(prefix: str, k: int, data: bytes) -> str:
    """In a worker: *data* into the new file ``<prefix>-<k>.tmp``, fsync'ed; its path. Raises OSError (and leaves
    no file) if it cannot be written."""
    path = f"{prefix}-{k}.tmp"
    fd = os.open(path, _FLAGS, 0o666)  # the umask applies, as to any image the writer writes
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    return path


def drop_spooled(prefix: str) -> None:
    """Delete what a worker wrote for an answer whose outcome never came back (the worker died, or the wait for
    it was cancelled): its files are numbered from 0, one after another."""
    k = 0
    while True:
        try:
            os.unlink(f"{prefix}-{k}.tmp")
        except OSError:  # the last one, or the folder cannot be written: the next run's clean-up removes the rest
            return
        k += 1


class Spooled:
    """A temporary file holding an answer's image (*size* bytes, *problem*: why it cannot be decoded, found by
    the worker with ``pictures.answer_problem``, or None). Deleted once let go, unless :meth:`taken`."""

    __slots__ = ("__weakref__", "_delete", "path", "problem", "size")

    def __init__(self, path: str, size: int, problem: str | None) -> None:
        self.path = path
        self.size = size
        self.problem = problem
        self._delete = weakref.finalize(self, _unlink, path)  # also when the process ends

    def read(self) -> bytes:
        """The image's bytes (a multi-step item's next input, an upload, the checks without workers)."""
        with open(self.path, "rb") as f:
            return f.read()

    def taken(self) -> None:
        """The file was renamed into place: it is an output now, never to be deleted here."""
        self._delete.detach()

    def __repr__(self) -> str:
        return f"Spooled({self.path!r}, {self.size})"


def _unlink(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)
