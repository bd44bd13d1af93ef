"""--tier batch end to end: the CLI against the simulator's Batch API over loopback HTTP.

The same output folder as an online run, --no-wait then collect, fallback for failed jobs, the deadline,
cancel, status, the budget, an endpoint without batch, and real SIGKILLs at each journaled step.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
from starlette.applications import Starlette

from nanobatch.cli.main import main
from nanobatch.costs import pricing_for, usage_cost
from nanobatch.simulator import SimulatorConfig, create_app, run_in_thread

from .fakes import records, sku_job, taken_at_write, write_job

MODEL = "gemini-3.1-flash-image"
CONFIG = """
retry: {max_attempts: 3, backoff_initial_s: 0.01, backoff_max_s: 0.05}
batch: {chunk_requests: 4, linger_s: 0.2, poll_initial_s: 0.05, poll_max_s: 0.2}
"""
ITEMS = 6


@pytest.fixture
def job(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    return sku_job(tmp_path, monkeypatch, CONFIG, ITEMS, model=MODEL)


def sim(**config: Any) -> Starlette:
    return create_app(SimulatorConfig(**{"batch_latency_s": 0.3, "seed": 5, **config}))


def jobs(app: Starlette) -> list[Any]:
    return list(app.state.batches._jobs.values())


def cli(job: Path, url: str, *args: str, out: str = "out") -> int:
    argv = ["run", str(job), "--base-url", url, "--out", str(job.parent / out), "--tier", "batch"]
    return main([*argv, "--config", str(job.parent / "nanobatch.yaml"), "--quiet", *args])


def test_a_batch_run_ends_with_the_same_folder_as_an_online_run_at_batch_prices(job: Path) -> None:
    app = sim()
    with run_in_thread(app=app) as url:
        assert cli(job, url) == 0
        online = main(["run", str(job), "--base-url", url, "--out", str(job.parent / "online"), "--quiet",
                       "--config", str(job.parent / "nanobatch.yaml")])  # fmt: skip
    assert online == 0
    out = job.parent / "out"
    batch, sync = records(out), records(job.parent / "online")
    assert sorted(r["id"] for r in batch) == sorted(r["id"] for r in sync) == [f"sku-{n}" for n in range(ITEMS)]
    assert {r["status"] for r in batch} == {"ok"}
    assert sorted(p.name for p in out.glob("*.png")) == sorted(p.name for p in (job.parent / "online").glob("*.png"))
    assert len(jobs(app)) == 2  # 6 requests in chunks of at most 4
    assert {r["batch"] for r in batch} == {j.name for j in jobs(app)}
    for record in batch:
        assert record["tier"] == "batch" and record["usage"]["totalTokenCount"] > 0
        expected = usage_cost(record["usage"], pricing_for(MODEL, tier="batch"))
        assert record["cost_usd"] == pytest.approx(expected, abs=1e-6)
        assert expected == pytest.approx(usage_cost(record["usage"], pricing_for(MODEL)) / 2)
    assert json.loads((out / "summary.json").read_text())["last_run"]["outcome"] == "complete"
    # Collected: the API's files are deleted, and nothing but the (closed) ledger is left in the batch folder.
    assert not app.state.batches.files._files
    assert [p.name for p in (out / ".nanobatch-batches").iterdir()] == ["batches.jsonl"]


def test_no_wait_submits_and_exits_and_a_later_run_collects(job: Path, capsys: pytest.CaptureFixture[str]) -> None:
    app = sim(batch_latency_s=2.0)
    with run_in_thread(app=app) as url:
        assert cli(job, url, "--no-wait") == 0
        assert not (job.parent / "out" / "results.jsonl").read_text()  # nothing answered yet
        assert main(["status", str(job.parent / "out")]) == 0
        listed = capsys.readouterr().out
        # (the run asked about its jobs once more as it ended: one may have started running since)
        assert all(re.search(f"batch job {j.name}: (pending|running), ", listed) for j in jobs(app))
        assert len(jobs(app)) == 2
        time.sleep(0.7)
        assert cli(job, url) == 0  # collects the open jobs; sends nothing again
    assert sorted(r["id"] for r in records(job.parent / "out")) == [f"sku-{n}" for n in range(ITEMS)]
    assert len(jobs(app)) == 2 and app.state.stats.images == ITEMS


def test_failed_and_expired_jobs_return_their_items_to_a_later_batch(job: Path) -> None:
    app = sim(batch_rate_failed=0.4, batch_rate_expired=0.3, seed=11)
    with run_in_thread(app=app) as url:
        code = cli(job, url)
    states = Counter(j.state for j in jobs(app))
    assert states["failed"] + states["expired"] >= 1  # the seed makes some fail
    done = records(job.parent / "out")
    assert code == (0 if {r["status"] for r in done} == {"ok"} else 1)
    ok = [r for r in done if r["status"] == "ok"]
    assert len({r["id"] for r in ok}) == len(ok)  # each at most once
    assert all(j.name in {r["batch"] for r in ok} for j in jobs(app) if j.state == "succeeded")


def test_retryable_line_errors_are_retried_in_a_later_batch(job: Path) -> None:
    app = sim(batch_rate_line_error=0.5, seed=3)
    with run_in_thread(app=app) as url:
        code = cli(job, url)
    done = records(job.parent / "out")
    assert sorted(r["id"] for r in done) == [f"sku-{n}" for n in range(ITEMS)]
    assert len(jobs(app)) > 2 and max(r["attempts"] for r in done) > 1
    # Which lines fail depends on how the lines fall into jobs (timing): an item may meet the error on each of
    # its 3 attempts (one in eight), and only then is it failed, for the next run.
    assert all(r["status"] == "ok" or r["attempts"] == 3 for r in done)
    assert code == (0 if all(r["status"] == "ok" for r in done) else 1)


def test_the_deadline_cancels_the_jobs_and_sends_the_rest_online(job: Path) -> None:
    app = sim(batch_latency_s=30.0)
    with run_in_thread(app=app) as url:
        assert cli(job, url, "--batch-deadline", "1") == 0
    done = records(job.parent / "out")
    assert {r["status"] for r in done} == {"ok"} and len(done) == ITEMS
    assert all(r["fallback"] and r["tier"] == "standard" and r.get("batch") is None for r in done)
    assert {j.state for j in jobs(app)} == {"cancelled"}


def _blocking(app: Any, instruction: str) -> None:
    """The simulator's batch jobs answer *instruction*'s request blocked (once), every other one as usual."""
    service = app.state.batches
    real = service._answer
    done: list[bool] = []

    async def answer(job: Any, raw: bytes) -> Any:
        text = json.loads(raw)["request"]["contents"][0]["parts"][0]["text"]
        if text != instruction or done:
            return await real(job, raw)
        done.append(True)
        config = service.config
        service.config = dataclasses.replace(config, rate_blocked=1.0)
        try:
            return await real(job, raw)
        finally:
            service.config = config

    service._answer = answer


def test_a_batch_step_answered_before_a_later_step_fails_is_not_paid_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Night 1, --tier batch: step 1 answered by its job, step 2 answered blocked. Its failed record lands step 1's
    # answer (the job's results go), so step 1's image is read back from them and kept, as online: night 2 pays
    # for steps 2 and 3 only.
    job = sku_job(tmp_path, monkeypatch, CONFIG, 0, model=MODEL)
    write_job(
        tmp_path,
        [{"id": "hero", "image": "images/h.png", "image_size": "512", "steps": ["crop", "white", "shadow"]}],
        model=MODEL,
    )
    app = sim()
    _blocking(app, "white")
    with run_in_thread(app=app) as url:
        assert cli(job, url) == 1
        (first,) = records(tmp_path / "out")
        assert (first["status"], first["error"]["step"]) == ("blocked", 2) and first["cost_usd"] > 0
        made = app.state.stats.images
        assert cli(job, url) == 0
    assert first["steps"][0]["outputs"] == [".nanobatch-steps/hero.step1.png"]
    assert app.state.stats.images - made == 2  # steps 2 and 3: step 1 was answered and paid on night 1


def test_a_final_step_collected_from_a_batch_job_is_not_counted_twice_in_paid_in_and_usage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Night 1 (online) stops after step 2. Night 2 (--tier batch) gets step 3 from its job, but a file of yours
    # appears at hero.png: output_exists, the answer kept in the job (counted by night 2). Night 3 collects it
    # (pays nothing) and goes on from the kept step 2, whose Carried cost/tokens already include night 2's step 3.
    job = sku_job(tmp_path, monkeypatch, CONFIG, 0, model=MODEL)
    item = {"id": "hero", "image": "images/h.png", "image_size": "512", "steps": ["crop", "white", "shadow"]}
    write_job(tmp_path, [item], model=MODEL)
    out = tmp_path / "out"
    app = sim()
    with run_in_thread(app=app) as url:
        main(["run", str(job), "--base-url", url, "--out", str(out), "--config", str(tmp_path / "nanobatch.yaml"),
              "--quiet", "--max-requests", "2", "--concurrency", "1"])  # fmt: skip
        with taken_at_write(out, "hero.png"):
            cli(job, url)
        (out / "hero.png").unlink()
        made = app.state.stats.images
        assert cli(job, url) == 0
    first, second, third = records(out)
    assert app.state.stats.images == made  # night 3 paid nothing: its step 3 came from night 2's job
    paid = json.loads((out / "summary.json").read_text())["paid_usd"]
    assert third["paid_in"]["cost_usd"] == pytest.approx(paid)  # what earlier nights paid: each step once
    # night 2's record already holds the three steps' tokens (steps 1-2 from night 1, step 3 its own answer)
    assert third["usage"]["totalTokenCount"] == second["usage"]["totalTokenCount"]


@pytest.mark.parametrize("call", ["upload", "create"])
def test_a_deadline_that_comes_while_a_chunk_is_uploaded_or_created_is_kept(
    job: Path, monkeypatch: pytest.MonkeyPatch, call: str
) -> None:
    # The second chunk's upload (or create) is on its way when the deadline comes: its job must not be made, or
    # must be cancelled, and its items go online, instead of the run waiting 30 s past its deadline for them.
    from nanobatch.api.batch_api import BatchClient

    real = getattr(BatchClient, call)
    calls = 0

    async def slow_second(self: BatchClient, *args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 2:
            await anyio.sleep(1.5)  # past the deadline (1 s)
        return await real(self, *args, **kwargs)

    monkeypatch.setattr(BatchClient, call, slow_second)
    app = sim(batch_latency_s=30.0)
    with run_in_thread(app=app) as url:
        assert cli(job, url, "--batch-deadline", "1") == 0
    done = records(job.parent / "out")
    assert {r["status"] for r in done} == {"ok"} and len(done) == ITEMS
    assert all(r["fallback"] and r["tier"] == "standard" for r in done)
    assert {j.state for j in jobs(app)} == {"cancelled"}


def test_a_step_sent_online_at_the_deadline_is_paid_once_when_the_night_stops_before_the_next_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Step 1 is answered in its batch job; step 2's job never answers, so at the deadline it goes online (paid);
    # then the request budget stops the night before step 3. The next night must not pay for step 2 again.
    item = {"id": "hero", "image": "images/h.png", "image_size": "512", "steps": ["crop", "white", "shadow"]}
    job = sku_job(tmp_path, monkeypatch, CONFIG, 0, model=MODEL)
    write_job(tmp_path, [item], model=MODEL)
    app = sim()
    made = app.state.batches._new_job

    def only_the_first_job_answers(*args: Any) -> Any:
        new = made(*args)
        if len(jobs(app)) > 1:
            new.created_at += 1e6  # still pending at the deadline: cancelled, its step sent online
        return new

    app.state.batches._new_job = only_the_first_job_answers
    with run_in_thread(app=app) as url:
        assert cli(job, url, "--batch-deadline", "2", "--max-requests", "3") == 3
        (stopped,) = records(tmp_path / "out")
        assert (stopped["error"]["kind"], stopped["error"]["step"]) == ("stopped", 3)
        assert stopped["steps"][1]["outputs"] == [".nanobatch-steps/hero.step2.png"]
        assert cli(job, url, "--batch-deadline", "2") == 0
    assert app.state.stats.images == 3  # each step answered once: step 2 was not sent again
    done = records(tmp_path / "out")[-1]
    assert done["status"] == "ok" and done["paid_in"]["run"] == stopped["run"]
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["paid_usd"] == pytest.approx(
        stopped["cost_usd"] + done["cost_usd"]
    )


def test_cancel_cancels_the_open_jobs_and_the_next_run_sends_their_items_again(
    job: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    app = sim(batch_latency_s=300.0)  # "pending" for a tenth of it: 30 s, not 3, on a slow machine
    with run_in_thread(app=app) as url:
        assert cli(job, url, "--no-wait") == 0
        capsys.readouterr()
        assert main(["cancel", str(job.parent / "out"), "--base-url", url]) == 0
        assert "cancelled 2 batch jobs" in capsys.readouterr().out
        assert {j.state for j in jobs(app)} == {"cancelled"}
        assert main(["cancel", str(job.parent / "out"), "--base-url", url]) == 0  # again: nothing left to cancel
        said = capsys.readouterr().out
        assert said.startswith("cancelled 0 batch jobs\n2 had already ended: ") and said.count("(cancelled)") == 2
        assert cli(job, url, "--no-wait") == 0  # collects the cancelled jobs, submits their items anew
    assert len(jobs(app)) == 4 and [j.state for j in jobs(app)].count("pending") == 2


def test_cancel_says_which_jobs_had_ended_before_it_asked(job: Path, capsys: pytest.CaptureFixture[str]) -> None:
    app = sim(batch_latency_s=1.0)
    with run_in_thread(app=app) as url:
        assert cli(job, url, "--no-wait") == 0
        time.sleep(1.5)  # the jobs are done (nothing timed is asserted)
        capsys.readouterr()
        assert main(["cancel", str(job.parent / "out"), "--base-url", url]) == 0
        said = capsys.readouterr().out
        ended = said.count("(succeeded)")  # (one done before the --no-wait run ended was collected by it)
        assert said.startswith(f"cancelled 0 batch jobs\n{ended} had already ended: ") and ended >= 1
        assert cli(job, url) == 0  # their answers collected, nothing sent again
    assert app.state.stats.images == ITEMS and len(records(job.parent / "out")) == ITEMS


def test_the_budget_is_reserved_at_batch_prices_before_a_chunk_goes_out(job: Path) -> None:
    app = sim()
    with run_in_thread(app=app) as url:
        code = cli(job, url, "--max-cost", "0.05")  # a batch image costs about 0.023: two fit, not six
    done = [r for r in records(job.parent / "out") if r["status"] == "ok"] if (job.parent / "out").exists() else []
    assert code == 3 and 1 <= len(done) < ITEMS
    assert sum(r["cost_usd"] for r in done) <= 0.05
    assert sum(j.counts["request"] for j in jobs(app)) == len(done)  # nothing beyond the budget was submitted


@pytest.mark.parametrize("command", [["run", "--dry-run"], ["validate"]], ids=["dry-run", "validate"])
def test_dry_run_shows_the_batch_price_next_to_the_standard_one(
    job: Path, capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    argv = [command[0], str(job), *command[1:], "--tier", "batch", "--config", str(job.parent / "nanobatch.yaml")]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "at standard prices" in text and "in the batch tier" in text


def test_validate_in_the_batch_tier_gives_no_online_duration_and_no_time_warning(
    job: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The batch tier ignores --rpm and limits.concurrency (the jobs pace the run): an estimate from them, and a
    # --max-duration warning drawn from it, would be made up.
    argv = ["validate", str(job), "--tier", "batch", "--rpm", "1", "--max-duration", "1m"]
    assert main([*argv, "--config", str(job.parent / "nanobatch.yaml")]) == 0
    text = capsys.readouterr().out
    assert "the batch jobs'" in text and "16 requests in open chunks at once" in text  # 4 requests x 4 chunks
    assert "requests/min" not in text and "time:" not in text


@pytest.mark.parametrize("answer", [None, 405, 501, 200], ids=["404", "405", "501", "web-page"])
def test_an_endpoint_without_batch_is_told_before_anything_is_uploaded(
    job: Path, capsys: pytest.CaptureFixture[str], answer: int | None
) -> None:
    from starlette.responses import HTMLResponse
    from starlette.routing import Route

    app = sim()
    app.router.routes = [r for r in app.router.routes if "batches" not in getattr(r, "path", "")]
    if answer is not None:  # a proxy that answers batch calls in its own way
        page = HTMLResponse("<html><title>API portal</title></html>", status_code=answer)
        app.router.routes.insert(0, Route("/v1beta/batches", lambda request: page, methods=["GET", "POST"]))
    with run_in_thread(app=app) as url:
        code = cli(job, url)
    error = capsys.readouterr().err
    assert code != 0 and "Batch API" in error and "--tier flex" in error and url in error
    assert not app.state.batches.files._files and app.state.stats.images == 0


# -- real kills ---------------------------------------------------------------------------------------


class Hold:
    """ASGI middleware: the first request *matching* is held (after the app answered it, with *after*) until
    released; :attr:`reached` tells the test to kill the client."""

    def __init__(self, app: Any, match: Callable[[str, str], bool], after: bool) -> None:
        self.app, self.match, self.after = app, match, after
        self.reached, self.release, self.armed = threading.Event(), threading.Event(), True

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        import anyio

        if not (self.armed and scope["type"] == "http" and self.match(scope["method"], scope["path"])):
            return await self.app(scope, receive, send)

        async def swallow(message: Any) -> None:
            pass

        if self.after:
            await self.app(scope, receive, swallow)  # done on the server; its reply never reaches the client
        self.reached.set()
        await anyio.to_thread.run_sync(self.release.wait)


def kill_at_then_rerun(app: Starlette, job: Path, out: Path, match: Callable[[str, str], bool], after: bool) -> None:
    """Run ``nanobatch run --tier batch`` on *job* in a process, SIGKILL it when a request *match* (method, path)
    reaches the simulator (*after*: once the server has done it, its reply lost), then run it again to the end."""
    with run_in_thread(app=app) as url:
        argv = kill_at(app, url, job, out, match, after)
        again = subprocess.run(
            argv, env={**os.environ, "NANOBATCH_API_KEY": "sim-key"}, capture_output=True, timeout=60
        )
        assert again.returncode == 0, again.stderr.decode()


def kill_at(
    app: Starlette, url: str, job: Path, out: Path, match: Callable[[str, str], bool], after: bool
) -> list[str]:
    """The first half of :func:`kill_at_then_rerun`, against the simulator at *url*: the killed run's command."""
    hold = Hold(app.middleware_stack or app.build_middleware_stack(), match, after)
    app.middleware_stack = hold  # type: ignore[assignment]
    env = {**os.environ, "NANOBATCH_API_KEY": "sim-key"}
    argv = [sys.executable, "-m", "nanobatch", "run", str(job), "--base-url", url, "--out", str(out),
            "--tier", "batch", "--config", str(job.parent / "nanobatch.yaml"), "--quiet"]  # fmt: skip
    process = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert hold.reached.wait(30), "the run never reached the kill point"
        process.send_signal(signal.SIGKILL)
        assert process.wait(10) == -signal.SIGKILL  # killed there, not finished on its own
    finally:
        hold.armed = False
        hold.release.set()
    return argv


KILL_POINTS = {
    "chunk written, upload starting": (lambda m, p: p.startswith("/upload/"), False),
    "uploaded, create sent": (lambda m, p: p.endswith(":batchGenerateContent"), False),
    "created, its reply lost": (lambda m, p: p.endswith(":batchGenerateContent"), True),
    "created, polling": (lambda m, p: m == "GET" and p.startswith("/v1beta/batches/"), False),
    "collected, cleaning up": (lambda m, p: m == "DELETE" and "/files/" in p, False),
    "succeeded, results downloading": (lambda m, p: m == "GET" and p.startswith("/download/"), False),
}


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_sigkill_at_each_batch_step_then_rerun_pays_once(job: Path, point: str) -> None:
    app = sim(batch_latency_s=0.3)
    match, after = KILL_POINTS[point]
    kill_at_then_rerun(app, job, job.parent / "out", match, after)
    done = records(job.parent / "out")
    assert sorted(r["id"] for r in done) == [f"sku-{n}" for n in range(ITEMS)]  # each ok, exactly once
    assert {r["status"] for r in done} == {"ok"}
    names = Counter(j.display_name for j in jobs(app))
    assert set(names.values()) == {1}  # one job per chunk: no create was repeated
    assert sum(j.counts["request"] for j in jobs(app)) == ITEMS  # no item went into two jobs


def test_a_lost_create_reply_is_found_again_not_repeated(job: Path) -> None:
    app = sim(batch_rate_lost_create=1.0)
    with run_in_thread(app=app) as url:
        assert cli(job, url) == 0
    assert sorted(r["id"] for r in records(job.parent / "out")) == [f"sku-{n}" for n in range(ITEMS)]
    assert len(jobs(app)) == 2


def test_multi_step_items_send_each_next_step_in_a_later_batch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NANOBATCH_API_KEY", "sim-key")
    (tmp_path / "nanobatch.yaml").write_text(CONFIG)
    items = [{"id": f"hero-{n}", "image": f"images/h{n}.png", "steps": ["one", "two"], "image_size": "512"}
             for n in range(3)]  # fmt: skip
    job = write_job(tmp_path, items, model=MODEL)
    app = sim()
    with run_in_thread(app=app) as url:
        assert cli(job, url) == 0
    done = records(tmp_path / "out")
    assert {r["status"] for r in done} == {"ok"} and len(done) == 3
    assert all(len(r["steps"]) == 2 for r in done)
    assert [j.counts["request"] for j in jobs(app)] == [3, 3]  # step 1 of each, then step 2 of each


def test_a_chunk_left_half_written_by_a_kill_is_swept_and_its_items_sent_once(job: Path) -> None:
    folder = job.parent / "out" / ".nanobatch-batches"
    folder.mkdir(parents=True)
    (folder / "dead-0.jsonl").write_bytes(b'{"key": "x", "request": {"contents": []}}\n{"key": "y", "req')
    app = sim()
    with run_in_thread(app=app) as url:
        assert cli(job, url) == 0
    assert sorted(r["id"] for r in records(job.parent / "out")) == [f"sku-{n}" for n in range(ITEMS)]
    assert sum(j.counts["request"] for j in jobs(app)) == ITEMS
    assert [p.name for p in folder.iterdir()] == ["batches.jsonl"]


def test_an_item_may_choose_the_batch_tier_in_an_online_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NANOBATCH_API_KEY", "sim-key")
    (tmp_path / "nanobatch.yaml").write_text(CONFIG)
    items = [{"id": "slow", "image": "images/a.png", "tier": "batch"}, {"id": "now", "image": "images/b.png"}]
    job = write_job(tmp_path, items, model=MODEL, defaults={"instruction": "white background", "image_size": "512"})
    app = sim()
    with run_in_thread(app=app) as url:
        code = main(["run", str(job), "--base-url", url, "--out", str(tmp_path / "out"), "--quiet",
                     "--config", str(tmp_path / "nanobatch.yaml")])  # fmt: skip
    assert code == 0
    by_id = {r["id"]: r for r in records(tmp_path / "out")}
    assert by_id["slow"]["tier"] == "batch" and by_id["slow"]["batch"] == jobs(app)[0].name
    assert by_id["now"]["tier"] == "standard" and "batch" not in by_id["now"]


@pytest.mark.parametrize("steps", [1, 2], ids=["one step", "the second step"])
def test_waiting_items_hold_their_key_not_their_request(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, steps: int
) -> None:
    # Every item has its own ~100 KB picture and all of them wait in one job at once. While they wait, each
    # request is a line of its chunk on disk: memory (Python's allocations, traced) must not grow with the
    # number of waiting items by more than their keys. At a second step, not by the first step's answer (as
    # big as the picture) either.
    import random
    import tracemalloc

    import httpx2
    from PIL import Image as PILImage

    import nanobatch
    from nanobatch.api.batch_api import BatchClient

    from .conftest import run_virtual
    from .fakes import image_bytes, noise_bytes

    monkeypatch.setenv("NANOBATCH_API_KEY", "sim-key")
    canned = tmp_path / "answer.png"
    canned.write_bytes(image_bytes() if steps == 1 else noise_bytes((180, 180)))

    def catalog(folder: Path, n: int) -> Path:
        (folder / "images").mkdir(parents=True)
        for k in range(n):  # noise: a PNG as big as its pixels (~97 KB)
            pixels = random.Random(f"{folder.name}-{k}").randbytes(180 * 180 * 3)
            PILImage.frombytes("RGB", (180, 180), pixels).save(folder / "images" / f"p{k}.png")
        edits = {"instruction": "make it white"} if steps == 1 else {"steps": ["crop it", "make it white"]}
        items = [{"id": f"sku-{k}", "image": f"images/p{k}.png", **edits} for k in range(n)]
        return write_job(folder, items, model=MODEL)

    waiting_peak: list[int] = []
    real_create, real_download = BatchClient.create, BatchClient.download

    async def create(self: BatchClient, *args: Any, **kwargs: Any) -> Any:
        job = await real_create(self, *args, **kwargs)
        tracemalloc.reset_peak()  # from here on, each item waits in the job
        return job

    async def download(self: BatchClient, *args: Any, **kwargs: Any) -> None:
        # (At the second step, what is held as the job answers: the peak would count the simulator's own answers,
        # made in this process, as big as the pictures.)
        current, peak = tracemalloc.get_traced_memory()
        waiting_peak.append(peak if steps == 1 else current)
        await real_download(self, *args, **kwargs)

    monkeypatch.setattr(BatchClient, "create", create)
    monkeypatch.setattr(BatchClient, "download", download)

    def run(n: int) -> nanobatch.RunSummary:
        settings = nanobatch.load_settings(overrides={
            "api.tier": "batch", "batch.chunk_requests": n, "batch.open_chunks": 1, "batch.linger_s": 3600,
        })  # fmt: skip  # one chunk, sealed when its n-th request is in it: every item waits in the same job
        app = create_app(SimulatorConfig(batch_latency_s=600, canned=str(canned), time_scale=0))
        transport = httpx2.ASGITransport(app=app)
        job = catalog(tmp_path / str(n), n)
        return run_virtual(lambda: nanobatch.run_job(job, settings=settings, out_dir=job.parent / "out",
                                                     transport=transport), settle_s=0.005)  # fmt: skip

    run(5)  # untraced: lazy imports and one-off caches count in neither measured run
    peaks = {}
    for n in (20, 80):
        waiting_peak.clear()
        tracemalloc.start()
        try:
            summary = run(n)
        finally:
            tracemalloc.stop()
        assert summary.stats.ok == n and len(waiting_peak) == steps
        peaks[n] = waiting_peak[-1]
    per_item = (peaks[80] - peaks[20]) / 60
    # Each waiting item held its request body (its picture inline, in base64) and its picture: 241 KB. Now its
    # task (the coroutines of one step) is most of what it holds: ~12 KB, more under coverage's tracer.
    assert per_item < 32_000, f"{per_item:.0f} bytes held per waiting item"


def test_a_job_answering_every_request_at_once_holds_a_few_answers_not_all(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A job answers its whole chunk at once. Were every answer read then, each would hold its ~300 KB image
    # until the writer, here slower than the answers (a 1 MB write queue), took it: memory would grow with
    # the chunk. Only a few answers are read at a time; the rest wait in the results file on disk.
    import random
    import tracemalloc

    import httpx2
    from PIL import Image as PILImage

    import nanobatch
    from nanobatch.api.batch_api import BatchClient
    from nanobatch.output import writer
    from nanobatch.run.batch import landing as batch

    from .conftest import run_virtual

    monkeypatch.setenv("NANOBATCH_API_KEY", "sim-key")
    monkeypatch.setattr(batch, "LANDING_PLACES", 4)
    monkeypatch.setattr(writer, "WRITE_QUEUE_BYTES", 1 << 20)
    canned = tmp_path / "answer.png"  # noise: a PNG as big as its pixels (~300 KB)
    PILImage.frombytes("RGB", (320, 320), random.Random(7).randbytes(320 * 320 * 3)).save(canned)
    peak: list[int] = []
    real_download = BatchClient.download

    async def download(self: BatchClient, *args: Any, **kwargs: Any) -> Any:
        await real_download(self, *args, **kwargs)
        tracemalloc.reset_peak()  # the results file is on disk: from here on, its answers are read
        peak.append(tracemalloc.get_traced_memory()[0])

    monkeypatch.setattr(BatchClient, "download", download)
    n = 100
    job = write_job(tmp_path, [{"id": f"sku-{k}", "instruction": "a lemon"} for k in range(n)], model=MODEL)
    settings = nanobatch.load_settings(overrides={
        "api.tier": "batch", "batch.chunk_requests": n, "batch.open_chunks": 1, "batch.linger_s": 3600,
    })  # fmt: skip
    app = create_app(SimulatorConfig(batch_latency_s=60, canned=str(canned), time_scale=0))
    transport = httpx2.ASGITransport(app=app)
    tracemalloc.start()
    try:
        summary = run_virtual(lambda: nanobatch.run_job(job, settings=settings, out_dir=tmp_path / "out",
                                                        transport=transport), settle_s=0.005)  # fmt: skip
        peak.append(tracemalloc.get_traced_memory()[1])
    finally:
        tracemalloc.stop()
    assert summary.stats.ok == n and len(peak) == 2
    grown = peak[1] - peak[0]
    # Every answer read at once: 39 MB (each image, its line, its base64). Four places and a 1 MB queue: 8 MB.
    assert grown < 14 << 20, f"{grown / 2**20:.1f} MB more while the answers were read"


def test_answers_without_an_image_are_sent_again_in_a_later_batch(job: Path) -> None:
    # A no-image answer is retried: the step's request, on disk in its chunk while it waited, goes out again.
    app = sim(rate_no_image=0.3, seed=6)
    with run_in_thread(app=app) as url:
        code = cli(job, url)
    done = records(job.parent / "out")
    assert code == 0
    assert sorted(r["id"] for r in done) == [f"sku-{n}" for n in range(ITEMS)]
    assert {r["status"] for r in done} == {"ok"} and max(r["attempts"] for r in done) > 1
    assert len(jobs(app)) > 2


def test_answers_whose_image_cannot_be_decoded_are_sent_again_in_a_later_batch(job: Path) -> None:
    # As for no image: the step's request, on disk in its chunk while it waited, goes out again.
    app = sim(rate_bad_image=0.3, seed=6)
    with run_in_thread(app=app) as url:
        code = cli(job, url)
    done = records(job.parent / "out")
    assert code == 0, done
    assert sorted(r["id"] for r in done) == [f"sku-{n}" for n in range(ITEMS)]
    assert {r["status"] for r in done} == {"ok"} and max(r["attempts"] for r in done) > 1


def test_a_chunk_refused_before_its_job_fails_its_items_with_the_refusal(job: Path) -> None:
    # A definite refusal of the upload (400): nothing was paid; each step fails with that answer, as online.
    import httpx2

    import nanobatch

    from .conftest import run_virtual

    class RefuseUploads(httpx2.AsyncBaseTransport):
        def __init__(self) -> None:
            self.inner = httpx2.ASGITransport(app=sim())

        async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
            if request.url.path.startswith("/upload/"):
                error = {"code": 400, "message": "not this file", "status": "INVALID_ARGUMENT"}
                return httpx2.Response(400, json={"error": error})
            return await self.inner.handle_async_request(request)

    settings = nanobatch.load_settings(job.parent / "nanobatch.yaml", overrides={"api.tier": "batch"})
    summary = run_virtual(lambda: nanobatch.run_job(job, settings=settings, out_dir=job.parent / "out",
                                                    transport=RefuseUploads()))  # fmt: skip
    assert summary.stats.failed == ITEMS
    assert {r["error"]["status_code"] for r in records(job.parent / "out")} == {400}


def test_a_blocked_answer_in_a_results_file_is_recorded_blocked_as_online(job: Path) -> None:
    app = sim(rate_blocked=1.0)
    with run_in_thread(app=app) as url:
        assert cli(job, url) == 1
    done = records(job.parent / "out")
    assert {r["status"] for r in done} == {"blocked"} and len(done) == ITEMS
    assert {r["tier"] for r in done} == {"batch"} and all(r["batch"] for r in done)
    assert len(jobs(app)) == 2  # blocked is final: not sent again in a later batch


@pytest.mark.parametrize("steps", [1, 2], ids=["one step", "two steps"])
def test_the_deadline_may_send_the_rest_online_at_flex_price(job: Path, steps: int) -> None:
    # Every step after the deadline goes at the fallback tier: step 2 of a two-step item too.
    config = CONFIG.replace("poll_max_s: 0.2}", "poll_max_s: 0.2, fallback_tier: flex}")
    (job.parent / "nanobatch.yaml").write_text(config)
    if steps == 2:
        two_steps = job.read_text().replace("  instruction: make the background white\n", "  steps: [crop it, white]\n")
        job.write_text(two_steps)
    app = sim(batch_latency_s=30.0)
    with run_in_thread(app=app) as url:
        assert cli(job, url, "--batch-deadline", "1") == 0
    done = records(job.parent / "out")
    assert {r["status"] for r in done} == {"ok"} and len(done) == ITEMS
    assert {(r["tier"], r["fallback"]) for r in done} == {("flex", True)}
    assert json.loads((job.parent / "out" / "summary.json").read_text())["last_run"]["fallbacks"] == ITEMS


def test_chunks_are_cut_by_size_as_well_as_by_count(job: Path) -> None:
    # Each request inlines a picture of a few hundred bytes; a chunk of at most ~1 KB holds about two.
    config = CONFIG.replace("chunk_requests: 4", "chunk_requests: 4, chunk_mb: 0.001")
    (job.parent / "nanobatch.yaml").write_text(config)
    app = sim()
    with run_in_thread(app=app) as url:
        assert cli(job, url) == 0
    assert sorted(r["id"] for r in records(job.parent / "out")) == [f"sku-{n}" for n in range(ITEMS)]
    assert len(jobs(app)) > 2 and sum(j.counts["request"] for j in jobs(app)) == ITEMS


def test_a_nightly_no_wait_run_collects_yesterdays_jobs_and_submits_todays_items(job: Path) -> None:
    app = sim(batch_latency_s=0.3)
    with run_in_thread(app=app) as url:
        assert cli(job, url, "--no-wait") == 0
        text = job.read_text() + "- id: sku-new\n  image: images/p0.png\n  image_size: '512'\n"
        job.write_text(text)
        time.sleep(0.7)  # yesterday's jobs are done
        assert cli(job, url, "--no-wait") == 0
        assert sorted(r["id"] for r in records(job.parent / "out")) == [f"sku-{n}" for n in range(ITEMS)]
        assert len(jobs(app)) == 3 and jobs(app)[-1].counts["request"] == 1  # only today's item went out
        time.sleep(0.7)
        assert cli(job, url) == 0
    assert sorted(r["id"] for r in records(job.parent / "out")) == [*(f"sku-{n}" for n in range(ITEMS)), "sku-new"]
    assert len(jobs(app)) == 3


@pytest.mark.parametrize("ended", [False, True], ids=["refused while running", "refused as already ended"])
def test_a_cancel_refused_for_one_job_still_cancels_the_others_and_says_which(
    job: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, ended: bool
) -> None:
    # An API may refuse to cancel a job (one that ended since a run last looked, or for a passing error): the
    # operator stopping the spend must still have every other job cancelled, and be told which one was not.
    from nanobatch.api.batch_api import BatchClient
    from nanobatch.errors import ApiError

    app = sim(batch_latency_s=300.0)  # "pending" for a tenth of it: 30 s, not 3, on a slow machine
    real = BatchClient.cancel
    refused: list[str] = []

    async def refuse_the_first(self: BatchClient, name: str) -> None:
        if not refused:
            refused.append(name)
            if ended:  # it ended (expired) before the cancel came
                next(j for j in jobs(app) if j.name == name).state = "expired"
            raise ApiError("400 FAILED_PRECONDITION: the job cannot be cancelled", kind="bad_request", status_code=400)
        await real(self, name)

    with run_in_thread(app=app) as url:
        assert cli(job, url, "--no-wait") == 0
        monkeypatch.setattr(BatchClient, "cancel", refuse_the_first)
        capsys.readouterr()
        code = main(["cancel", str(job.parent / "out"), "--base-url", url])
    said = capsys.readouterr()
    (other,) = [j for j in jobs(app) if j.name != refused[0]]
    assert other.state == "cancelled" and f"cancelled 1 batch jobs: {other.name}" in said.out
    assert code == (0 if ended else 1) and (f"1 had already ended: {refused[0]} (expired)" in said.out) == ended
    assert (f"batch job {refused[0]} (pending) was not cancelled: 400 FAILED_PRECONDITION" in said.err) != ended


@pytest.mark.parametrize("cap", [["--max-requests", "1"], ["--max-cost", "0.03"]])
def test_a_budget_does_not_hold_back_answers_an_earlier_night_paid_for(job: Path, cap: list[str]) -> None:
    # Night 1 (--no-wait) put every item in batch jobs; night 2 has a small budget. Landing those answers sends
    # nothing and pays nothing more: the budget must neither count them as requests nor stop before they land
    # (it stopped after the first, "request budget reached: 1 requests sent" though none was sent).
    app = sim(batch_latency_s=0.05)
    with run_in_thread(app=app) as url:
        assert cli(job, url, "--no-wait") == 0
        submitted = sum(j.counts["request"] for j in jobs(app))

        assert cli(job, url, *cap) == 0

    assert submitted == ITEMS and sum(j.counts["request"] for j in jobs(app)) == ITEMS  # nothing sent again
    done = records(job.parent / "out")
    assert sorted(r["id"] for r in done if r["status"] == "ok") == [f"sku-{n}" for n in range(ITEMS)]
    last = json.loads((job.parent / "out" / "summary.json").read_text())["last_run"]
    assert last["outcome"] == "complete" and last["requests"] == 0


def test_status_counts_a_paid_answer_kept_for_an_item_whose_file_was_taken(
    job: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A file of yours at sku-1.png when its batch answer lands: the item fails (output_exists) and its answer is
    # kept, paid for. status said none was kept (the failed record is of the same work), hiding that money.
    app = sim(batch_latency_s=0.05)
    out = job.parent / "out"
    with run_in_thread(app=app) as url:
        assert cli(job, url, "--no-wait") == 0
        (out / "sku-1.png").write_bytes(b"mine")
        assert cli(job, url) == 1
        capsys.readouterr()
        assert main(["status", str(out), "--json"]) == 0
        kept = json.loads(capsys.readouterr().out)["batch_answers_kept"]
        (out / "sku-1.png").unlink()
        assert cli(job, url) == 0  # written now, from the answer kept

    assert kept == 1 and [r["status"] for r in records(out) if r["id"] == "sku-1"] == ["failed", "ok"]
    assert sum(j.counts["request"] for j in jobs(app)) == ITEMS  # paid once


def test_an_answer_kept_for_an_item_whose_file_was_taken_is_paid_once_in_paid_usd(
    job: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A file of yours appears at sku-1.png just as its answer is written: the failed record (output_exists) says
    # what its run paid for the answer, kept; the record that writes it later paid nothing more and refers to it
    # (paid_in). Both counted it, and paid_usd said more than was billed.
    app = sim(batch_latency_s=0.05)
    out = job.parent / "out"
    with run_in_thread(app=app) as url:
        assert cli(job, url, "--no-wait") == 0
        with taken_at_write(out, "sku-1.png"):
            assert cli(job, url) == 1
        (out / "sku-1.png").unlink()
        assert cli(job, url) == 0
    failed, made = [r for r in records(out) if r["id"] == "sku-1"]
    assert failed["error"]["kind"] == "output_exists" and failed["cost_usd"] > 0 and made["cost_usd"] == 0
    assert made["paid_in"] == {"run": failed["run"], "cost_usd": failed["cost_usd"]}
    capsys.readouterr()
    assert main(["status", str(out), "--json"]) == 0
    billed = sum(r["cost_usd"] for r in records(out) if r["id"] != "sku-1") + failed["cost_usd"]
    assert json.loads(capsys.readouterr().out)["paid_usd"] == pytest.approx(billed)


def test_a_no_wait_night_leaving_requests_in_jobs_is_no_success_for_the_alert(job: Path) -> None:
    # The README's alert fires when nanobatch_last_success_timestamp_seconds gets old: a --no-wait night whose
    # items all wait in batch jobs (or whose jobs fail every night, their items put in new ones) must not move it.
    from prometheus_client.parser import text_string_to_metric_families

    prom = job.parent / "job.prom"

    def last_success() -> float | None:
        samples = [s for f in text_string_to_metric_families(prom.read_text()) for s in f.samples]
        return next((s.value for s in samples if s.name == "nanobatch_last_success_timestamp_seconds"), None)

    app = sim(batch_latency_s=30.0)
    with run_in_thread(app=app) as url:
        assert cli(job, url, "--no-wait", "--metrics-file", str(prom)) == 0
        assert last_success() is None
        batches = app.state.batches
        batches.config = dataclasses.replace(batches.config, batch_latency_s=0.0)  # (the jobs answer now)
        assert cli(job, url, "--metrics-file", str(prom)) == 0  # collects every answer: the job is done
    assert last_success() is not None


def test_a_request_the_budget_refuses_as_it_is_sent_never_joins_a_chunk(tmp_path: Path) -> None:
    # A step admitted to collect an earlier night's answer whose job failed meanwhile is sent anew: its budget is
    # taken as it goes (Gate.budget_late, through on_send), and when it does not fit the request must not be in a
    # chunk, which would be sealed and paid past the cap (a chunk is sealed as its last line is written).
    from nanobatch.config import BatchSettings
    from nanobatch.run.batch.route import BatchRoute
    from nanobatch.run.limits import Stopped
    from nanobatch.run.route import Request, Step

    route = BatchRoute(object(), tmp_path / "batches", "r1", BatchSettings(chunk_requests=1))  # type: ignore[arg-type]
    sealed: list[str] = []
    route.filler._sealed = lambda chunk: sealed.append(chunk.id)

    def refuse() -> None:
        raise Stopped

    async def main() -> None:
        step = Step(item="sku-1", work_key="w", number=1)
        with pytest.raises(Stopped):
            await route.send(MODEL, Request(body={"contents": []}), timeout_s=1.0, step=step, on_send=refuse)

    anyio.run(main)
    assert sealed == [] and route.chunks.by_key == {} and not list((tmp_path / "batches").glob("r1-*"))


def test_requests_of_jobs_that_fail_during_the_night_are_sent_again_within_max_requests(
    job: Path,
) -> None:
    # Night 1 (--no-wait) put every item in jobs that fail while night 2 waits for them: their requests go into
    # new jobs, paid again, so under --max-requests 3 only three may. The failed jobs' requests were never charged,
    # and are not counted. (The order in the route, budget before chunk, is the unit test's above.)
    app = sim(batch_latency_s=0.5, batch_rate_failed=1.0)
    with run_in_thread(app=app) as url:
        assert cli(job, url, "--no-wait") == 0
        first = [j.name for j in jobs(app)]
        batches = app.state.batches
        batches.config = dataclasses.replace(batches.config, batch_rate_failed=0.0, batch_latency_s=0.05)
        assert cli(job, url, "--max-requests", "3") == 3  # aborted at its budget

    again = [j for j in jobs(app) if j.name not in first]
    assert {j.state for j in jobs(app) if j.name in first} == {"failed"}
    assert sum(j.counts["request"] for j in again) == 3
    assert [r["status"] for r in records(job.parent / "out")].count("ok") == 3


def test_a_no_wait_night_submits_no_more_than_its_budget_allows(job: Path) -> None:
    # --no-wait leaves each submitted job to the next night: its requests are paid when it answers all the same.
    # Their budget was handed back as each chunk went out, so the next chunk took it again: under --max-cost
    # 0.03 a night submitted every item, for several times the cap.
    app = sim(batch_latency_s=30.0)
    with run_in_thread(app=app) as url:
        code = cli(job, url, "--no-wait", "--max-cost", "0.03")
    submitted = sum(j.counts["request"] for j in jobs(app))
    last = json.loads((job.parent / "out" / "summary.json").read_text())["last_run"]
    assert code == 3 and 0 < submitted < ITEMS and last["spent_usd"] <= 0.03


def test_every_paid_batch_answer_is_in_the_records_across_nights_that_stop_early(job: Path) -> None:
    # Answers without an image are paid; the step is sent again, under the same key, in a later job. A --no-wait
    # night that read such an answer and stopped before the item's record left both jobs holding the key: the next
    # night took only the later one, and the first answer, paid, was in no record (its file deleted).
    app = sim(batch_latency_s=0.05, rate_no_image=0.5, seed=3)
    with run_in_thread(app=app) as url:
        for _ in range(8):
            cli(job, url, "--no-wait")
            time.sleep(0.1)
        assert cli(job, url) == 0

    answered = sum(j.counts["successful"] for j in jobs(app))
    done = records(job.parent / "out")
    assert sorted(r["id"] for r in done if r["status"] == "ok") == [f"sku-{n}" for n in range(ITEMS)]
    assert sum(r["attempts"] for r in done) == answered  # each paid answer counted once, none dropped


def test_answers_landed_by_a_night_that_stopped_at_its_budget_are_not_recorded_again(job: Path) -> None:
    # The second night lands the answers the first night's jobs gave, then stops at its budget before sending the
    # retries some need. The answers it landed were noted as landed only by a night that went to the end: the
    # third night read them again, as new, into a second record each (paid_usd counting them twice).
    app = sim(batch_latency_s=0.05, rate_blocked=0.4, rate_no_image=0.4, seed=5)
    with run_in_thread(app=app) as url:
        assert cli(job, url, "--no-wait") == 0
        time.sleep(0.1)
        assert cli(job, url, "--max-cost", "0.0001") == 3
        cli(job, url)

    done = records(job.parent / "out")
    answered = sum(j.counts["successful"] for j in jobs(app))
    seen = [(r["id"], r.get("batch"), r["status"]) for r in done if r.get("batch")]
    assert len(seen) == len(set(seen)) and sum(r["attempts"] for r in done) == answered


def test_the_ledger_is_on_disk_before_a_job_that_bills_its_requests_is_created(
    job: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A power cut after the create, with the ledger's lines still in the page cache only, left a run that knew no
    # chunk: it swept the chunk's file and sent its items again, paid twice. The ledger is flushed to disk first.
    import nanobatch.run.batch.ledger as ledger_module
    from nanobatch.api.batch_api import BatchClient

    order: list[str] = []
    real_create, real_fsync = BatchClient.create, ledger_module.os.fsync

    async def create(self: BatchClient, *args: Any, **kwargs: Any) -> Any:
        order.append("create")
        return await real_create(self, *args, **kwargs)

    def fsync(fd: int) -> None:
        order.append("fsync")
        real_fsync(fd)

    real_note = ledger_module.Ledger.note

    def note(self: Any, event: str, *args: Any, **kwargs: Any) -> None:
        order.append(event)
        real_note(self, event, *args, **kwargs)

    monkeypatch.setattr(BatchClient, "create", create)
    monkeypatch.setattr(ledger_module.os, "fsync", fsync)
    monkeypatch.setattr(ledger_module.Ledger, "note", note)
    with run_in_thread(app=sim(batch_latency_s=0.05)) as url:
        assert cli(job, url) == 0
    creates = [n for n, step in enumerate(order) if step == "create"]
    assert creates and all(order[n - 2 : n] == ["creating", "fsync"] for n in creates)


def test_a_waiting_night_stopped_by_its_time_limit_counts_what_it_submitted(job: Path) -> None:
    # --max-duration stops a night whose jobs are still running: their requests are paid when they answer. Its
    # steps were cancelled and their budget handed back, so no night counted them (the next one collects them).
    app = sim(batch_latency_s=30.0)
    with run_in_thread(app=app) as url:
        code = cli(job, url, "--max-duration", "3", "--grace", "0.2", "--max-cost", "1")  # both chunks in
    submitted = sum(j.counts["request"] for j in jobs(app))
    last = json.loads((job.parent / "out" / "summary.json").read_text())["last_run"]
    assert code == 3 and submitted == ITEMS and last["spent_usd"] > 0


def _paid_usd(out: Path, capsys: pytest.CaptureFixture[str]) -> float:
    capsys.readouterr()
    assert main(["status", str(out), "--json"]) == 0
    return float(json.loads(capsys.readouterr().out)["paid_usd"])


def test_a_kept_answer_is_paid_once_whatever_nights_failed_on_it_meanwhile(
    job: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Night 1's record paid for sku-1's answer (kept: its file was in the way). Night 2, the file still there,
    # recorded output_exists at $0; night 3 wrote the answer and paid for it again, as the latest record, night 2's,
    # had paid nothing. The answer's ledger line says which record paid for it.
    app = sim(batch_latency_s=0.05)
    out = job.parent / "out"
    with run_in_thread(app=app) as url:
        with taken_at_write(out, "sku-1.png"):
            assert cli(job, url) == 1
        assert cli(job, url) == 1  # the file is still there: nothing read, nothing paid
        (out / "sku-1.png").unlink()
        assert cli(job, url) == 0
    first, _, made = [r for r in records(out) if r["id"] == "sku-1"]
    assert made["cost_usd"] == 0 and made["paid_in"] == {"run": first["run"], "cost_usd": first["cost_usd"]}
    billed = sum(r["cost_usd"] for r in records(out) if r["id"] != "sku-1") + first["cost_usd"]
    assert _paid_usd(out, capsys) == pytest.approx(billed)


def test_a_new_answer_after_a_kept_one_is_paid_in_full(
    job: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # sku-1's first answer was kept (its file in the way); its instruction changed, and the new request's answer
    # was collected by a night sku-1 was left out of. When sku-1 came back, that new answer was taken for the kept
    # one (the item's latest record had failed so), referred to night 1's record, and paid for by no record.
    from .fakes import sku_items

    app = sim(batch_latency_s=0.05)
    out = job.parent / "out"
    items = sku_items(ITEMS)
    changed = [dict(i, instruction="make the background grey") if i["id"] == "sku-1" else i for i in items]
    with run_in_thread(app=app) as url:
        with taken_at_write(out, "sku-1.png"):
            assert cli(job, url) == 1
        (out / "sku-1.png").unlink()
        write_job(job.parent, changed, model=MODEL)
        batches = app.state.batches
        batches.config = dataclasses.replace(batches.config, batch_latency_s=30.0)
        assert cli(job, url, "--no-wait") == 0  # sku-1's new request waits in a job
        batches.config = dataclasses.replace(batches.config, batch_latency_s=0.0)
        write_job(job.parent, [i for i in items if i["id"] != "sku-1"], model=MODEL)
        assert cli(job, url) == 0  # collects the job; no item of this night reads sku-1's answer
        write_job(job.parent, changed, model=MODEL)
        assert cli(job, url) == 0
    first, made = (r for r in records(out) if r["id"] == "sku-1")
    assert made["status"] == "ok" and made["cost_usd"] > 0 and made.get("paid_in") is None
    assert _paid_usd(out, capsys) == pytest.approx(sum(r["cost_usd"] for r in records(out)))
