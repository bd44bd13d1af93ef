"""The processes nanobatch starts beside its own (answer decoding workers, validate's look-ahead): each dies
with the process that started it, so that a killed run or validate leaves nothing behind (Linux; elsewhere
they end when their work queue closes)."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from typing import Any

__all__ = ["die_with"]


def die_with(parent: int) -> Any:
    """In a child of *parent*, first: have the kernel kill it when *parent* dies (``PR_SET_PDEATHSIG``), and end
    it now if *parent* has died already. Returns the C library (glibc), for further settings, or None."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    libc = None
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # it died before the line above could take effect
        os._exit(0)
    return libc
