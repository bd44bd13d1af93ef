"""End to end through run_job with a scripted fake API (httpx2.MockTransport), on trio's virtual clock."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest

import nanobatch
import nanobatch.output.outdir
import nanobatch.output.writer
from nanobatch.api.gemini import Image
from nanobatch.errors import ConfigError, LockHeld, ManifestError
from nanobatch.output.lock import RunLock
from nanobatch.output.record import ItemRecord

from .conftest import run_virtual
from .fakes import (
    FakeGemini,
    google_error,
    image_bytes,
    inline,
    noise_bytes,
    ok_body,
    quota_failure,
    records,
    retry_info,
    run,
    write_job,
)


def test_edits_are_saved_with_a_record_each(tmp_path: Path) -> None:
    job = write_job(tmp_path, [{"id": "sku-1", "image": "images/a.png"}, {"id": "sku-2", "image": "images/b.png"}])
    summary = run(job, FakeGemini())
    out = tmp_path / "out"
    assert summary.exit_code == 0
    assert sorted(p.name for p in out.glob("*.png")) == ["sku-1.png", "sku-2.png"]
    recs = {r["id"]: r for r in records(out)}
    rec = recs["sku-1"]
    assert rec["status"] == "ok" and rec["outputs"] == ["sku-1.png"] and rec["error"] is None
    assert rec["usage"]["totalTokenCount"] == 2432 and rec["attempts"] == 1 and rec["finish_reason"] == "STOP"
    assert rec["key"].startswith("sha256:") and rec["model"] == "gemini-nano-banana-2.1"
    assert rec["cost_usd"] > 0 and rec["started_at"].endswith("Z") and rec["finished_at"].endswith("Z")
    summary_file = json.loads((out / "summary.json").read_text())
    assert summary_file["counts"] == {"ok": 2, "failed": 0, "blocked": 0, "rejected": 0}
    assert summary_file["tokens"]["totalTokenCount"] == 2 * 2432


def test_a_thinking_image_is_not_taken_for_the_result(tmp_path: Path) -> None:
    draft, final = image_bytes((0, 0, 255)), image_bytes((0, 255, 0), fmt="JPEG")
    body = ok_body({"text": "planning", "thought": True}, inline(draft, thought=True), inline(final, "image/jpeg"))
    job = write_job(tmp_path, [{"id": "hero", "image": "images/a.png"}])
    run(job, FakeGemini({"make the background white": [body]}))
    out = tmp_path / "out"
    assert [p.name for p in out.glob("hero*")] == ["hero.jpg"]
    assert (out / "hero.jpg").read_bytes() == final


def test_several_images_are_numbered(tmp_path: Path) -> None:
    body = ok_body(inline(image_bytes()), inline(image_bytes(fmt="JPEG"), "image/jpeg"))
    job = write_job(tmp_path, [{"id": "pair", "image": "images/a.png"}])
    run(job, FakeGemini({"make the background white": [body]}))
    assert records(tmp_path / "out")[0]["outputs"] == ["pair-1.png", "pair-2.jpg"]
    assert (tmp_path / "out" / "pair-2.jpg").exists()


def test_request_carries_instruction_images_and_settings(tmp_path: Path) -> None:
    job = write_job(
        tmp_path,
        [{"id": "x", "images": ["images/a.png", "images/b.png"], "aspect_ratio": "16:9", "image_size": "2K"}],
    )
    fake = FakeGemini()
    run(job, fake)
    body = json.loads(fake.requests[0].content)
    parts = body["contents"][0]["parts"]
    assert parts[0] == {"text": "make the background white"}
    assert [p["inlineData"]["mimeType"] for p in parts[1:]] == ["image/png", "image/png"]
    assert body["generationConfig"]["imageConfig"] == {"aspectRatio": "16:9", "imageSize": "2K"}
    assert fake.requests[0].url.path == "/v1beta/models/gemini-nano-banana-2.1:generateContent"


@pytest.mark.parametrize(
    ("answers", "status", "attempts", "kind"),
    [
        pytest.param(
            [google_error(503, "UNAVAILABLE", "The model is overloaded"), ok_body()], "ok", 2, None, id="503-then-ok"
        ),
        pytest.param(
            [httpx2.Response(502, text="<html><title>502 Bad Gateway</title></html>"), ok_body()],
            "ok",
            2,
            None,
            id="proxy-html-502-then-ok",
        ),
        pytest.param(
            [google_error(400, "INVALID_ARGUMENT", "Unsupported image")],
            "failed",
            1,
            "bad_request",
            id="400-fails-without-retry",
        ),
        pytest.param([ok_body({"text": "I can't"}, finish="IMAGE_SAFETY")], "blocked", 1, "blocked", id="image-safety"),
        pytest.param(
            [{"promptFeedback": {"blockReason": "PROHIBITED_CONTENT"}}], "blocked", 1, "blocked", id="prompt-blocked"
        ),
        pytest.param(
            [ok_body({"text": "Here is a description instead"})],
            "failed",
            3,
            "no_image",
            id="text-only-retried-then-failed",
        ),
        pytest.param([google_error(500, "INTERNAL", "boom")], "failed", 6, "server_error", id="500-until-max-attempts"),
        pytest.param(
            [ok_body(inline(bytes(range(250)) * 20)), ok_body()], "ok", 2, None, id="undecodable-image-then-ok"
        ),
        pytest.param(
            [ok_body(inline(noise_bytes(fmt="JPEG")[:900], "image/jpeg"))],
            "failed",
            3,
            "bad_image",
            id="jpeg-cut-short-retried-then-failed",
        ),
    ],
)
def test_outcomes_by_answer(tmp_path: Path, answers: list[Any], status: str, attempts: int, kind: str | None) -> None:
    job = write_job(tmp_path, [{"id": "one", "image": "images/a.png"}])
    summary = run(job, FakeGemini({"make the background white": answers}))
    rec = records(tmp_path / "out")[0]
    assert (rec["status"], rec["attempts"]) == (status, attempts)
    assert (rec["error"] or {}).get("kind") == kind
    assert summary.exit_code == (0 if status == "ok" else 1)
    assert [p.name for p in (tmp_path / "out").glob("one.*")] == (["one.png"] if status == "ok" else [])


def test_failures_keep_the_model_text_and_the_api_message(tmp_path: Path) -> None:
    job = write_job(
        tmp_path,
        [{"id": "a", "image": "images/a.png", "instruction": "talk"}, {"id": "b", "instruction": "bad"}],
    )
    fake = FakeGemini(
        {
            "talk": [ok_body({"text": "I cannot edit people"}, finish="IMAGE_OTHER")],
            "bad": [google_error(400, "INVALID_ARGUMENT", "Request contains an invalid argument.")],
        }
    )
    run(job, fake)
    recs = {r["id"]: r for r in records(tmp_path / "out")}
    assert recs["a"]["text"] == "I cannot edit people" and recs["a"]["finish_reason"] == "IMAGE_OTHER"
    assert "invalid argument" in recs["b"]["error"]["message"] and recs["b"]["error"]["status_code"] == 400


def test_retry_waits_exactly_what_retryinfo_asks(tmp_path: Path) -> None:
    job = write_job(tmp_path, [{"id": "one", "image": "images/a.png"}])
    throttled = google_error(
        429,
        "RESOURCE_EXHAUSTED",
        "Quota exceeded",
        retry_info("45.837906927s"),
        quota_failure("GenerateRequestsPerMinutePerProjectPerModel"),
    )
    fake = FakeGemini({"make the background white": [throttled, ok_body()]})
    times: list[float] = []

    def stamp(request: httpx2.Request) -> httpx2.Response:
        times.append(anyio.current_time())
        return fake(request)

    async def go() -> nanobatch.RunSummary:
        return await nanobatch.run_job(job, transport=httpx2.MockTransport(stamp), out_dir=tmp_path / "out")

    summary = run_virtual(go)
    assert summary.exit_code == 0
    assert len(times) == 2
    assert times[1] - times[0] == pytest.approx(45.837906927, abs=0.01)


@pytest.mark.parametrize(
    "fatal",
    [
        pytest.param(google_error(401, "UNAUTHENTICATED", "API key not valid"), id="401"),
        pytest.param(google_error(403, "PERMISSION_DENIED", "no access"), id="403"),
        pytest.param(google_error(404, "NOT_FOUND", "models/x is not found"), id="404"),
        pytest.param(
            httpx2.Response(
                402,
                json={
                    "status_code": 402,
                    "error": {"message": "insufficient balance", "type": "billing", "code": "402"},
                },
            ),
            id="402-apiyi",
        ),
        pytest.param(
            google_error(
                429,
                "RESOURCE_EXHAUSTED",
                "Quota exceeded",
                retry_info("3600s"),
                quota_failure("GenerateRequestsPerDayPerProjectPerModel-FreeTier"),
            ),
            id="daily-429",
        ),
    ],
)
def test_fatal_answers_stop_the_run_and_leave_unsent_items_for_later(tmp_path: Path, fatal: httpx2.Response) -> None:
    items = [{"id": f"sku-{n}", "instruction": f"edit {n}"} for n in range(40)]
    job = write_job(tmp_path, items)
    fake = FakeGemini({f"edit {n}": [fatal] for n in range(40)})
    summary = run(job, fake)
    assert summary.exit_code == 3 and summary.outcome == "aborted"
    assert len(fake.requests) <= 8  # at most the requests already in flight
    out = tmp_path / "out"
    assert not (out / "results.jsonl").read_text().strip()  # nothing recorded as failed
    last_run = json.loads((out / "summary.json").read_text())["last_run"]
    assert last_run["aborted"] is True and last_run["fatal"] is not None
    # Once the problem is fixed, the next run does all the work.
    summary = run(job, FakeGemini())
    assert summary.exit_code == 0 and summary.stats.ok == 40


def test_the_api_key_is_never_written_anywhere(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "AIzaSy-very-secret-key-123"
    monkeypatch.setenv("NANOBATCH_API_KEY", secret)
    job = write_job(
        tmp_path,
        [{"id": "a", "instruction": "echo"}, {"id": "b", "instruction": "fine"}, {"id": "c", "instruction": "die"}],
    )
    seen_headers: list[str] = []

    def echo(request: httpx2.Request) -> httpx2.Response:
        seen_headers.append(request.headers["authorization"])
        return google_error(400, "INVALID_ARGUMENT", f"bad key? you sent {secret}")

    fake = FakeGemini({"echo": [echo], "die": [google_error(401, "UNAUTHENTICATED", f"key {secret} rejected")]})
    with caplog.at_level(logging.DEBUG):
        run(job, fake, settings=nanobatch.load_settings(overrides={"limits.concurrency": 1}))  # a, b, then c
    assert seen_headers == [f"Bearer {secret}"]  # it was used...
    for path in (tmp_path / "out").rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path  # ...and written nowhere
    assert secret not in caplog.text


def test_rerun_skips_done_work_and_redoes_what_changed(tmp_path: Path) -> None:
    items = [{"id": "a", "image": "images/a.png"}, {"id": "b", "image": "images/b.png"}]
    job = write_job(tmp_path, items)
    run(job, FakeGemini())
    fake = FakeGemini()
    summary = run(job, fake)
    assert fake.requests == [] and summary.stats.skipped == 2 and summary.exit_code == 0

    (tmp_path / "images" / "b.png").write_bytes(image_bytes((1, 2, 3)))  # a new picture for b
    fake = FakeGemini()
    summary = run(job, fake)
    assert len(fake.requests) == 1 and summary.stats.ok == 1 and summary.stats.skipped == 1

    fake = FakeGemini()
    run(job, fake, force=True)
    assert len(fake.requests) == 2


def test_retry_failed_runs_only_failed_and_blocked_items(tmp_path: Path) -> None:
    items = [{"id": "a", "instruction": "fine"}, {"id": "b", "instruction": "bad"}, {"id": "c", "instruction": "nsfw"}]
    job = write_job(tmp_path, items)
    run(
        job,
        FakeGemini({"bad": [google_error(400, "INVALID_ARGUMENT", "no")], "nsfw": [ok_body(finish="IMAGE_SAFETY")]}),
    )
    fake = FakeGemini()
    summary = run(job, fake, retry_failed=True)
    assert sorted(fake.instructions()) == ["bad", "nsfw"] and summary.exit_code == 0


def test_a_deleted_output_is_made_again(tmp_path: Path) -> None:
    job = write_job(tmp_path, [{"id": "a", "image": "images/a.png"}])
    run(job, FakeGemini())
    (tmp_path / "out" / "a.png").unlink()
    fake = FakeGemini()
    run(job, fake)
    assert len(fake.requests) == 1 and (tmp_path / "out" / "a.png").exists()


def test_the_longest_id_the_manifest_allows_is_written_with_its_steps(tmp_path: Path) -> None:
    long_id = "sku-" + "x" * 235  # 239 bytes: the longest name the check lets through
    job = write_job(tmp_path, [{"id": long_id, "image": "images/a.png", "steps": ["one", "two"], "keep_steps": True}])
    summary = run(job, FakeGemini())
    out = tmp_path / "out"
    assert summary.stats.ok == 1
    assert records(out)[0]["outputs"] == [f"{long_id}.png"]
    assert (out / f"{long_id}.png").is_file() and (out / f"{long_id}.step1.png").is_file()


def test_an_id_too_long_for_a_file_name_sends_nothing(tmp_path: Path) -> None:
    job = write_job(tmp_path, [{"id": "a", "image": "images/a.png"}, {"id": "b" * 250, "image": "images/a.png"}])
    fake = FakeGemini()
    with pytest.raises(ManifestError, match="250 bytes long"):
        run(job, fake)
    assert fake.requests == []


def test_a_bad_manifest_sends_nothing(tmp_path: Path) -> None:
    job = write_job(tmp_path, [{"id": "a", "image": "images/a.png"}, {"id": "b", "image": "images/missing.png"}])
    (tmp_path / "images" / "missing.png").unlink(missing_ok=True)
    text = job.read_text().replace("images/missing.png", "images/nope.png")
    job.write_text(text)
    fake = FakeGemini()
    with pytest.raises(ManifestError) as err:
        run(job, fake)
    assert "item 'b'" in str(err.value) and "image" in str(err.value) and "nope.png" in str(err.value)
    assert fake.requests == [] and not (tmp_path / "out").exists()


def test_no_key_is_a_config_error_before_anything_happens(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NANOBATCH_API_KEY")
    job = write_job(tmp_path, [{"id": "a", "instruction": "x"}])
    with pytest.raises(ConfigError, match="NANOBATCH_API_KEY"):
        anyio.run(lambda: nanobatch.run_job(job, out_dir=tmp_path / "out"))


def test_a_second_run_on_the_same_folder_is_refused(tmp_path: Path) -> None:
    job = write_job(tmp_path, [{"id": "a", "instruction": "x"}])
    out = tmp_path / "out"

    async def go() -> None:
        async with RunLock(out):
            await nanobatch.run_job(job, transport=FakeGemini().transport, out_dir=out)

    with pytest.raises(LockHeld, match=r"pid \d+"):
        anyio.run(go)


def test_a_lock_knows_whether_it_waited_for_another_run(tmp_path: Path) -> None:
    """What a run that found every item done looks at again depends on it (run.runner._all_done)."""
    out = tmp_path / "out"

    async def go() -> tuple[bool, bool]:
        first, waiting = RunLock(out), RunLock(out, wait=True, poll_s=0.01)
        await first.__aenter__()
        async with anyio.create_task_group() as tg:
            tg.start_soon(waiting.__aenter__)  # it finds the folder held, and polls
            await anyio.sleep(0.05)
            await first.__aexit__(None, None, None)
        await waiting.__aexit__(None, None, None)
        return first.waited, waiting.waited

    assert anyio.run(go) == (False, True)


def test_multi_step_items_chain_outputs_and_sum_usage(tmp_path: Path) -> None:
    first, second = image_bytes((10, 10, 10)), image_bytes((250, 250, 250))
    job = write_job(tmp_path, [{"id": "hero", "image": "images/a.png", "steps": ["one", "two"], "keep_steps": True}])
    fake = FakeGemini({"one": [ok_body(inline(first))], "two": [ok_body(inline(second))]})
    run(job, fake)
    second_request = json.loads(fake.requests[1].content)
    sent = second_request["contents"][0]["parts"][1]["inlineData"]["data"]
    import base64

    assert base64.b64decode(sent) == first  # step two edits step one's output
    rec = records(tmp_path / "out")[0]
    assert rec["outputs"] == ["hero.png"] and (tmp_path / "out" / "hero.png").read_bytes() == second
    assert [s["instruction"] for s in rec["steps"]] == ["one", "two"]
    assert rec["usage"]["totalTokenCount"] == 2 * 2432
    assert rec["steps"][0]["outputs"] == ["hero.step1.png"] and (tmp_path / "out" / "hero.step1.png").exists()


def test_a_failed_step_fails_the_item_and_names_the_step(tmp_path: Path) -> None:
    job = write_job(tmp_path, [{"id": "hero", "instruction": None, "steps": ["one", "two"]}])
    fake = FakeGemini({"two": [google_error(400, "INVALID_ARGUMENT", "nope")]})
    run(job, fake)
    rec = records(tmp_path / "out")[0]
    assert rec["status"] == "failed" and rec["error"]["step"] == 2 and rec["outputs"] == []


@pytest.mark.parametrize(
    ("item_id", "output", "expected"),
    [
        pytest.param("sku.1001", None, "sku.1001.png", id="dotted-id"),
        pytest.param("sku.1001", "{id}", "sku.1001.png", id="dotted-id-template"),
        pytest.param("a", "{id}/final.jpg", "a/final.png", id="extension-follows-the-image"),
    ],
)
def test_output_names(tmp_path: Path, item_id: str, output: str | None, expected: str) -> None:
    item: dict[str, Any] = {"id": item_id, "instruction": "x"}
    if output:
        item["output"] = output
    job = write_job(tmp_path, [item])
    run(job, FakeGemini())
    assert records(tmp_path / "out")[0]["outputs"] == [expected]
    assert (tmp_path / "out" / expected).is_file()


def test_a_rerun_over_finished_work_reads_no_picture(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    import nanobatch.inputs.load
    import nanobatch.inputs.stamps

    job = write_job(tmp_path, [{"id": f"i{n}", "image": f"images/p{n}.png"} for n in range(5)])
    run(job, FakeGemini())
    opened: list[str] = []
    real_open, real_read_bytes = builtins.open, Path.read_bytes

    def spy_open(file: Any, *args: Any, **kwargs: Any) -> Any:
        opened.append(str(file))
        return real_open(file, *args, **kwargs)

    def spy_read_bytes(self: Path) -> bytes:
        opened.append(str(self))
        return real_read_bytes(self)

    for module in (nanobatch.inputs.load, nanobatch.inputs.stamps):  # where pictures are read, and hashed
        monkeypatch.setattr(module, "open", spy_open, raising=False)
    monkeypatch.setattr(Path, "read_bytes", spy_read_bytes)
    summary = run(job, FakeGemini())
    assert summary.stats.skipped == 5
    assert [p for p in opened if "images" in p] == []

    # Touching a file makes it be read again, but the same bytes are still the same work.
    (tmp_path / "images" / "p0.png").touch()
    import os

    os.utime(tmp_path / "images" / "p0.png", ns=(1, 1))
    fake = FakeGemini()
    summary = run(job, fake)
    assert fake.requests == [] and summary.stats.skipped == 5
    assert [p for p in opened if p.endswith("p0.png")]


def test_images_get_the_usual_file_permissions(tmp_path: Path) -> None:
    import os
    import stat

    job = write_job(tmp_path, [{"id": "a", "instruction": "x"}])
    run(job, FakeGemini())
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((tmp_path / "out" / "a.png").stat().st_mode) == 0o666 & ~umask


def test_a_server_asking_for_an_hour_stops_the_run_instead_of_waiting(tmp_path: Path) -> None:
    job = write_job(tmp_path, [{"id": f"i{n}", "instruction": f"edit {n}"} for n in range(20)])
    hour = google_error(429, "RESOURCE_EXHAUSTED", "Quota exceeded", retry_info("3600s"))
    fake = FakeGemini({f"edit {n}": [hour] for n in range(20)})
    summary = run(job, fake)
    assert summary.exit_code == 3 and "3600 s" in (summary.reason or "")
    assert len(fake.requests) <= 8 and not (tmp_path / "out" / "results.jsonl").read_text().strip()


def test_a_record_counts_only_once_its_line_is_on_disk_after_its_image(tmp_path: Path) -> None:
    job = write_job(tmp_path, [{"id": f"i{n:02d}", "image": "images/a.png"} for n in range(40)])
    out = tmp_path / "out"
    seen: list[str] = []

    class Checking(nanobatch.RunStats):
        def count(self, record: ItemRecord, earlier: Any = None) -> None:
            on_disk = {r["id"] for r in records(out)}
            assert record.id in on_disk and all((out / name).is_file() for name in record.outputs)
            seen.append(record.id)
            super().count(record, earlier)

    summary = run(
        job, FakeGemini(), stats=Checking(), settings=nanobatch.load_settings(overrides={"limits.concurrency": 8})
    )
    assert summary.stats.ok == 40 and sorted(seen) == [f"i{n:02d}" for n in range(40)]
    assert sorted(r["id"] for r in records(out)) == sorted(seen) and not list(out.glob(".*.tmp"))


def test_a_failing_disk_stops_the_run_keeping_what_was_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import nanobatch.output.outdir

    job = write_job(tmp_path, [{"id": f"i{n:02d}", "image": "images/a.png"} for n in range(30)])
    real_write = nanobatch.output.outdir.write_image
    writes = 0

    def failing_write(path: str, data: bytes, **options: Any) -> None:
        nonlocal writes
        writes += 1
        if writes > 10:
            raise OSError(28, "No space left on device")
        real_write(path, data, **options)

    monkeypatch.setattr(nanobatch.output.outdir, "write_image", failing_write)
    fake = FakeGemini()
    # An aborted run, as a budget ends one: its reason the writer's error itself.
    summary = run(job, fake, settings=nanobatch.load_settings(overrides={"limits.concurrency": 4}))
    assert summary.outcome == "aborted" and summary.exit_code == 3 and "No space left on device" in str(summary.reason)
    out = tmp_path / "out"
    kept = records(out)
    assert len(kept) == 10 and all((out / r["outputs"][0]).is_file() for r in kept)
    # The items answered but not saved are named, so the operator knows what was paid for twice.
    (lost,) = [r.getMessage() for r in caplog.records if "could not be saved" in r.getMessage()]
    named = set(lost.split(": ", 1)[1].split(", "))
    assert not named & {r["id"] for r in kept} and len(named) + len(kept) == len(fake.requests)


def test_spare_workers_never_put_more_than_the_concurrency_limit_in_flight(tmp_path: Path) -> None:
    job = write_job(tmp_path, [{"id": f"i{n:02d}", "image": "images/a.png"} for n in range(60)])
    in_flight = peak = 0

    async def slow_api(request: httpx2.Request) -> httpx2.Response:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await anyio.sleep(1.0)
        in_flight -= 1
        return httpx2.Response(200, json=ok_body())

    summary = run_virtual(
        lambda: nanobatch.run_job(
            job,
            settings=nanobatch.load_settings(overrides={"limits.concurrency": 8}),
            transport=httpx2.MockTransport(slow_api),
            out_dir=tmp_path / "out",
        ),
        settle_s=0.005,  # let the input reads finish before the virtual clock jumps
    )
    # At most the limit (the guarantee); reaching it needs the threads to keep up with the virtual clock.
    assert summary.stats.ok == 60 and 1 < peak <= 8


def test_an_image_folder_is_fsynced_before_the_record_pointing_at_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A rename is durable only once its folder is: otherwise a power cut can keep a record whose image is gone.
    events: list[tuple[str, str]] = []
    real_fsync_dir, real_append = nanobatch.output.writer.fsync_dir, nanobatch.output.outdir.ResultsLog.append_many

    def fsync_dir(folder: str) -> None:
        events.append(("folder", Path(folder).name))
        real_fsync_dir(folder)

    def append_many(self: nanobatch.output.outdir.ResultsLog, batch: list[ItemRecord]) -> None:
        events.extend(("record", record.id) for record in batch)
        real_append(self, batch)

    monkeypatch.setattr(nanobatch.output.writer, "fsync_dir", fsync_dir)
    monkeypatch.setattr(nanobatch.output.outdir.ResultsLog, "append_many", append_many)
    job = write_job(tmp_path, [{"id": "sku-1", "image": "images/a.png", "output": "shoes/{id}.png"}])
    assert run(job, FakeGemini()).exit_code == 0
    assert events == [("folder", "shoes"), ("record", "sku-1")]


@pytest.mark.parametrize(
    "extra", [{}, {"model": "gemini-3-pro-image", "steps": ["crop it", "make the background white"]}],
    ids=["flash", "pro-two-steps"],
)  # fmt: skip
def test_answers_dearer_than_the_estimate_do_not_take_the_run_over_its_cost_cap(
    tmp_path: Path, extra: dict[str, Any]
) -> None:
    # Each answer thinks for 30,000 tokens: $0.158 a request, twice the table's worst case for 1K (on flash).
    usage = {"promptTokenCount": 1312, "candidatesTokenCount": 1120, "thoughtsTokenCount": 30000}
    fake = FakeGemini({text: [ok_body(usage=usage)] for text in ["make the background white", "crop it"]})
    job = write_job(tmp_path, [{"id": f"i{n}", "image": f"images/{n}.png", **extra} for n in range(10)])
    settings = nanobatch.load_settings(overrides={"limits.concurrency": 1, "budget.max_cost_usd": 0.55})
    summary = run(job, fake, settings=settings)
    spent = json.loads((tmp_path / "out" / "summary.json").read_text())["last_run"]["spent_usd"]
    assert summary.exit_code == 3 and 0.3 < spent <= 0.55


@pytest.mark.parametrize(
    "usage",
    [
        pytest.param(None, id="stripped by a proxy"),
        pytest.param({"totalTokenCount": 2992}, id="partial"),
        pytest.param({"promptTokenCount": -1312, "candidatesTokenCount": -1120000}, id="negative"),
        pytest.param({"promptTokenCount": "1312", "candidatesTokenCount": "1120"}, id="strings"),
    ],
)
def test_answers_whose_usage_cannot_be_priced_count_at_the_worst_case_and_the_budget_holds(
    tmp_path: Path, usage: dict[str, Any] | None, caplog: pytest.LogCaptureFixture
) -> None:
    body = ok_body()
    if usage is None:
        del body["usageMetadata"]
    else:
        body["usageMetadata"] = usage
    fake = FakeGemini({"make the background white": [body]})
    job = write_job(tmp_path, [{"id": f"i{n}", "image": f"images/{n}.png"} for n in range(6)])
    settings = nanobatch.load_settings(overrides={"limits.concurrency": 1, "budget.max_cost_usd": 0.1})
    with caplog.at_level(logging.WARNING, logger="nanobatch"):
        summary = run(job, fake, settings=settings)
    records = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert summary.exit_code == 3  # the budget stopped the run: answers were not free
    assert 0 < len(fake.requests) < 6
    assert all(r["cost_usd"] > 0.02 for r in records)  # the worst case of a 1K edit, not $0 (or less)
    spent = json.loads((tmp_path / "out" / "summary.json").read_text())["last_run"]["spent_usd"]
    assert 0 < spent <= 0.1
    told = [r.getMessage() for r in caplog.records if "worst case" in r.getMessage()]
    assert len(told) == 1 and "usageMetadata" in told[0]


def test_peak_memory_with_big_answers_does_not_grow_with_the_number_of_requests(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Answers of 1 MB at concurrency 4, the writer's queue cut to 4 MB so that it fills early: 16 requests and
    # 64 peak alike, within about 3x the answers in flight (base64 body, decoded image) plus the queue.
    import tracemalloc

    body = json.dumps(ok_body(inline(noise_bytes((578, 578))))).encode()  # a real 1 MB PNG

    class Big(FakeGemini):
        def __call__(self, request: httpx2.Request) -> httpx2.Response:
            return httpx2.Response(200, content=body, headers={"content-type": "application/json"})

    monkeypatch.setattr(nanobatch.output.writer, "WRITE_QUEUE_BYTES", 4 * 1024 * 1024)
    settings = nanobatch.load_settings(overrides={"limits.concurrency": 4})
    jobs = {n: write_job(tmp_path / str(n), [{"id": f"i{k}", "instruction": "a lemon"} for k in range(n)])
            for n in (4, 16, 64)}  # fmt: skip
    run(jobs[4], Big(), settings=settings)  # untraced: lazy imports and one-off caches count in neither run
    peaks = {}
    for n in (16, 64):
        tracemalloc.start()
        try:
            assert run(jobs[n], Big(), settings=settings).stats.ok == n
            peaks[n] = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert peaks[64] - peaks[16] < len(body), peaks  # less than one more answer
    assert peaks[64] < 3 * 4 * len(body) + 4 * 1024 * 1024 + 4_000_000, peaks


class BigAnswers(FakeGemini):
    """Answers every request with the same real ~1 MB PNG, keeping no request (FakeGemini keeps them all). The
    body comes in pieces, letting the other tasks run between them, as a socket's does: answers read at once
    overlap, as they do over a network."""

    def __init__(self) -> None:
        super().__init__()
        self.body = json.dumps(ok_body(inline(noise_bytes((578, 578))))).encode()
        self.count = 0

    def __call__(self, request: httpx2.Request) -> httpx2.Response:
        self.count += 1
        headers = {"content-type": "application/json", "content-length": str(len(self.body))}
        return httpx2.Response(200, headers=headers, stream=_Pieces(self.body))


class _Pieces(httpx2.AsyncByteStream):
    def __init__(self, body: bytes) -> None:
        self.body = body

    async def __aiter__(self) -> Any:
        for at in range(0, len(self.body), 256 * 1024):
            await anyio.lowlevel.checkpoint()
            yield self.body[at : at + 256 * 1024]


def _disk_slower_than_the_api(monkeypatch: pytest.MonkeyPatch, *, then_s: float = 0.0) -> None:
    """Every batch the writer flushes waits until all the run's tasks wait (then *then_s* more of the virtual
    clock): whatever the machine's speed, answers come back faster than they are written. (A disk slowed by a
    timed sleep was not: under coverage the workers no longer outran it, and an unbounded queue passed.)"""
    import anyio.from_thread
    import trio.testing

    from . import conftest

    monkeypatch.setattr(conftest, "INLINE_THREADS", False)  # the writer's thread waits for the loop's tasks
    real_fsync = nanobatch.output.writer.fsync_dir

    def slow_disk(folder: str) -> None:
        anyio.from_thread.run(trio.testing.wait_all_tasks_blocked, 0.01)
        if then_s:
            anyio.from_thread.run(anyio.sleep, then_s)
        real_fsync(folder)

    monkeypatch.setattr(nanobatch.output.writer, "fsync_dir", slow_disk)


def _peaks_by_concurrency(
    folder: Path, monkeypatch: pytest.MonkeyPatch, concurrencies: tuple[int, int], n: int,
    overrides: dict[str, Any] | None = None, **top: Any,
) -> dict[int, int]:  # fmt: skip
    """Traced peak memory of a run of *n* items answered by :class:`BigAnswers` at each concurrency, with the
    writer's queue at 2 MB and the byte budget at two answers; *overrides*: more settings; *top*: the
    manifest's other top-level keys."""
    import tracemalloc

    import nanobatch.api.client

    monkeypatch.setattr(nanobatch.output.writer, "WRITE_QUEUE_BYTES", 2 * 2**20)
    monkeypatch.setattr(nanobatch.api.client, "ANSWER_BYTES", 3 * 2**20)  # two bodies read at once
    monkeypatch.setattr(nanobatch.api.client, "BACKLOG_WAIT_S", math.inf)  # the clock jumps while all wait
    fake = BigAnswers()
    run(write_job(folder / "warm-up", [{"id": "w", "instruction": "a lemon"}], **top), fake)  # one-off caches
    peaks = {}
    for concurrency in concurrencies:
        settings = nanobatch.load_settings(overrides={"limits.concurrency": concurrency, **(overrides or {})})
        items = [{"id": f"i{k}", "instruction": "a lemon"} for k in range(n)]
        job = write_job(folder / str(concurrency), items, **top)
        tracemalloc.start()
        try:
            assert run(job, fake, settings=settings, settle_s=0.01).stats.ok == n
            peaks[concurrency] = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    return peaks


def test_with_the_writer_behind_answers_wait_unread_so_memory_does_not_grow_with_the_concurrency(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The writer's queue is full and the workers wait to hand it their images: an answer read then would wait
    # in memory as well, one per request in flight. It is left in its socket until the writer has room, so 32
    # requests in flight peak as 4 do: 0.65 MB more here, where it was 31 MB (28 more images of 1 MB).
    _disk_slower_than_the_api(monkeypatch)
    peaks = _peaks_by_concurrency(tmp_path, monkeypatch, (4, 32), 64)
    assert peaks[32] - peaks[4] < 6 * 2**20, peaks  # fewer than 6 more images


def test_with_the_output_checks_behind_answers_wait_unread_so_memory_does_not_grow_with_the_concurrency(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The same with the checks behind the API (each waits until the whole run waits): the images waiting for
    # their checks count toward the writer's queue, so 64 requests in flight peak as 16 do (both more than the
    # queue, the byte budget and the images checked at once hold), where each held its decoded image.
    _checks_slower_than_the_api(monkeypatch, refuse_every=0)
    peaks = _peaks_by_concurrency(tmp_path, monkeypatch, (16, 64), 128, qa={"min_side": 8})
    assert peaks[64] - peaks[16] < 6 * 2**20, peaks  # fewer than 6 more images


def test_with_the_uploads_behind_answers_wait_unread_so_memory_does_not_grow_with_the_concurrency(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The same with output.upload_to behind the API (each PUT waits until the whole run waits): the images an
    # item holds while its upload runs count toward the writer's queue too.
    import trio.testing

    import nanobatch.api.storage

    from . import conftest

    monkeypatch.setattr(conftest, "INLINE_THREADS", False)  # each PUT's thread waits for the loop's tasks
    put: list[str] = []

    def slow_put(url: str, data: bytes, **options: object) -> nanobatch.api.storage.ObjectStamp:
        anyio.from_thread.run(trio.testing.wait_all_tasks_blocked, 0.01)  # in a worker thread, as storage.put runs
        put.append(url)
        return nanobatch.api.storage.ObjectStamp(url, len(data), '"etag"')

    monkeypatch.setattr(nanobatch.api.storage, "check_bucket", lambda url: None)
    monkeypatch.setattr(nanobatch.api.storage, "exists_many", lambda urls, **_: dict.fromkeys(urls, False))
    monkeypatch.setattr(nanobatch.api.storage, "stat_many", lambda urls, **_: dict.fromkeys(urls))
    monkeypatch.setattr(nanobatch.api.storage, "put", slow_put)
    peaks = _peaks_by_concurrency(tmp_path, monkeypatch, (16, 64), 128, {"output.upload_to": "s3://catalog/edited/"})
    assert len(put) == 2 * 128  # every image of both runs
    assert peaks[64] - peaks[16] < 6 * 2**20, peaks  # fewer than 6 more images


def test_images_refused_by_slow_checks_are_sent_again_while_the_queue_is_full(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every third image is refused and sent again while the checks are behind and the queue full: an item
    # waiting for its second answer counts nothing toward the queue, or every item would wait for the others'
    # images to be written, and the run would never end.
    monkeypatch.setattr(nanobatch.output.writer, "WRITE_QUEUE_BYTES", 2 * 2**20)
    checked = _checks_slower_than_the_api(monkeypatch, refuse_every=3)
    fake = BigAnswers()
    # A run that waits for itself would hang; the time limit (of the virtual clock) ends it as "aborted" instead.
    settings = nanobatch.load_settings(overrides={"limits.concurrency": 32, "limits.max_duration_s": 3600})
    items = [{"id": f"i{k}", "instruction": "a lemon"} for k in range(64)]
    job = write_job(tmp_path, items, qa={"min_side": 8, "retries": 2})
    # settle_s: the clock jumps to that limit only once every task has waited 0.5 s of real time, not while a
    # slow machine's writer thread works
    summary = run(job, fake, settings=settings, settle_s=0.5)
    assert summary.outcome == "complete", summary.reason
    assert summary.stats.ok + summary.stats.rejected == 64 and fake.count == len(checked) > 64


def _checks_slower_than_the_api(monkeypatch: pytest.MonkeyPatch, *, refuse_every: int) -> list[int]:
    """Each output check waits until the whole run waits (then refuses every *refuse_every*-th image, if not 0);
    returns the list that counts them."""
    import trio.testing

    from nanobatch.output.verdicts import Checker
    from nanobatch.qa import Verdict

    checked: list[int] = []

    async def slow_check(self: Checker, images: list[Image], **options: Any) -> Verdict:
        await trio.testing.wait_all_tasks_blocked(0.01)
        checked.append(1)
        refused = bool(refuse_every) and len(checked) % refuse_every == 0
        return Verdict(passed=not refused, failed=("min_side",) if refused else ())

    monkeypatch.setattr(Checker, "check", slow_check)
    return checked


def test_an_answer_waits_unread_for_the_writer_no_longer_than_the_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A response left unread for long may be dropped by the server or a proxy, and the request sent again is paid
    # again: past BACKLOG_WAIT_S (here 5 s) an answer is read whatever waits for the writer (each flush 100 s).
    import nanobatch.api.client

    monkeypatch.setattr(nanobatch.api.client, "BACKLOG_WAIT_S", 5.0)
    monkeypatch.setattr(nanobatch.output.writer, "WRITE_QUEUE_BYTES", 2 * 2**20)
    _disk_slower_than_the_api(monkeypatch, then_s=100)
    waits: list[float] = []
    body = BigAnswers().body

    class Timed(httpx2.AsyncByteStream):
        def __init__(self) -> None:
            self.answered = anyio.current_time()

        async def __aiter__(self) -> Any:
            waits.append(anyio.current_time() - self.answered)
            yield body

    def answer(request: httpx2.Request) -> httpx2.Response:
        headers = {"content-type": "application/json", "content-length": str(len(body))}
        return httpx2.Response(200, headers=headers, stream=Timed())

    settings = nanobatch.load_settings(overrides={"limits.concurrency": 8})
    job = write_job(tmp_path, [{"id": f"i{k}", "instruction": "a lemon"} for k in range(16)])
    summary = run(job, FakeGemini({"a lemon": [answer]}), settings=settings, settle_s=0.01)
    assert summary.stats.ok == 16 and len(waits) == 16
    assert max(waits) > 4  # some did wait for the writer...
    assert max(waits) < 6  # ...and none longer than the limit (a flush takes 100 s)


@pytest.mark.parametrize("budget", [None, 3 * 2**20], ids=["room-for-all", "room-for-two-answers"])
def test_an_answer_kept_unread_by_a_slow_disk_is_not_timed_out_and_paid_for_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, budget: int | None
) -> None:
    # Each flush takes 100 s of the clock, the requests' time limit is 30 s: the answers waiting for the writer
    # wait outside it, and every item is sent once. The variation: a byte budget for two answers, so that the
    # others wait for it behind the two that wait for the writer; that wait is outside the time limit too.
    import nanobatch.api.client

    if budget is not None:
        monkeypatch.setattr(nanobatch.api.client, "ANSWER_BYTES", budget)
    monkeypatch.setattr(nanobatch.output.writer, "WRITE_QUEUE_BYTES", 2 * 2**20)
    _disk_slower_than_the_api(monkeypatch, then_s=100)
    fake = BigAnswers()
    settings = nanobatch.load_settings(overrides={"limits.concurrency": 8, "api.timeout_s": 30})
    job = write_job(tmp_path, [{"id": f"i{k}", "instruction": "a lemon"} for k in range(16)])
    summary = run(job, fake, settings=settings, settle_s=0.01)
    assert summary.stats.ok == 16 and fake.count == 16
    assert all(r["attempts"] == 1 for r in records(tmp_path / "out"))


def test_answers_kept_unread_by_a_slow_disk_are_read_and_kept_when_the_run_stops_within_its_grace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The time limit comes at 25 s, with 30 s of grace; the writer's next flush ends at 100 s. The answers kept
    # unread meanwhile were paid for: at the stop they are read (and wait for the writer, as finished work
    # does), so each answer the server gave has its record, and none is left to be paid for again.
    monkeypatch.setattr(nanobatch.output.writer, "WRITE_QUEUE_BYTES", 2 * 2**20)
    _disk_slower_than_the_api(monkeypatch, then_s=100)
    fake = BigAnswers()
    settings = nanobatch.load_settings(
        overrides={"limits.concurrency": 8, "limits.max_duration_s": 25, "limits.grace_s": 30}
    )
    job = write_job(tmp_path, [{"id": f"i{k}", "instruction": "a lemon"} for k in range(40)])
    summary = run(job, fake, settings=settings, settle_s=0.01)
    assert summary.outcome == "aborted" and "time limit" in (summary.reason or "")
    answered = records(tmp_path / "out")
    assert 8 < fake.count < 40  # answers did wait for the writer, and the stop came before the end
    assert len(answered) == fake.count and all(r["status"] == "ok" for r in answered)


def test_small_results_waiting_for_the_writer_are_bounded_in_number() -> None:
    from nanobatch.output.writer import Finished, WriteQueue

    async def main() -> None:
        queue = WriteQueue(32 * 1024 * 1024, 8)  # 32 MB would hold 27,000 records of small answers
        accepted = 0

        async def worker() -> None:
            nonlocal accepted
            for n in range(20):
                image = Image("image/png", b"x" * 150)
                await queue.put(Finished(ItemRecord(id=f"i{n}", status="ok"), [(f"i{n}.png", image)]))
                accepted += 1

        async with anyio.create_task_group() as tg:
            tg.start_soon(worker)
            await anyio.sleep(1)
            assert accepted == 8  # the writer is behind: the worker waits instead of piling records up
            batch = await queue.take()
            queue.written(batch)
            await anyio.sleep(1)
            assert accepted == 16
            queue.written(await queue.take())
            await anyio.sleep(1)
            queue.written(await queue.take())

    run_virtual(main)


def catalog_job(folder: Path, n: int) -> Path:
    """A manifest whose *n* items come from a CSV (read as a stream), each with its own small PNG."""
    (folder / "images").mkdir(parents=True)
    for k in range(n):
        (folder / "images" / f"i{k:04d}.png").write_bytes(image_bytes((k % 256, k // 256, 90)))
    (folder / "catalog.csv").write_text("id\n" + "".join(f"i{k:04d}\n" for k in range(n)))
    job = folder / "job.yaml"
    job.write_text(
        "name: job\ndefaults:\n  instruction: make it white\n"
        "items_from:\n  - csv: catalog.csv\n    image: 'images/{id}.png'\n"
    )
    return job


class Forgetful(FakeGemini):
    """Answers every request with a small image and keeps none of them (FakeGemini keeps them all)."""

    def __call__(self, request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(200, json=ok_body())


def test_memory_per_item_stays_flat_with_a_slow_disk_and_distinct_inputs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every item has its own picture and a small answer; the disk is slower than the API. Peak memory
    # (Python's allocations, traced) must not grow with the manifest's length.
    import tracemalloc

    import nanobatch.output.outdir

    idle_s = 0.01  # as _disk_slower_than_the_api waits

    def write_image(path: str, image: Image, **options: Any) -> None:  # the flush is the slow part, not each fsync
        with open(path, "wb") as f:
            f.write(image.data)

    _disk_slower_than_the_api(monkeypatch)  # so a queue that does not make the workers wait holds the manifest
    monkeypatch.setattr(nanobatch.output.outdir, "write_image", write_image)
    monkeypatch.setattr(nanobatch.output.writer, "WRITE_QUEUE_ITEMS", 32)
    settings = nanobatch.load_settings(overrides={"limits.concurrency": 16})
    # settle_s: while every task waits for a thread, the event loop sleeps instead of polling for a clock jump
    # (nothing here sleeps on the clock); polling, it held the GIL the threads needed, for most of the time.
    peaks = {}
    # A first, untraced run: lazy imports and one-off caches must count in neither measured run.
    run(catalog_job(tmp_path / "warm-up", 20), Forgetful(), settings=settings, settle_s=idle_s)
    for n in (100, 600):
        folder = tmp_path / str(n)
        job = catalog_job(folder, n)
        tracemalloc.start()
        try:
            summary = run(job, Forgetful(), settings=settings, settle_s=idle_s)
            peaks[n] = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert summary.stats.ok == n
    per_item = (peaks[600] - peaks[100]) / 500
    # ~150-300 B/item, plainly or under coverage; a queue bounded by bytes alone holds ~4 KB/item, and that is
    # what this must catch.
    assert per_item < 1500, f"{per_item:.0f} bytes of peak memory per extra item"


PROMPT_ONLY = {"promptTokenCount": 1300, "totalTokenCount": 1300}  # Google leaves a count of 0 out


@pytest.mark.parametrize(
    ("answer", "kind"),
    [
        pytest.param(ok_body({"text": "I can't"}, finish="IMAGE_SAFETY", usage=PROMPT_ONLY), "blocked", id="blocked"),
        pytest.param(ok_body({"text": "Here is"}, usage=PROMPT_ONLY), "no_image", id="no-image"),
    ],
)
def test_an_answer_without_output_tokens_is_priced_from_its_prompt_not_at_the_worst_case(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, answer: dict[str, Any], kind: str
) -> None:
    # A blocked prompt has no candidatesTokenCount at all: priced at the worst case (30x its price), it ran a
    # night's --max-cost out early and told of "a proxy that strips usageMetadata".
    from nanobatch.costs import pricing_for, usage_cost

    job = write_job(tmp_path, [{"id": "one", "image": "images/a.png"}])
    run(job, FakeGemini({"make the background white": [answer]}))
    rec = records(tmp_path / "out")[0]
    assert rec["error"]["kind"] == kind
    each = usage_cost(PROMPT_ONLY, pricing_for(rec["model"]))  # each attempt (an answer with no image is retried)
    assert rec["cost_usd"] == pytest.approx(rec["attempts"] * each, abs=1e-6)
    assert not [r for r in caplog.records if "usageMetadata" in r.getMessage()]


def test_an_image_whose_output_tokens_are_0_is_priced_at_the_worst_case(tmp_path: Path) -> None:
    # A proxy that zeroes the count: the image was made, and paid for; priced at $0 output, it let a budget through.
    job = write_job(tmp_path, [{"id": "one", "image": "images/a.png"}])
    zero = {"promptTokenCount": 1300, "candidatesTokenCount": 0, "totalTokenCount": 1300}
    run(job, FakeGemini({"make the background white": [ok_body(usage=zero)]}))
    from nanobatch.costs import pricing_for, usage_cost

    rec = records(tmp_path / "out")[0]
    assert rec["status"] == "ok" and rec["cost_usd"] > 10 * usage_cost(zero, pricing_for(rec["model"]))


def test_answers_whose_body_broke_count_against_the_budget_at_their_worst_case(tmp_path: Path) -> None:
    # A proxy cutting 200 answers short: each was made and billed, its usage unread. Counted as $0 they were
    # retried six times each past --max-cost (30 requests sent for a $0.10 budget, "spent $0.00").
    job = write_job(tmp_path, [{"id": f"i{n}", "image": "images/a.png"} for n in range(5)])
    cut = httpx2.Response(200, content=json.dumps(ok_body())[:200].encode())
    fake = FakeGemini({"make the background white": [cut]})
    settings = nanobatch.load_settings(overrides={"budget.max_cost_usd": 0.10, "limits.concurrency": 1})

    summary = run(job, fake, settings=settings)

    spent = summary.summary["last_run"]["spent_usd"]
    assert summary.exit_code == 3 and 0 < spent <= 0.10 and len(fake.requests) < 5


@pytest.mark.parametrize("lost", [httpx2.ReadTimeout, httpx2.RemoteProtocolError], ids=["timed out", "dropped"])
def test_requests_sent_whose_answer_never_came_count_against_the_budget_at_their_worst_case(
    tmp_path: Path, lost: type[httpx2.TransportError]
) -> None:
    # Each request went out and no answer came back: the model may have made (and billed) every image. Counted
    # as $0 they were retried past --max-cost (20 requests for a $0.10 budget, "spent $0.00").
    job = write_job(tmp_path, [{"id": f"i{n}", "image": "images/a.png"} for n in range(5)])

    def never_answered(request: httpx2.Request) -> httpx2.Response:
        raise lost("no answer", request=request)

    fake = FakeGemini({"make the background white": [never_answered]})
    settings = nanobatch.load_settings(overrides={"budget.max_cost_usd": 0.10, "limits.concurrency": 1})

    summary = run(job, fake, settings=settings)

    spent = summary.summary["last_run"]["spent_usd"]
    assert summary.exit_code == 3 and 0 < spent <= 0.10 and len(fake.requests) < 10
    assert all(r["cost_usd"] == 0 for r in records(tmp_path / "out"))  # the records keep only what is known


def test_a_proxys_page_with_status_200_is_said_as_such_and_not_counted_as_a_paid_answer(tmp_path: Path) -> None:
    # A CDN's challenge page in place of the answer: no answer was made, so none is paid; its title is the message.
    job = write_job(tmp_path, [{"id": "one", "image": "images/a.png"}])
    page = httpx2.Response(200, content=b"<!DOCTYPE html><html><head><title>Just a moment...</title></head></html>")
    summary = run(job, FakeGemini({"make the background white": [page]}))
    rec = records(tmp_path / "out")[0]
    assert rec["status"] == "failed" and rec["error"]["kind"] == "bad_gateway"
    assert "Just a moment..." in rec["error"]["message"] and rec["cost_usd"] == 0
    assert summary.summary["last_run"]["spent_usd"] == 0
