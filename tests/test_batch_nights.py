"""The batch tier across nights: what a careless cron schedule does to a folder must never pay twice, drop an
answer, or misreport (issue 22). The CLI against the simulator's Batch API over loopback HTTP."""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from nanobatch.cli.main import main
from nanobatch.errors import ApiError
from nanobatch.simulator import run_in_thread

from .fakes import records, sku_items, sku_job, write_job
from .test_batch_tier import CONFIG, MODEL, cli, jobs, kill_at_then_rerun, sim

ITEMS = 3


def two_step_job(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, steps: int = 2, **fields: Any) -> Path:
    monkeypatch.setenv("NANOBATCH_API_KEY", "sim-key")
    (tmp_path / "nanobatch.yaml").write_text(CONFIG)
    items = [{"id": f"hero-{n}", "image": f"images/h{n}.png", "steps": [f"step {k}" for k in range(1, steps + 1)],
              "image_size": "512", **fields} for n in range(ITEMS)]  # fmt: skip
    return write_job(tmp_path, items, model=MODEL)


def one_step_job(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    return sku_job(tmp_path, monkeypatch, CONFIG, 6, model=MODEL)


def plain(job: Path, url: str, *args: str) -> int:
    """`nanobatch run` as the --no-wait run's message says: no --tier, the config's (standard) tier."""
    argv = ["run", str(job), "--base-url", url, "--out", str(job.parent / "out"), "--quiet"]
    return main([*argv, "--config", str(job.parent / "nanobatch.yaml"), *args])


def billed(app: Any) -> int:
    """Requests the simulator answered with an image: what the API bills, online and in batch jobs."""
    return int(app.state.stats.images)


def status_text(out: Path, capsys: pytest.CaptureFixture[str]) -> str:
    capsys.readouterr()
    assert main(["status", str(out)]) == 0
    return capsys.readouterr().out


# -- point 1: an answer that arrived is never thrown away ------------------------------------------------


@pytest.mark.parametrize(("steps", "fields"), [(2, {}), (3, {"keep_steps": True})], ids=["two steps", "three kept"])
def test_nightly_no_wait_runs_finish_multi_step_items_paying_each_step_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, steps: int, fields: dict[str, Any]
) -> None:
    # The README's cron pattern: each night `run --tier batch --no-wait` collects what is done and submits the
    # rest. Each night one step of each item is answered: the night after, the item goes on from there.
    job = two_step_job(tmp_path, monkeypatch, steps, **fields)
    app = sim(batch_latency_s=0.3)
    with run_in_thread(app=app) as url:
        for _night in range(steps + 2):  # one more than needed: it sends nothing
            assert cli(job, url, "--no-wait") == 0
            time.sleep(0.7)  # the night's jobs are done by the next night
    done = records(tmp_path / "out")
    assert sorted(r["id"] for r in done) == [f"hero-{n}" for n in range(ITEMS)]
    assert {r["status"] for r in done} == {"ok"} and all(len(r["steps"]) == steps for r in done)
    assert all(step["usage"]["totalTokenCount"] > 0 for r in done for step in r["steps"])
    assert billed(app) == ITEMS * steps and sum(j.counts["request"] for j in jobs(app)) == ITEMS * steps
    assert len(jobs(app)) == steps  # step 1 of each item, then step 2 of each, ...
    if fields.get("keep_steps"):
        out = tmp_path / "out"
        assert all((out / name).is_file() for r in done for step in r["steps"][:-1] for name in step["outputs"])
    # Paid for exactly once, and the records say what was paid.
    total = sum(r["cost_usd"] for r in done)
    assert total == pytest.approx(json.loads((tmp_path / "out" / "summary.json").read_text())["cost_usd"])
    assert {p.name for p in (tmp_path / "out" / ".nanobatch-batches").iterdir()} <= {"batches.jsonl"}  # all used


def test_a_kill_after_step_one_was_collected_does_not_send_step_one_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # SIGKILL just as step 2's chunk is created: step 1's answers were read, step 2's are not in yet.
    job = two_step_job(tmp_path, monkeypatch)
    app = sim(batch_latency_s=0.3)
    creates = Counter[str]()

    def second_create(method: str, path: str) -> bool:
        if path.endswith(":batchGenerateContent"):
            creates["seen"] += 1
            return creates["seen"] == 2
        return False

    kill_at_then_rerun(app, job, tmp_path / "out", second_create, after=False)
    done = records(tmp_path / "out")
    assert sorted(r["id"] for r in done) == [f"hero-{n}" for n in range(ITEMS)]
    assert {r["status"] for r in done} == {"ok"} and all(len(r["steps"]) == 2 for r in done)
    assert billed(app) == 2 * ITEMS and len(jobs(app)) == 2  # step 1 once, step 2 once


# -- point 2: what waits in a job is not sent again by any tier --------------------------------------------


def test_a_plain_run_after_no_wait_collects_the_jobs_instead_of_sending_online(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    job = one_step_job(tmp_path, monkeypatch)
    app = sim(batch_latency_s=1.5)
    with run_in_thread(app=app) as url:
        assert cli(job, url, "--no-wait") == 0
        assert billed(app) == 0 and len(jobs(app)) == 2
        assert plain(job, url) == 0  # the jobs are pending: it waits for them
    done = records(tmp_path / "out")
    assert sorted(r["id"] for r in done) == [f"sku-{n}" for n in range(6)]
    assert {r["tier"] for r in done} == {"batch"} and {r["batch"] for r in done} == {j.name for j in jobs(app)}
    assert billed(app) == 6 and len(jobs(app)) == 2  # nothing went online, nothing in a new job
    assert "batch job" not in status_text(tmp_path / "out", capsys)  # collected: none left open


def test_a_plain_run_collects_step_one_from_its_job_and_sends_step_two_online(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = two_step_job(tmp_path, monkeypatch)
    app = sim(batch_latency_s=1.0)
    with run_in_thread(app=app) as url:
        assert cli(job, url, "--no-wait") == 0
        assert plain(job, url) == 0
    done = records(tmp_path / "out")
    assert {r["status"] for r in done} == {"ok"} and len(done) == ITEMS
    assert {(r["tier"], r["batch"]) for r in done} == {("standard", jobs(app)[0].name)}
    assert billed(app) == 2 * ITEMS and len(jobs(app)) == 1


def test_a_plain_no_wait_run_leaves_pending_jobs_waiting_and_sends_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    job = one_step_job(tmp_path, monkeypatch)
    app = sim(batch_latency_s=300.0)  # "pending" for a tenth of it: 30 s, not 3, on a slow machine
    with run_in_thread(app=app) as url:
        assert cli(job, url, "--no-wait") == 0
        assert plain(job, url, "--no-wait") == 0
        assert billed(app) == 0 and len(jobs(app)) == 2
    assert not records(tmp_path / "out")
    assert status_text(tmp_path / "out", capsys).count(": pending, ") == 2


def test_a_plain_run_at_an_endpoint_without_batch_sends_nothing_while_a_job_may_answer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    job = one_step_job(tmp_path, monkeypatch)
    app = sim(batch_latency_s=30.0)
    with run_in_thread(app=app) as url:
        assert cli(job, url, "--no-wait") == 0
    proxy = sim()  # online only, as most proxies
    proxy.router.routes = [r for r in proxy.router.routes if "batches" not in getattr(r, "path", "")]
    with run_in_thread(app=proxy) as elsewhere:
        capsys.readouterr()
        assert plain(job, elsewhere) == 2
    assert "may still answer" in capsys.readouterr().err
    assert billed(proxy) == 0 and not records(tmp_path / "out")


def test_retry_failed_collects_what_waits_in_a_job_instead_of_dropping_its_answers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # --retry-failed sends only failed items; items answered in a job are not failed, but their answers are paid
    # for: the run collects them rather than close the job's results with them unread.
    job = one_step_job(tmp_path, monkeypatch)
    app = sim(batch_latency_s=0.3)
    with run_in_thread(app=app) as url:
        assert cli(job, url, "--no-wait") == 0
        time.sleep(0.7)
        assert plain(job, url, "--retry-failed") == 0
        assert {(r["status"], r["tier"]) for r in records(tmp_path / "out")} == {("ok", "batch")}
        assert plain(job, url) == 0
    assert len(records(tmp_path / "out")) == 6 and billed(app) == 6 and len(jobs(app)) == 2


# -- point 10: a full disk --------------------------------------------------------------------------------


class FullDisk:
    """A chunk file on a disk that fills up after its first line."""

    def __init__(self, handle: Any) -> None:
        self.handle, self.lines = handle, 0

    def write(self, data: bytes) -> int:
        self.lines += 1
        if self.lines > 1:
            raise OSError(28, "No space left on device")
        return int(self.handle.write(data))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.handle, name)


def test_a_full_disk_while_chunks_are_written_aborts_with_exit_3_and_warns_of_no_charge(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from nanobatch.run.batch import filling

    job = one_step_job(tmp_path, monkeypatch)
    real_open = filling.open_chunk_file
    monkeypatch.setattr(filling, "open_chunk_file", lambda path: FullDisk(real_open(path)))
    app = sim()
    out = tmp_path / "out"
    with run_in_thread(app=app) as url:
        assert cli(job, url) == 3
        err = capsys.readouterr().err
        assert "error: cannot write the batch tier's files into" in err and "No space left on device" in err
        assert "Traceback" not in err and "ExceptionGroup" not in err
        assert not app.state.batches.files._files and not jobs(app)  # nothing was uploaded
        listed = status_text(out, capsys)
        assert "may have been charged" not in listed and "batch job" not in listed
        monkeypatch.undo()
        monkeypatch.setenv("NANOBATCH_API_KEY", "sim-key")
        assert cli(job, url) == 0  # room again: every item once
    assert sorted(r["id"] for r in records(out)) == [f"sku-{n}" for n in range(6)] and billed(app) == 6


def test_a_full_disk_while_results_download_aborts_and_the_next_run_collects_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from nanobatch.api.batch_api import BatchClient

    job = one_step_job(tmp_path, monkeypatch)

    async def full(self: BatchClient, file_name: str, path: Path) -> None:
        path.with_name(path.name + ".part").write_bytes(b'{"key": "half a line')
        raise OSError(28, "No space left on device")

    real = BatchClient.download
    monkeypatch.setattr(BatchClient, "download", full)
    app = sim()
    out = tmp_path / "out"
    with run_in_thread(app=app) as url:
        assert cli(job, url) == 3
        err = capsys.readouterr().err
        assert "No space left on device" in err and "Traceback" not in err
        listed = status_text(out, capsys)
        assert "may have been charged" not in listed and listed.count("batch job batches/") == 2
        monkeypatch.setattr(BatchClient, "download", real)
        assert cli(job, url) == 0
    assert sorted(r["id"] for r in records(out)) == [f"sku-{n}" for n in range(6)]
    assert billed(app) == 6 and len(jobs(app)) == 2  # collected, not sent again


# -- point 12: --no-wait and cancel say what happened -----------------------------------------------------------


def test_no_wait_says_how_many_requests_wait_and_how_to_collect_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    job = one_step_job(tmp_path, monkeypatch)
    app = sim(batch_latency_s=30.0)
    out = tmp_path / "out"
    argv = ["run", str(job), "--out", str(out), "--tier", "batch", "--config", str(tmp_path / "nanobatch.yaml")]
    with run_in_thread(app=app) as url:
        assert main([*argv, "--base-url", url, "--no-wait"]) == 0
        text = capsys.readouterr().out
        assert "6 requests wait in 2 batch jobs" in text and f"nanobatch run {job}" in text and str(out) in text
        waiting = json.loads((out / "summary.json").read_text())["last_run"]["batch_waiting"]
        assert waiting == {"requests": 6, "jobs": [j.name for j in jobs(app)]}
        assert main(["--log-format", "json", *argv, "--base-url", url, "--no-wait"]) == 0
    events = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    (summary,) = [e for e in events if e.get("event") == "summary"]
    assert summary["batch_waiting"]["requests"] == 6 and "6 requests wait in 2 batch jobs" in summary["message"]


def test_a_job_no_item_of_the_run_asks_about_does_not_fail_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Night 1 leaves its jobs; the manifest's instruction changes: the new work goes online, and the old job, still
    # running, is nobody's to wait for tonight (it is left for a later run to collect, not counted as a failure).
    job = one_step_job(tmp_path, monkeypatch)
    app = sim(batch_latency_s=30.0)
    with run_in_thread(app=app) as url:
        assert cli(job, url, "--no-wait") == 0
        job.write_text(job.read_text().replace("make the background white", "make the background grey"))
        assert plain(job, url) == 0
    done = records(job.parent / "out")
    assert len(done) == 6 and {r["tier"] for r in done} == {"standard"} and len(jobs(app)) == 2


def test_a_done_job_no_item_asks_about_is_collected_not_left_pending_for_ever(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Night 1 leaves its jobs; the instruction changes; night 2 sends the new work online, and no item waits for
    # the old jobs. Once they are done, a complete run collects them: their paid answers are kept on disk (for a
    # run that asks for them), the API's files deleted, and status stops calling them pending.
    job = one_step_job(tmp_path, monkeypatch)
    app = sim()
    out = job.parent / "out"
    with run_in_thread(app=app) as url:
        assert cli(job, url, "--no-wait") == 0
        job.write_text(job.read_text().replace("make the background white", "make the background grey"))
        time.sleep(1.0)  # the old jobs are done (nothing timed is asserted)
        assert plain(job, url) == 0
        capsys.readouterr()
        assert main(["status", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "batch job" not in shown and "not written yet: 6;" in shown
    assert not app.state.batches.files._files and billed(app) == 12  # the API's copies deleted; nothing paid again


def test_after_cancel_status_says_cancelled_and_a_plain_run_sends_the_items_online(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    job = one_step_job(tmp_path, monkeypatch)
    app = sim(batch_latency_s=30.0)
    out = tmp_path / "out"
    with run_in_thread(app=app) as url:
        assert cli(job, url, "--no-wait") == 0
        assert main(["cancel", str(out), "--base-url", url]) == 0
        listed = status_text(out, capsys)
        assert listed.count(": cancelled, ") == 2 and ": pending, " not in listed
        capsys.readouterr()
        assert main(["status", str(out), "--json"]) == 0
        assert {j["state"] for j in json.loads(capsys.readouterr().out)["batch_jobs"]} == {"cancelled"}
        assert plain(job, url) == 0  # the cancelled jobs answered nothing: their items go online now
    done = records(out)
    assert {(r["status"], r["tier"]) for r in done} == {("ok", "standard")} and len(done) == 6
    assert billed(app) == 6 and len(jobs(app)) == 2
    assert "batch job" not in status_text(out, capsys)


def test_past_the_deadline_what_a_job_answered_is_collected_not_sent_online_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Night 1 leaves its jobs (--no-wait); they finish, paid. Night 2's export has two new rows first: they fill
    # the one chunk it may fill at a time, so the old rows come to the batch route after its deadline. Only
    # requests in no job may go online then: the old rows' answers are collected.
    config = CONFIG.replace("chunk_requests: 4", "chunk_requests: 2, open_chunks: 1")
    job = sku_job(tmp_path, monkeypatch, config, 3, model=MODEL)
    app = sim(batch_latency_s=0.5)
    with run_in_thread(app=app) as url:
        assert cli(job, url, "--no-wait") == 0
        time.sleep(1.0)  # night 1's jobs are done (nothing timed is asserted)
        old = [{"id": f"sku-{i}", "image": f"images/p{i}.png", "image_size": "512"} for i in range(3)]
        new = [{"id": f"new-{i}", "image": f"images/n{i}.png", "image_size": "512"} for i in range(2)]
        write_job(tmp_path, new + old, model=MODEL)
        assert cli(job, url, "--batch-deadline", "0.5") == 0
    done = {r["id"]: r for r in records(tmp_path / "out")}
    assert {done[f"sku-{i}"]["tier"] for i in range(3)} == {"batch"}  # collected from night 1's jobs
    assert billed(app) == 5  # each of the five items paid once


def test_a_job_whose_create_reply_was_lost_is_collected_when_the_next_night_finds_it_past_its_deadline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Night 1 is killed once its create reached the API (the job exists, its reply lost). Night 2 comes to that
    # chunk after its deadline: the job it finds by name has answered (paid); those answers are collected, and
    # nothing is sent online again.
    from nanobatch.run.batch.jobs import Jobs

    from .test_batch_tier import KILL_POINTS, kill_at

    drive = Jobs.drive

    async def past_the_deadline(self: Jobs, chunk: Any) -> None:
        self.answers.past_deadline = True  # the deadline came before this chunk was looked at
        await drive(self, chunk)

    job = one_step_job(tmp_path, monkeypatch)
    app = sim(batch_latency_s=0.3)
    with run_in_thread(app=app) as url:
        kill_at(app, url, job, tmp_path / "out", *KILL_POINTS["created, its reply lost"])
        time.sleep(0.5)  # the job has answered (nothing timed is asserted)
        monkeypatch.setattr(Jobs, "drive", past_the_deadline)
        assert cli(job, url, "--batch-deadline", "600") == 0
    done = records(tmp_path / "out")
    assert sorted(r["id"] for r in done) == [f"sku-{n}" for n in range(6)] and {r["status"] for r in done} == {"ok"}
    assert billed(app) == 6  # each item paid once: the found job's answers were not sent online again
    # The found job's items are batch answers; a chunk no job was made for went online (past the deadline).
    assert len(jobs(app)) == 1 and any(r["tier"] == "batch" for r in done)


def test_the_results_and_the_ledgers_word_for_them_are_on_disk_before_the_apis_copy_is_deleted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # After the delete, the folder holds the only copy of paid answers: a power cut must not take them.
    import os

    from nanobatch.api.batch_api import BatchClient

    events: list[str] = []
    real_fsync, real_delete = os.fsync, BatchClient.delete_file

    def fsync(fd: int) -> None:
        events.append("fsync " + os.path.basename(os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    async def delete_file(self: BatchClient, name: str) -> None:
        events.append("delete " + name)
        await real_delete(self, name)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(BatchClient, "delete_file", delete_file)
    job = one_step_job(tmp_path, monkeypatch)
    app = sim()
    with run_in_thread(app=app) as url:
        assert cli(job, url) == 0
    deletes = [n for n, e in enumerate(events) if e.startswith("delete ")]
    assert deletes
    for n in deletes:  # the last two things made durable before each: the chunk's results, then its ledger line
        synced = [e for e in events[:n] if e.startswith("fsync ") and e != "fsync .nanobatch-batches"]
        # (another chunk's ledger line may be synced between the two: its "creating", before its create)
        files = [e for e in synced if e != "fsync batches.jsonl"]
        assert synced[-1] == "fsync batches.jsonl" and files[-1].endswith(".results.jsonl")


def test_a_job_still_running_after_its_deadline_cancel_is_asked_about_at_the_poll_interval(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A real cancel of a RUNNING job takes a while: until the job ends it is polled as before the deadline, not
    # in a loop with no pause (thousands of GETs a second against the API's quota).
    asked = Counter[str]()
    app = sim(batch_latency_s=1.5)
    inner = app.build_middleware_stack()

    async def slow_cancel(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"].endswith(":cancel"):
            await send(
                {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]}
            )
            await send({"type": "http.response.body", "body": b"{}"})  # accepted; the job runs on
            return
        if scope["type"] == "http" and scope["method"] == "GET" and scope["path"].startswith("/v1beta/batches/"):
            asked["get"] += 1
        await inner(scope, receive, send)

    app.middleware_stack = slow_cancel  # type: ignore[assignment]
    job = one_step_job(tmp_path, monkeypatch)
    with run_in_thread(app=app) as url:
        cli(job, url, "--batch-deadline", "0.3")
    assert 0 < asked["get"] < 100  # poll_max_s 0.2 over ~1.5 s, for two jobs; with no pause, thousands


def test_an_answer_whose_item_left_the_manifest_for_a_night_is_kept_and_collected_when_it_returns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Tonight's export misses sku-0, whose answer night 1's job gave (paid). The run that goes through the rest
    # keeps it (it names how many it keeps); tomorrow sku-0 is back and its answer collected, not paid again.
    job = sku_job(tmp_path, monkeypatch, CONFIG, 3, model=MODEL)
    app = sim(batch_latency_s=0.5)
    with run_in_thread(app=app) as url:
        night_one_then_an_export_without_sku0(job, url)
        assert cli(job, url) == 0
        write_job(tmp_path, sku_items(3), model=MODEL)
        assert cli(job, url) == 0
    done = {r["id"]: r for r in records(tmp_path / "out")}
    assert sorted(done) == ["sku-0", "sku-1", "sku-2"] and done["sku-0"]["batch"] == jobs(app)[0].name
    assert billed(app) == 3 and len(jobs(app)) == 1


def night_one_then_an_export_without_sku0(job: Path, url: str) -> None:
    """Night 1 leaves its job (``--no-wait``), which then answers every row (paid); tonight's export of the
    three SKUs of :func:`sku_job` misses sku-0."""
    assert cli(job, url, "--no-wait") == 0
    time.sleep(1.0)  # the job is done (nothing timed is asserted)
    write_job(job.parent, sku_items(3)[1:], model=MODEL)


def cli_while_a_users_file_appears(job: Path, url: str, name: str) -> int:
    """:func:`cli`, while a file of the user's appears at the output name *name* just before the writer puts the
    item's image there (after its answer was read, and paid for)."""
    import nanobatch.output.outdir

    out, real_put = job.parent / "out", nanobatch.output.outdir.OutDir.put

    def put(self: nanobatch.output.outdir.OutDir, files: Any, *args: Any) -> None:
        if any(each == name for each, _ in files):
            (out / name).write_bytes(b"the user's own")
        real_put(self, files, *args)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(nanobatch.output.outdir.OutDir, "put", put)
        return cli(job, url)


def test_an_answer_whose_image_could_not_be_written_is_kept_and_written_by_the_next_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A file of the user's appears at sku-0's name while its job runs: the answer is read, its image refused
    # (output_exists). Once the file is moved away, the next run writes the answer it has, paying nothing.
    job = sku_job(tmp_path, monkeypatch, CONFIG, 3, model=MODEL)
    out = tmp_path / "out"
    app = sim(batch_latency_s=0.3)
    with run_in_thread(app=app) as url:
        assert cli_while_a_users_file_appears(job, url, "sku-0.png") == 1
        assert any((r.get("error") or {}).get("kind") == "output_exists" for r in records(out))
        (out / "sku-0.png").unlink()
        assert cli(job, url) == 0
    latest = {r["id"]: r for r in records(out)}
    assert latest["sku-0"]["status"] == "ok" and (out / "sku-0.png").read_bytes() != b"the user's own"
    assert billed(app) == 3 and len(jobs(app)) == 1


def test_a_job_whose_results_are_gone_is_said_lost_once_and_its_items_sent_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # The cron paused over a long weekend: the API deleted the job's results file (it keeps them 48 hours).
    # The answers are lost; waiting for them would leave the items undone for ever, with every run exiting 0.
    import anyio

    job = sku_job(tmp_path, monkeypatch, CONFIG, 3, model=MODEL)
    app = sim(batch_latency_s=0.3)
    with run_in_thread(app=app) as url:
        assert cli(job, url, "--no-wait") == 0
        time.sleep(0.6)
        (first,) = jobs(app)
        anyio.run(app.state.batches._advance, first)  # done, its answers given (and billed)
        app.state.batches.files.remove(first.output_file.removeprefix("files/"))
        capsys.readouterr()
        argv = ["run", str(job), "--base-url", url, "--out", str(tmp_path / "out"), "--tier", "batch"]
        prom = tmp_path / "job.prom"
        assert main([*argv, "--config", str(tmp_path / "nanobatch.yaml"), "--metrics-file", str(prom)]) == 0
    assert "can no longer be read" in capsys.readouterr().err
    assert {r["status"] for r in records(tmp_path / "out")} == {"ok"} and len(records(tmp_path / "out")) == 3
    assert billed(app) == 6 and len(jobs(app)) == 2  # paid again: unavoidable once the answers are gone
    assert "nanobatch_last_success_timestamp_seconds{" in prom.read_text()  # a clean night: a success


def test_answers_landed_by_an_earlier_run_are_not_collected_again_by_force(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # sku-0's image could not be written, so its chunk is kept; sku-1 and sku-2 were landed from it. A later
    # --force must send those two again, not hand their old answers back (nor count their cost twice).
    job = sku_job(tmp_path, monkeypatch, CONFIG, 3, model=MODEL)
    out = tmp_path / "out"
    app = sim(batch_latency_s=0.3)
    with run_in_thread(app=app) as url:
        assert cli_while_a_users_file_appears(job, url, "sku-0.png") == 1
        (out / "sku-0.png").unlink()
        assert cli(job, url, "--force") == 0
    latest = {r["id"]: r for r in records(out)}
    first_job = jobs(app)[0].name
    assert latest["sku-1"]["batch"] != first_job and latest["sku-2"]["batch"] != first_job  # sent again
    assert billed(app) == 5  # sku-0's unwritten answer used once; sku-1 and sku-2 paid for again, as forced


def test_an_answer_no_run_asked_for_is_let_go_once_it_is_older_than_the_keeping_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The same night without sku-0, but its answer was collected more than 14 days before: the results file is
    # deleted (disk is not held for ever for a row a catalog dropped), and sku-0 is paid for again if it returns.
    import nanobatch.run.batch.chunks

    job = sku_job(tmp_path, monkeypatch, CONFIG, 3, model=MODEL)
    app = sim(batch_latency_s=0.5)
    with run_in_thread(app=app) as url:
        night_one_then_an_export_without_sku0(job, url)
        monkeypatch.setattr(nanobatch.run.batch.chunks, "KEEP_UNUSED_S", -1.0)  # any age is past it
        assert cli(job, url) == 0
        kept = sorted(p.name for p in (tmp_path / "out" / ".nanobatch-batches").iterdir())
        write_job(tmp_path, sku_items(3), model=MODEL)
        assert cli(job, url) == 0
    assert not [name for name in kept if name.endswith(".results.jsonl")]
    assert billed(app) == 4 and len(jobs(app)) == 2


# Asking about the jobs is refused (403: they were made, and will be billed), or making them is answered 503
# through every attempt (a job may or may not exist): the items are neither done nor failed (a retry could pay
# twice). A cron line that waits must not read exit 0 (and a metrics file no "last success") that night; the
# next night collects or makes the jobs, and each request is paid once.
REFUSALS = {
    "get": ApiError("403 PERMISSION_DENIED: the caller cannot read this batch", kind="forbidden", status_code=403),
    "create": ApiError("503 UNAVAILABLE: the service is busy", kind="unavailable", status_code=503, retryable=True),
}


@pytest.mark.parametrize("refused", list(REFUSALS), ids=["jobs it cannot read", "jobs it cannot make"])
def test_a_run_that_waits_but_cannot_follow_its_jobs_ends_exit_1_and_the_next_night_pays_each_request_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], refused: str
) -> None:
    from nanobatch.api.batch_api import BatchClient

    job = one_step_job(tmp_path, monkeypatch)
    app = sim(batch_latency_s=0.5)
    real = getattr(BatchClient, refused)

    async def refuse(self: BatchClient, *args: Any, **kwargs: Any) -> Any:
        raise REFUSALS[refused]

    with run_in_thread(app=app) as url:
        monkeypatch.setattr(BatchClient, refused, refuse)
        assert cli(job, url) == 1
        assert "6 requests are left in batch jobs this run could not follow to their end" in capsys.readouterr().err
        if refused == "create":
            assert not (job.parent / "out" / "results.jsonl").exists() or records(job.parent / "out") == []
        monkeypatch.setattr(BatchClient, refused, real)
        assert cli(job, url) == 0  # the next night collects them (or makes their jobs)
    assert len(records(job.parent / "out")) == 6 and billed(app) == 6 and len(jobs(app)) == 2
