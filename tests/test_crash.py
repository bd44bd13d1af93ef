"""Crash safety with real processes: SIGKILL a run at several points, run again, check nothing is lost or paid twice.

The API is the built-in simulator on loopback (with latency, so kills land while requests are in flight);
each run is a real `python -m nanobatch run` subprocess.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image as PILImage

from nanobatch.simulator import SimulatorConfig, run_in_thread

from .fakes import write_job

ITEMS = 40


@pytest.fixture(scope="module")
def api() -> Iterator[str]:
    with run_in_thread(SimulatorConfig(latency="uniform", latency_s=0.25, latency_spread=0.15, seed=7)) as url:
        yield url


def start_run(job: Path, out: Path, api: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "NANOBATCH_API_KEY": "sim-key"}
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "nanobatch",
            "run",
            str(job),
            "--base-url",
            api,
            "--out",
            str(out),
            "--concurrency",
            "4",
            "--quiet",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def lines(path: Path) -> list[str]:
    try:  # (not exists() then read: a run starting deletes an empty journal, and makes it again as it sends)
        return path.read_text().splitlines()
    except FileNotFoundError:
        return []


def wait_until(condition, limit_s: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + limit_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("the run never reached the kill point")
        time.sleep(0.005)


def dispatched(journal: Path, *, besides: set[str] = frozenset()) -> list[dict[str, str]]:  # type: ignore[assignment]
    """Whole journal lines of runs other than *besides* (a line torn by the kill is left out)."""
    entries = [json.loads(line) for line in lines(journal) if line.endswith("}")]
    return [e for e in entries if e["run"] not in besides]


def ok_ids(out: Path) -> set[str]:
    return {json.loads(line)["id"] for line in lines(out / "results.jsonl") if json.loads(line)["status"] == "ok"}


def test_sigkill_at_any_moment_then_rerun_ends_with_every_item_ok_exactly_once(tmp_path: Path, api: str) -> None:
    job = write_job(
        tmp_path,
        [{"id": f"sku-{n:03d}", "image": f"images/p{n % 3}.png", "instruction": f"edit {n}"} for n in range(ITEMS)],
    )
    out = tmp_path / "out"
    # Kill points: as the first request leaves, after some results, with many requests in flight, mid-run.
    kill_points = [("journal", 1), ("results", 3), ("journal", 10), ("results", 6)]
    resent: list[str] = []
    for source, count in kill_points:
        done_before = ok_ids(out)
        results_before = len(lines(out / "results.jsonl"))
        journal = out / "journal.jsonl"
        old_runs = {e["run"] for e in dispatched(journal)}
        proc = start_run(job, out, api)
        if source == "journal":
            wait_until(lambda: len(dispatched(journal, besides=old_runs)) >= count or proc.poll() is not None)  # noqa: B023 - called at once
        else:
            wait_until(lambda: len(lines(out / "results.jsonl")) >= results_before + count or proc.poll() is not None)  # noqa: B023 - called at once
        proc.send_signal(signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL  # killed mid-run, not finished
        sent = {e["id"] for e in dispatched(journal, besides=old_runs)}
        assert sent
        resent += sorted(sent & done_before)

    proc = start_run(job, out, api)
    assert proc.wait(timeout=60) == 0
    assert resent == []  # no item with an ok record was ever sent again

    records = [json.loads(line) for line in lines(out / "results.jsonl")]  # every line parses
    ok = Counter(r["id"] for r in records if r["status"] == "ok")
    assert sorted(ok) == [f"sku-{n:03d}" for n in range(ITEMS)] and set(ok.values()) == {1}
    for name in ok:
        with PILImage.open(out / f"{name}.png") as image:
            image.verify()  # whole, valid images
    assert not list(out.glob(".*.tmp"))

    status = subprocess.run(
        [sys.executable, "-m", "nanobatch", "status", str(out), "--json"], capture_output=True, text=True, check=True
    )
    assert json.loads(status.stdout)["counts"]["ok"] == ITEMS


def test_status_after_a_crash_counts_requests_that_may_have_been_charged(tmp_path: Path, api: str) -> None:
    job = write_job(tmp_path, [{"id": f"sku-{n:03d}", "instruction": f"edit {n}"} for n in range(ITEMS)])
    out = tmp_path / "out"
    proc = start_run(job, out, api)
    wait_until(lambda: len(lines(out / "journal.jsonl")) >= 4 or proc.poll() is not None)  # noqa: B023 - called at once
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    status = subprocess.run(
        [sys.executable, "-m", "nanobatch", "status", str(out), "--json"], capture_output=True, text=True, check=True
    )
    info = json.loads(status.stdout)
    finished = len(lines(out / "results.jsonl"))
    sent = len({json.loads(line)["id"] for line in lines(out / "journal.jsonl") if line.endswith("}")})
    assert info["possibly_charged"] == sent - finished > 0


def test_a_simulated_run_with_huge_instructions_answers_them_and_sigterm(tmp_path: Path) -> None:
    # The in-process simulator shares the client's interpreter: quadratic keyword matching of a 900 KB
    # instruction held the GIL for minutes, so nothing was answered and the client could not take SIGTERM.
    # (The limits are hang guards, not timing assertions: a healthy run answers within a second.)
    job = write_job(tmp_path, [{"id": f"i{n:02d}", "instruction": "white " * 150_000 + str(n)} for n in range(6)])
    out = tmp_path / "out"
    command = [sys.executable, "-m", "nanobatch", "run", str(job), "--simulate", "--out", str(out), "--quiet"]
    proc = subprocess.Popen(
        [*command, "--concurrency", "1", "--grace", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        wait_until(lambda: bool(lines(out / "results.jsonl")) or proc.poll() is not None, limit_s=60)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) in (0, 130)
        assert lines(out / "results.jsonl")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_status_after_a_sigkill_says_the_run_ended_without_a_summary_not_how_the_one_before_ended(
    tmp_path: Path, api: str
) -> None:
    job = write_job(tmp_path, [{"id": f"sku-{n:03d}", "instruction": f"edit {n}"} for n in range(ITEMS)])
    out = tmp_path / "out"
    for signum in (signal.SIGINT, signal.SIGKILL):
        sent = len(lines(out / "journal.jsonl"))
        proc = start_run(job, out, api)
        wait_until(lambda: len(lines(out / "journal.jsonl")) > sent + 2 or proc.poll() is not None)  # noqa: B023 - called at once
        proc.send_signal(signum)
        assert proc.wait(timeout=60) == (130 if signum == signal.SIGINT else -signal.SIGKILL)
        status = subprocess.run([sys.executable, "-m", "nanobatch", "status", str(out), "--json"],
                                capture_output=True, text=True, check=True)  # fmt: skip
        last = json.loads(status.stdout)["last_run"]
        if signum == signal.SIGINT:
            assert (last["outcome"], last["reason"]) == ("interrupted", "interrupted by SIGINT")
    assert (last["outcome"], last["reason"]) == ("crashed", "ended without a summary: killed or crashed")
    shown = subprocess.run([sys.executable, "-m", "nanobatch", "status", str(out)], capture_output=True, text=True)
    assert "last run: crashed, started " in shown.stdout and "SIGINT" not in shown.stdout
