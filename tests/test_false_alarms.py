"""No false alarms (issue 24.5): a warning, a count or an exit code says no more than what happened.

"May have been charged without a saved result" is said only of a request that no batch job, journal line or
record accounts for; a run counts the requests it sent, not the answers it collects; an exit code tells how the
items ended. Real processes (SIGKILL) and the simulator over loopback HTTP, as in test_crash and test_batch_tier.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from starlette.applications import Starlette

from nanobatch.cli.main import main
from nanobatch.simulator import run_in_thread

from .fakes import sku_job, write_job
from .test_batch_nights import billed, two_step_job
from .test_batch_tier import CONFIG, MODEL, Hold, cli, sim

ITEMS = 6
CHARGED = "may have been charged"


@pytest.fixture
def job(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    return sku_job(tmp_path, monkeypatch, CONFIG, ITEMS, model=MODEL)


def nanobatch(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "NANOBATCH_API_KEY": "sim-key"}
    return subprocess.run([sys.executable, "-m", "nanobatch", *args], env=env, capture_output=True, text=True,
                          timeout=60)  # fmt: skip


def kill_when(app: Starlette, url: str, job: Path, match: Callable[[str, str], bool], *args: str) -> None:
    """``nanobatch run --tier batch`` *job* in a process, SIGKILLed once a request *match* (method, path) reaches
    the simulator (held there: the request is on the wire, unanswered)."""
    hold = Hold(app.middleware_stack or app.build_middleware_stack(), match, after=False)
    app.middleware_stack = hold  # type: ignore[assignment]
    argv = [sys.executable, "-m", "nanobatch", "run", str(job), "--base-url", url, "--out", str(job.parent / "out"),
            "--tier", "batch", "--config", str(job.parent / "nanobatch.yaml"), "--quiet", *args]  # fmt: skip
    process = subprocess.Popen(argv, env={**os.environ, "NANOBATCH_API_KEY": "sim-key"},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        assert hold.reached.wait(30), "the run never reached the kill point"
        process.send_signal(signal.SIGKILL)
        assert process.wait(10) == -signal.SIGKILL
    finally:
        hold.armed = False
        hold.release.set()


def status_json(out: Path) -> dict[str, Any]:
    shown = nanobatch("status", str(out), "--json")
    assert shown.returncode == 0, shown.stderr
    return dict(json.loads(shown.stdout))


def rerun(job: Path, url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return nanobatch("run", str(job), "--base-url", url, "--out", str(job.parent / "out"),
                     "--config", str(job.parent / "nanobatch.yaml"), *args)  # fmt: skip


# -- "may have been charged" ----------------------------------------------------------------------------


@pytest.mark.parametrize("tier", ["batch", "standard"])
def test_a_kill_while_items_wait_in_a_batch_job_is_no_charge_alarm_and_the_next_run_collects_them(
    job: Path, tier: str
) -> None:
    app = sim(batch_latency_s=0.5)
    with run_in_thread(app=app) as url:
        kill_when(app, url, job, lambda m, p: m == "GET" and p.startswith("/v1beta/batches/"))
        info = status_json(job.parent / "out")
        assert info["possibly_charged"] == 0 and info["batch_jobs"]  # the job accounts for its requests
        again = rerun(job, url, "--tier", tier)
    assert again.returncode == 0, again.stderr
    assert CHARGED not in again.stderr and "in flight" not in again.stderr
    assert billed(app) == ITEMS  # its answers were used, none paid again
    assert status_json(job.parent / "out")["possibly_charged"] == 0


def test_a_kill_with_fallback_steps_queued_for_a_slot_counts_only_the_requests_on_the_wire(job: Path) -> None:
    # Past the batch deadline every step goes online, limits.concurrency (1 here) at a time: the other five
    # wait for a slot. A kill then leaves one request that may have been charged, not six.
    app = sim(batch_latency_s=60.0)
    with run_in_thread(app=app) as url:
        generate = ":generateContent"
        kill_when(app, url, job, lambda m, p: p.endswith(generate), "--batch-deadline", "1", "--concurrency", "1")
        assert status_json(job.parent / "out")["possibly_charged"] == 1
        again = rerun(job, url)
    assert again.returncode == 0, again.stderr
    assert "1 requests sent by a run that ended without saving their results (items sku-" in again.stderr


def test_status_after_a_kill_says_which_batch_answers_are_paid_and_wait_to_be_written(
    job: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Killed once the first job's answers were downloaded (its files being deleted at the API): paid for, on
    # disk, no record yet. Status says so (neither "possibly charged" nor nothing); the next run writes them.
    app = sim(batch_latency_s=0.3)
    out = job.parent / "out"
    with run_in_thread(app=app) as url:
        kill_when(app, url, job, lambda m, p: m == "DELETE" and "/files/" in p)
        info = status_json(out)
        kept, waiting = info["batch_answers_kept"], sum(chunk["requests"] for chunk in info["batch_jobs"])
        assert kept > 0 and kept + waiting == ITEMS and (info["possibly_charged"], info["items"]) == (0, 0)
        capsys.readouterr()
        assert main(["status", str(out)]) == 0
        assert f"batch answers collected (paid) and not written yet: {kept};" in capsys.readouterr().out
        assert rerun(job, url, "--tier", "batch").returncode == 0
    assert billed(app) == ITEMS and status_json(out)["batch_answers_kept"] == 0


def test_status_counts_each_request_in_doubt_not_each_item(tmp_path: Path) -> None:
    # A two-step item whose run was killed while step 2 was in flight: step 1's answer was charged too, and
    # neither result was saved. Two requests, one item.
    from nanobatch.cli.status import folder_status
    from nanobatch.output.outdir import Journal

    journal = Journal(tmp_path, "run1")
    journal.open()
    journal.dispatched("hero", "k", 1)
    journal.dispatched("hero", "k", 2)
    journal.close()
    info = folder_status(tmp_path)
    assert (info["possibly_charged"], info["possibly_charged_ids"]) == (2, ["hero"])


# -- counts ----------------------------------------------------------------------------------------------


def test_each_night_counts_the_requests_it_sent_not_the_answers_it_collects_or_reads_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The README's cron pattern over two-step items: night 1 submits step 1, night 2 collects it and submits
    # step 2, night 3 collects step 2 (and reads step 1's kept answers again). Six requests were sent in all.
    job = two_step_job(tmp_path, monkeypatch)
    app = sim(batch_latency_s=0.3)
    sent, spent = [], []
    with run_in_thread(app=app) as url:
        for _night in range(4):
            assert cli(job, url, "--no-wait") == 0
            summary = json.loads((tmp_path / "out" / "summary.json").read_text())
            sent.append(summary["last_run"]["requests"])
            spent.append(summary["last_run"]["spent_usd"])
            time.sleep(0.7)  # the night's jobs are done by the next night
    assert billed(app) == 6
    assert sent == [3, 3, 0, 0]
    # What each night spent against its budget: the requests it submitted, at their worst case (they are paid
    # when their jobs answer), not the answers it collected (counted by the night that submitted them), nor those
    # read again (step 1's, on night 3).
    assert spent[0] > 0 and spent[1] > 0 and spent[2] == spent[3] == 0
    assert sum(spent) >= summary["paid_usd"] > 0


def test_a_run_after_a_kill_counts_only_the_requests_it_sent(job: Path) -> None:
    app = sim(batch_latency_s=0.5)
    with run_in_thread(app=app) as url:
        kill_when(app, url, job, lambda m, p: m == "GET" and p.startswith("/v1beta/batches/"))
        waiting = sum(chunk["requests"] for chunk in status_json(job.parent / "out")["batch_jobs"])
        assert 0 < waiting < ITEMS
        assert rerun(job, url, "--tier", "batch").returncode == 0
    assert json.loads((job.parent / "out" / "summary.json").read_text())["last_run"]["requests"] == ITEMS - waiting
    assert main(["status", str(job.parent / "out")]) == 0


def test_the_report_shows_the_items_status_counts_not_another_tools_lines(tmp_path: Path) -> None:
    from nanobatch.cli.report import write_report
    from nanobatch.cli.status import folder_status

    from .fakes import FakeGemini, run
    from .test_report import CARD_RE

    job = write_job(tmp_path, [{"id": f"i{n}", "image": "images/a.png"} for n in range(4)])
    out = tmp_path / "out"
    assert run(job, FakeGemini(), out).exit_code == 0
    theirs = [{"id": "i0", "status": "failed"}, {"id": "x", "status": "ok"}]  # another tool's notes, same file
    with (out / "results.jsonl").open("a") as f:
        f.writelines(json.dumps(line) + "\n" for line in theirs)
    page = write_report(out).read_text()
    cards = sorted((item, status) for status, item in CARD_RE.findall(page))
    assert cards == [(f"i{n}", "ok") for n in range(4)]  # i0's own record, not their line; no card for x
    assert folder_status(out)["items"] == len(cards)


# -- exit codes ------------------------------------------------------------------------------------------


def test_a_signal_that_came_while_the_last_requests_finished_in_the_grace_time_is_a_complete_run(
    tmp_path: Path,
) -> None:
    # Four items, four workers: all four are in flight when SIGTERM comes (a service stopped, a Ctrl-C) and all
    # four finish within the grace time. Nothing is left for the next run: exit 0, not 130 ("interrupted").
    from .test_shutdown import run_and_signal

    job = write_job(tmp_path, [{"id": f"i{n}", "instruction": f"edit {n}"} for n in range(4)])
    summary = run_and_signal(job, [(5.0, signal.SIGTERM)], grace_s=30)
    assert summary.stats.ok == 4 and summary.stats.requests == 4
    assert (summary.exit_code, summary.outcome, summary.reason) == (0, "complete", None)
    last = json.loads((tmp_path / "out" / "summary.json").read_text())["last_run"]
    assert (last["outcome"], last["reason"]) == ("complete", None)


# -- warnings --------------------------------------------------------------------------------------------


def test_the_deadline_says_once_that_the_rest_goes_online_not_that_it_goes_in_a_later_batch(
    job: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    app = sim(batch_latency_s=30.0)
    with run_in_thread(app=app) as url:
        argv = ["run", str(job), "--base-url", url, "--out", str(job.parent / "out"), "--tier", "batch"]
        assert main([*argv, "--config", str(job.parent / "nanobatch.yaml"), "--batch-deadline", "1"]) == 0
    err = capsys.readouterr().err
    assert err.count("the batch deadline has come") == 1 and "goes online" in err
    assert "later batch" not in err and "ended cancelled" not in err  # the run cancelled them itself
