"""SIGINT / SIGTERM: nothing new is sent, requests in flight get a grace period, finished work is kept."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import anyio
import httpx2
import pytest

import nanobatch

from .conftest import run_virtual
from .fakes import ok_body, write_job

LATENCY_S = 10.0


async def slow_api(request: httpx2.Request) -> httpx2.Response:
    await anyio.sleep(LATENCY_S)
    return httpx2.Response(200, json=ok_body())


def run_and_signal(job: Path, signals: list[tuple[float, int]], grace_s: float) -> nanobatch.RunSummary:
    """Run the job with 4 workers on the virtual clock, sending ourselves *signals* at the given times."""
    settings = nanobatch.load_settings(overrides={"limits.concurrency": 4, "limits.grace_s": grace_s})

    async def go() -> nanobatch.RunSummary:
        async with anyio.create_task_group() as tg:

            async def send_signals() -> None:
                start = anyio.current_time()
                for at, signum in signals:
                    await anyio.sleep(start + at - anyio.current_time())
                    os.kill(os.getpid(), signum)

            tg.start_soon(send_signals)
            summary = await nanobatch.run_job(
                job,
                settings=settings,
                transport=httpx2.MockTransport(slow_api),
                out_dir=job.parent / "out",
                handle_signals=True,
            )
            tg.cancel_scope.cancel()
        return summary

    return run_virtual(go, settle_s=0.2)


def ids(out: Path) -> list[str]:
    return [json.loads(line)["id"] for line in (out / "results.jsonl").read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_first_signal_lets_requests_in_flight_finish(tmp_path: Path, signum: int) -> None:
    job = write_job(tmp_path, [{"id": f"i{n:02d}", "instruction": f"edit {n}"} for n in range(20)])
    summary = run_and_signal(job, [(15.0, signum)], grace_s=30)
    out = tmp_path / "out"
    # 4 finished at t=10; the 4 in flight at t=15 finished at t=20 within the grace; nothing else was sent.
    assert summary.exit_code == 130 and summary.outcome == "interrupted"
    assert len(ids(out)) == 8 and summary.stats.requests == 8
    assert all((out / f"{i}.png").is_file() for i in ids(out))
    # The next run does the other 12 and only those.
    rerun = run_virtual(lambda: nanobatch.run_job(job, transport=httpx2.MockTransport(slow_api), out_dir=out))
    assert rerun.stats.ok == 12 and rerun.stats.skipped == 8


def test_grace_period_ends_by_cancelling_what_is_still_in_flight(tmp_path: Path) -> None:
    job = write_job(tmp_path, [{"id": f"i{n:02d}", "instruction": f"edit {n}"} for n in range(20)])
    summary = run_and_signal(job, [(15.0, signal.SIGTERM)], grace_s=2)
    # The 4 requests in flight at t=15 would end at t=20, after the 2 s grace: they are cancelled, not recorded.
    assert summary.exit_code == 130
    assert len(ids(tmp_path / "out")) == 4


def test_second_signal_cancels_at_once_but_keeps_what_finished(tmp_path: Path) -> None:
    job = write_job(tmp_path, [{"id": f"i{n:02d}", "instruction": f"edit {n}"} for n in range(20)])
    summary = run_and_signal(job, [(15.0, signal.SIGINT), (16.0, signal.SIGINT)], grace_s=30)
    out = tmp_path / "out"
    assert summary.exit_code == 130
    assert len(ids(out)) == 4 and summary.stats.ok == 4
    assert json.loads((out / "summary.json").read_text())["last_run"]["outcome"] == "interrupted"


def run_for(job: Path, max_duration_s: float, grace_s: float) -> nanobatch.RunSummary:
    settings = nanobatch.load_settings(
        overrides={"limits.concurrency": 4, "limits.max_duration_s": max_duration_s, "limits.grace_s": grace_s}
    )
    return run_virtual(
        lambda: nanobatch.run_job(
            job, settings=settings, transport=httpx2.MockTransport(slow_api), out_dir=job.parent / "out"
        ),
        settle_s=0.2,
    )


def test_a_time_limit_stops_sending_and_lets_requests_in_flight_finish(tmp_path: Path) -> None:
    job = write_job(tmp_path, [{"id": f"i{n:02d}", "instruction": f"edit {n}"} for n in range(20)])
    summary = run_for(job, max_duration_s=25, grace_s=30)
    out = tmp_path / "out"
    # Rounds of 4 start at t=0, 10, 20; the limit at t=25 lets the third round finish (t=30) and starts no fourth.
    assert summary.exit_code == 3 and summary.outcome == "aborted" and "time limit" in (summary.reason or "")
    assert len(ids(out)) == 12 and summary.stats.requests == 12
    last_run = json.loads((out / "summary.json").read_text())["last_run"]
    assert last_run["outcome"] == "aborted" and "limits.max_duration_s = 25" in last_run["reason"]
    # The next run does the other 8 and only those.
    rerun = run_virtual(lambda: nanobatch.run_job(job, transport=httpx2.MockTransport(slow_api), out_dir=out))
    assert rerun.stats.ok == 8 and rerun.stats.skipped == 12


def test_a_time_limit_cancels_what_is_still_in_flight_after_the_grace(tmp_path: Path) -> None:
    job = write_job(tmp_path, [{"id": f"i{n:02d}", "instruction": f"edit {n}"} for n in range(20)])
    summary = run_for(job, max_duration_s=25, grace_s=2)
    # The round sent at t=20 would end at t=30, after the grace (t=27): cancelled, not recorded, left for later.
    assert summary.exit_code == 3
    assert len(ids(tmp_path / "out")) == 8


def test_a_time_limit_that_comes_after_the_last_item_went_out_is_a_complete_run(tmp_path: Path) -> None:
    job = write_job(tmp_path, [{"id": f"i{n:02d}", "instruction": f"edit {n}"} for n in range(4)])
    summary = run_for(job, max_duration_s=5, grace_s=30)
    # All 4 went out at t=0 and were answered at t=10, within the grace: nothing is left for a next run.
    assert summary.exit_code == 0 and summary.outcome == "complete" and summary.stats.ok == 4


def test_a_signal_while_a_step_is_in_flight_lets_it_finish_sends_no_next_step_and_keeps_its_cost(
    tmp_path: Path,
) -> None:
    # Step 1 of each item is in flight at t=5 when the signal comes: it finishes (paid), step 2 is not sent. The
    # items are failed, kind "stopped", with step 1's cost on the books, and the run ends interrupted, not aborted.
    items = [{"id": f"h{n}", "image": f"images/h{n}.png", "steps": ["crop it", "make it white"]} for n in range(2)]
    summary = run_and_signal(write_job(tmp_path, items), [(5.0, signal.SIGINT)], grace_s=30)
    assert (summary.outcome, summary.exit_code) == ("interrupted", 130) and summary.stats.requests == 2
    done = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert [(r["status"], r["error"]["kind"], r["error"]["step"]) for r in done] == [("failed", "stopped", 2)] * 2
    assert all(r["cost_usd"] > 0 for r in done)
