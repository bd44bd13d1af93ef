"""Showing a run while it goes: a live rich display on a terminal, plain lines elsewhere.

Both read :class:`~nanobatch.run.engine.RunStats`, which the engine keeps current;
neither changes the run. The CLI picks one; the library never shows anything.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import TYPE_CHECKING

import anyio

from ..run.stats import RunStats

if TYPE_CHECKING:  # rich (50 ms to import) only for the live display: `run -q` and plain lines start without it
    from rich.console import Console

__all__ = ["LiveProgress", "PlainProgress", "describe"]


class _Rate:
    """Requests sent in the last minute, from samples of the request counter taken from the display's start
    (made inside the run's event loop: its clock is monotonic)."""

    def __init__(self, stats: RunStats) -> None:
        self._samples: deque[tuple[float, int]] = deque([(anyio.current_time(), stats.requests)])

    def update(self, stats: RunStats) -> float | None:
        """Requests per minute: those sent since the newest sample a minute old (or since the start, in the first
        minute), over that time or a minute if shorter (a first burst is not a pace). None while the requests sent
        have no answer yet: 8 in flight for minutes are neither "0 req/min" nor a rate."""
        now, requests = anyio.current_time(), stats.requests
        self._samples.append((now, requests))
        while len(self._samples) > 2 and now - self._samples[1][0] >= 60:
            self._samples.popleft()
        if 0 < requests <= stats.in_flight:
            return None
        first_t, first_n = self._samples[0]
        return (requests - first_n) / max(now - first_t, 60.0) * 60


def describe(stats: RunStats, rate: float | None) -> str:
    """One line: outcomes, traffic, spend; *rate* None: the first answers have not come yet."""
    limit = f" (limit {stats.rpm_limit:g})" if stats.rpm_limit else ""
    window = f"/{stats.concurrency:.0f}" if stats.concurrency else ""
    retries = sum(stats.retries.values())
    tokens = stats.tokens.get("totalTokenCount", 0)
    pace = "req/min: starting" if rate is None else f"{rate:.0f} req/min"
    rejected = f" · rejected {stats.rejected}" if stats.rejected else ""  # only a run with output checks has any
    return (
        f"ok {stats.ok} · failed {stats.failed} · blocked {stats.blocked}{rejected} · skipped {stats.skipped} │ "
        f"in flight {stats.in_flight}{window} · {pace}{limit} · retries {retries} │ "
        f"{tokens:,} tokens · ${stats.cost_usd:.2f}"
    ) + _batch_jobs(stats)


def _batch_jobs(stats: RunStats) -> str:
    """`` │ batch jobs: 2 running, 1 pending (300/3000 answered)``, or nothing without open batch jobs."""
    jobs = list(stats.batch_jobs.values())
    if not jobs:
        return ""
    states: dict[str, int] = {}
    for state, _answered, _requests in jobs:
        states[state] = states.get(state, 0) + 1
    answered, requests = sum(job[1] for job in jobs), sum(job[2] for job in jobs)
    listed = ", ".join(f"{count} {state}" for state, count in states.items())
    return f" │ batch jobs: {listed} ({answered}/{requests} answered)"


class LiveProgress:
    """A rich progress bar, redrawn twice a second; log lines print above it, never through it."""

    def __init__(self, console: Console | None = None) -> None:
        from rich.console import Console

        self.console = console or Console(stderr=True)

    def log_handler(self) -> logging.Handler:
        from rich.logging import RichHandler

        return RichHandler(console=self.console, show_path=False, show_time=False, markup=False)

    async def run(self, stats: RunStats) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            SpinnerColumn,
            TextColumn,
            TimeRemainingColumn,
        )

        rate = _Rate(stats)
        columns = (
            SpinnerColumn(),
            MofNCompleteColumn(),
            BarColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.description}"),
        )
        with Progress(*columns, console=self.console, transient=False) as progress:
            task = progress.add_task("starting", total=stats.total or None)
            try:
                while True:
                    line = describe(stats, rate.update(stats))
                    progress.update(task, completed=stats.done, total=stats.total or None, description=line)
                    await anyio.sleep(0.5)
            finally:
                progress.update(task, completed=stats.done, description=describe(stats, rate.update(stats)))


class PlainProgress:
    """A plain line every *interval_s* seconds, for logs and cron mail (no animation, no colour)."""

    def __init__(self, interval_s: float, logger: logging.Logger | None = None) -> None:
        self.interval_s = interval_s
        self.logger = logger or logging.getLogger("nanobatch.progress")

    async def run(self, stats: RunStats) -> None:
        rate = _Rate(stats)  # from now: the requests sent before the first line count
        while True:
            await anyio.sleep(self.interval_s)
            line = describe(stats, rate.update(stats))
            self.logger.info("progress: %d/%d done │ %s", stats.done, stats.total, line)
