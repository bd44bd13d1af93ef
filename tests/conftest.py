from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import anyio
import pytest

T = TypeVar("T")


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """No test sees the developer's keys, config or current folder."""
    for name in list(os.environ):
        if name.startswith("NANOBATCH_") or name in ("GEMINI_API_KEY", "GOOGLE_API_KEY"):
            monkeypatch.delenv(name)
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    yield


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """The CLI configures the "nanobatch" logger for its process; undo that after each test so caplog sees logs."""
    names = ("nanobatch", "nanobatch.progress")
    saved = {
        n: (logging.getLogger(n).handlers[:], logging.getLogger(n).propagate, logging.getLogger(n).level) for n in names
    }
    yield
    for name, (handlers, propagate, level) in saved.items():
        logger = logging.getLogger(name)
        logger.handlers[:] = handlers
        logger.propagate = propagate
        logger.setLevel(level)


def run_virtual(fn: Callable[[], Awaitable[T]], *, settle_s: float = 0.0) -> T:
    """Run *fn* on trio's virtual clock: sleeps take no real time, and time only moves when all tasks wait.

    A task waiting for a worker thread (file writes) counts as waiting; *settle_s* is how much real time
    the clock lets such threads have before it jumps, for tests where an early jump would change the outcome.
    """
    from trio.testing import MockClock

    return anyio.run(fn, backend="trio", backend_options={"clock": MockClock(autojump_threshold=settle_s)})


@pytest.fixture
def virtual() -> Callable[[Callable[[], Awaitable[Any]]], Any]:
    return run_virtual


@pytest.fixture
def before_2_5_flash_shutdown(monkeypatch: pytest.MonkeyPatch) -> None:
    """Lifecycle checks see a day when gemini-2.5-flash-image (shut down 2026-10-02) still answered."""
    import datetime

    from nanobatch import models

    monkeypatch.setattr(models, "today", lambda: datetime.date(2026, 9, 1))
