"""What an operator sees while a run goes."""

from __future__ import annotations

import io
import logging
from collections import Counter

import anyio
import pytest
from rich.console import Console

from nanobatch.cli.progress import LiveProgress, PlainProgress, describe
from nanobatch.run.stats import RunStats

from .conftest import run_virtual


def busy_stats() -> RunStats:
    return RunStats(
        total=100,
        ok=40,
        failed=2,
        blocked=1,
        skipped=7,
        requests=55,
        in_flight=8,
        concurrency=16,
        rpm_limit=120,
        retries=Counter({"overloaded": 3}),
        tokens=Counter({"totalTokenCount": 123456}),
        cost_usd=4.5,
    )


def test_the_line_shows_outcomes_traffic_and_spend() -> None:
    line = describe(busy_stats(), rate=118.0)
    for part in (
        "ok 40",
        "failed 2",
        "blocked 1",
        "skipped 7",
        "in flight 8/16",
        "118 req/min (limit 120)",
        "retries 3",
        "123,456 tokens",
        "$4.50",
    ):
        assert part in line


def test_plain_progress_logs_a_line_every_interval(caplog: pytest.LogCaptureFixture) -> None:
    stats = busy_stats()

    async def watch() -> None:
        with anyio.move_on_after(95):
            await PlainProgress(30).run(stats)

    with caplog.at_level(logging.INFO, logger="nanobatch.progress"):
        run_virtual(watch)
    lines = [r.getMessage() for r in caplog.records if r.name == "nanobatch.progress"]
    assert len(lines) == 3 and all("50/100 done" in line for line in lines)


def test_live_progress_draws_a_bar_with_the_counts() -> None:
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=True, width=200, color_system=None)
    stats = busy_stats()

    async def watch() -> None:
        with anyio.move_on_after(0.2):
            await LiveProgress(console).run(stats)

    anyio.run(watch)
    screen = buffer.getvalue()
    assert "50/100" in screen and "ok 40" in screen and "$4.50" in screen


def test_the_line_shows_open_batch_jobs_with_their_states_and_counts() -> None:
    stats = RunStats(total=3000)
    assert "batch" not in describe(stats, 0.0)
    stats.batch_jobs.update({"r-0": ("running", 250, 1000), "r-1": ("running", 50, 1000), "r-2": ("pending", 0, 1000)})
    assert describe(stats, 0.0).endswith("│ batch jobs: 2 running, 1 pending (300/3000 answered)")


@pytest.mark.parametrize(
    ("answered_at", "expected"),
    [
        # 8 requests out at once and no answer for minutes (flex): no rate yet, then the requests of the last minute
        pytest.param(45, ["req/min: starting", "16 req/min", "8 req/min"], id="slow-answers"),
        # answered at once, then nothing sent: the first line still counts the requests sent before it
        pytest.param(0, ["8 req/min", "16 req/min", "8 req/min"], id="quick-answers"),
    ],
)
def test_the_rate_counts_the_requests_sent_in_the_last_minute(
    caplog: pytest.LogCaptureFixture, answered_at: float, expected: list[str]
) -> None:
    stats = RunStats(total=100)

    async def run() -> None:
        async def traffic() -> None:
            stats.requests = stats.in_flight = 8  # the first requests go out as the run starts
            await anyio.sleep(answered_at)
            stats.in_flight = 0
            await anyio.sleep(50 - answered_at)
            stats.requests = 16  # eight more at 50 s, answered at once

        async with anyio.create_task_group() as tg:
            tg.start_soon(traffic)
            with anyio.move_on_after(95):
                await PlainProgress(30).run(stats)

    with caplog.at_level(logging.INFO, logger="nanobatch.progress"):
        run_virtual(run)
    lines = [r.getMessage() for r in caplog.records if r.name == "nanobatch.progress"]
    assert [next(part for part in line.split(" · ") if "req/min" in part) for line in lines] == expected
