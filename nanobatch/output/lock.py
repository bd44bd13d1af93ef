"""One run per output folder: an advisory ``flock`` on ``OUT_DIR/.nanobatch.lock``.

The kernel drops the lock when its process dies, however it dies, so a lock
left by a killed run is never stale: the next run simply gets it. The file
holds the holder's pid, host and start time, for the message a second run
prints. (filelock does the locking part too, but cannot tell who holds it.)
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import math
import os
import socket
import time
from pathlib import Path
from types import TracebackType

import anyio

from ..errors import ConfigError, LockHeld, TimeLimitReached
from ..names import LOCK_FILE
from .own import check_own_files, open_own

__all__ = ["RunLock", "current_holder"]


logger = logging.getLogger("nanobatch")

_NO_LOCK = frozenset({errno.ENOENT, errno.ELOOP, errno.EMLINK, errno.EINVAL})


class RunLock:
    """``async with RunLock(out_dir):`` holds the folder for this process, or raises :class:`LockHeld`."""

    def __init__(self, out_dir: Path, *, wait: bool = False, poll_s: float = 0.5, deadline: float = math.inf) -> None:
        self.path = out_dir / LOCK_FILE
        self.wait = wait
        self.poll_s = poll_s
        self.deadline = deadline  # (anyio's clock) a wait that reaches it ends the run: its time limit came
        self.waited = False  # whether another run held it first
        self._fd: int | None = None

    async def __aenter__(self) -> RunLock:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = open_own(self.path, os.O_RDWR | os.O_CREAT)
        except OSError as exc:  # not ours to write: a usage problem, before anything is sent
            raise ConfigError(
                f"cannot use the output folder {self.path.parent}: {self.path.name}: {exc.strerror or exc}"
            ) from None
        try:
            told = False
            while not self._try(fd):
                if not self.wait:
                    raise LockHeld(
                        f"another nanobatch run holds {self.path.parent} ({self.holder(fd)}); "
                        "wait for it to finish, or pass --wait-lock to queue behind it"
                    )
                if not told:  # once: a cron log must not fill up with one line per poll
                    told = self.waited = True
                    logger.warning(
                        "another nanobatch run holds %s (%s); waiting for it to finish (--wait-lock)",
                        self.path.parent,
                        self.holder(fd),
                    )
                if (left := self.deadline - anyio.current_time()) <= 0:
                    raise TimeLimitReached(
                        f"the time limit came while another run held {self.path.parent} ({self.holder(fd)}): "
                        "nothing was sent"
                    )
                await anyio.sleep(min(self.poll_s, left))
            # Held: no run of nanobatch's is writing it. Another program's file under this name is not emptied.
            check_own_files(self.path.parent, (LOCK_FILE,))
        except BaseException:
            os.close(fd)  # closing drops the lock too
            raise
        os.ftruncate(fd, 0)
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self._fd = fd
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    @staticmethod
    def _try(fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    @staticmethod
    def holder(fd: int) -> str:
        try:
            info = json.loads(os.pread(fd, 4096, 0) or b"{}")
            return f"pid {info['pid']} on {info['host']} since {info['since']}"
        except (ValueError, KeyError, OSError):
            return "holder unknown"


def current_holder(out_dir: Path) -> str | None:
    """Who holds *out_dir*'s lock right now (``"pid 12 on host since ..."``), or None if no run does."""
    try:
        fd = open_own(out_dir / LOCK_FILE, os.O_RDONLY)
    except OSError as exc:
        if exc.errno in _NO_LOCK:  # none, or a link or a FIFO there, which no run would lock
            return None
        raise
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return RunLock.holder(fd)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
