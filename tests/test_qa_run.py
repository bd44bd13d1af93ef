"""Output checks in a run (``qa:``): refused answers sent again, rejected items set aside under ``rejected/``, counted,
never uploaded, and sent again by the next run; online (a scripted fake API), with the CLI and in the batch tier.

The items get their ``qa:`` settings here directly (:func:`with_qa`), whatever the manifest says: the checks are
the run's business in these tests, not the manifest's. ``min_side`` is the check used: it fails deterministically
on an answer smaller than asked for (the fake's 16 px, the simulator's 512 px).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from starlette.applications import Starlette

import nanobatch
from nanobatch.api import storage
from nanobatch.cli.main import main
from nanobatch.cli.progress import describe
from nanobatch.cli.status import folder_status
from nanobatch.costs import pricing_for, request_cost_range
from nanobatch.output.record import ItemRecord
from nanobatch.output.verdicts import check_images
from nanobatch.qa import QaSettings, Verdict
from nanobatch.run.stats import RunStats
from nanobatch.simulator import SimulatorConfig, create_app, run_in_thread

from .emulators import Emulator, new_bucket
from .fakes import (
    FakeGemini,
    image_bytes,
    inline,
    manifest_problems,
    ok_body,
    records,
    run,
    run_now,
    sku_job,
    write_job,
)

SMALL = ok_body(inline(image_bytes(size=(16, 16))))  # fails min_side 32
BIG = ok_body(inline(image_bytes(size=(64, 64))))  # passes it
CHECKED = QaSettings(min_side=32, retries=1)
EDIT = "make the background white"


def two_items(tmp_path: Path) -> Path:
    """``good`` (its instruction is answered big: it passes) and ``bad`` (answered small)."""
    items = [{"id": "good", "image": "images/g.png", "instruction": "big"}, {"id": "bad", "image": "images/b.png"}]
    return write_job(tmp_path, items)


def test_an_image_failing_its_checks_after_its_retries_is_rejected_and_set_aside(
    tmp_path: Path, with_qa: Callable[[QaSettings], None]
) -> None:
    with_qa(CHECKED)
    fake = FakeGemini({"big": [BIG], EDIT: [SMALL]})
    summary = run(two_items(tmp_path), fake)
    out = tmp_path / "out"
    recs = {r["id"]: r for r in records(out)}
    bad, good = recs["bad"], recs["good"]
    assert summary.exit_code == 1 and summary.stats.rejected == 1 and summary.stats.ok == 1
    assert bad["status"] == "rejected" and bad["outputs"] == ["rejected/bad.png"]
    assert bad["qa"]["passed"] is False and bad["qa"]["failed"] == ["min_side"]
    assert bad["qa"]["values"]["min_side"] == 16
    assert bad["error"]["kind"] == "qa" and "min_side" in bad["error"]["message"]
    assert (out / "rejected" / "bad.png").read_bytes() == image_bytes(size=(16, 16))
    assert not (out / "bad.png").exists()  # never at the folder's top
    assert good["status"] == "ok" and good["outputs"] == ["good.png"] and (out / "good.png").is_file()
    assert good["qa"] == {"passed": True, "failed": [], "values": {"width": 64, "height": 64, "min_side": 64}}
    assert not (out / "rejected" / "good.png").exists()


def test_each_retry_is_a_new_paid_request_counted_in_the_items_cost_and_attempts(
    tmp_path: Path, with_qa: Callable[[QaSettings], None]
) -> None:
    with_qa(QaSettings(min_side=32, retries=2))
    job = write_job(tmp_path, [{"id": "sku-1", "image": "images/a.png"}])
    once = run(job, FakeGemini({EDIT: [BIG]}), tmp_path / "once")  # passes at once: the price of one request
    price = records(tmp_path / "once")[0]["cost_usd"]
    fake = FakeGemini({EDIT: [SMALL, SMALL, BIG]})  # refused twice, then passes

    summary = run(job, fake)

    (record,) = records(tmp_path / "out")
    assert once.exit_code == 0 and summary.exit_code == 0 and len(fake.requests) == 3
    assert record["status"] == "ok" and record["attempts"] == 3 and record["outputs"] == ["sku-1.png"]
    assert record["cost_usd"] == pytest.approx(3 * price) and summary.stats.cost_usd == pytest.approx(3 * price)
    assert record["usage"]["totalTokenCount"] == 3 * records(tmp_path / "once")[0]["usage"]["totalTokenCount"]
    assert (tmp_path / "out" / "sku-1.png").read_bytes() == image_bytes(size=(64, 64))  # the answer that passed
    assert not (tmp_path / "out" / "rejected").exists()


def test_the_cost_cap_holds_with_retries_and_every_paid_answer_is_recorded(
    tmp_path: Path, with_qa: Callable[[QaSettings], None]
) -> None:
    with_qa(QaSettings(min_side=32, retries=3))
    job = write_job(tmp_path, [{"id": f"i{n}", "image": f"images/{n}.png"} for n in range(6)])
    run(job, FakeGemini({EDIT: [BIG]}), tmp_path / "once")
    once = records(tmp_path / "once")[0]
    price = once["cost_usd"]
    _, worst = request_cost_range(once["model"], instruction=EDIT, n_images=1, image_size=None,
                                  pricing=pricing_for(once["model"]))  # fmt: skip
    # Room for 6 requests, not 7: the cap comes in the middle of the second item's retries.
    cap = 5 * price + worst + price / 2
    fake = FakeGemini({EDIT: [SMALL]})  # every answer refused: each item would take 4 requests
    settings = nanobatch.load_settings(overrides={"limits.concurrency": 1, "budget.max_cost_usd": cap})

    summary = run(job, fake, settings=settings)

    done = records(tmp_path / "out")
    spent = json.loads((tmp_path / "out" / "summary.json").read_text())["last_run"]["spent_usd"]
    assert summary.exit_code == 3 and len(fake.requests) == 6 and spent == pytest.approx(6 * price) and spent <= cap
    assert sum(r["cost_usd"] for r in done) == pytest.approx(spent)  # nothing paid went unrecorded
    # The items stopped between their retries are recorded rejected, with what they paid for. (How the six
    # requests fall among the items is the scheduler's: an item's answer is checked off the event loop,
    # and the next item's request may take the slot meanwhile.)
    assert {r["status"] for r in done} == {"rejected"} and sum(r["attempts"] for r in done) == 6


def test_a_rejected_image_is_never_uploaded(
    gcs_env: Emulator, tmp_path: Path, with_qa: Callable[[QaSettings], None]
) -> None:
    with_qa(CHECKED)
    name = new_bucket("gs")
    settings = nanobatch.load_settings(env={}, overrides={"output.upload_to": f"gs://{name}/edited"})

    summary = run_now(two_items(tmp_path), FakeGemini({"big": [BIG], EDIT: [SMALL]}), settings=settings)

    recs = {r["id"]: r for r in records(tmp_path / "out")}
    assert summary.exit_code == 1
    assert recs["good"]["uploads"] == [f"gs://{name}/edited/good.png"] and "uploads" not in recs["bad"]
    assert storage._filesystem(f"gs://{name}").find(name) == [f"{name}/edited/good.png"]


def test_summary_status_and_the_progress_line_count_rejected_items(
    tmp_path: Path, with_qa: Callable[[QaSettings], None], capsys: pytest.CaptureFixture[str]
) -> None:
    with_qa(CHECKED)
    run(two_items(tmp_path), FakeGemini({"big": [BIG], EDIT: [SMALL]}))
    out = tmp_path / "out"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"] == {"ok": 1, "failed": 0, "blocked": 0, "rejected": 1}
    assert summary["last_run"]["rejected"] == 1 and summary["failures_by_kind"] == {"qa": 1}
    assert folder_status(out)["counts"]["rejected"] == 1
    assert main(["status", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["counts"]["rejected"] == 1
    assert main(["status", str(out)]) == 0
    assert "1 rejected by the output checks" in capsys.readouterr().out
    assert "rejected 2 ·" in describe(RunStats(ok=3, rejected=2), None)


def test_the_cli_exits_1_when_an_item_is_rejected(tmp_path: Path, with_qa: Callable[[QaSettings], None]) -> None:
    job = write_job(tmp_path, [{"id": "sku-1", "image": "images/a.png"}])
    with_qa(QaSettings(min_side=100_000, retries=0))  # more than the simulator ever answers
    assert main(["run", str(job), "--simulate", "--quiet", "--out", str(tmp_path / "out")]) == 1
    assert records(tmp_path / "out")[0]["status"] == "rejected"
    with_qa(QaSettings(min_side=64, retries=0))
    assert main(["run", str(job), "--simulate", "--quiet", "--out", str(tmp_path / "out")]) == 0


@pytest.mark.parametrize("flags", [{}, {"retry_failed": True}], ids=["rerun", "retry-failed"])
def test_the_next_run_sends_only_the_rejected_items_and_clears_what_it_set_aside(
    tmp_path: Path, with_qa: Callable[[QaSettings], None], flags: dict[str, Any]
) -> None:
    with_qa(CHECKED)
    job = two_items(tmp_path)
    run(job, FakeGemini({"big": [BIG], EDIT: [SMALL]}))
    out = tmp_path / "out"
    assert (out / "rejected" / "bad.png").is_file()

    fake = FakeGemini({"big": [BIG], EDIT: [BIG]})  # now it passes
    again = run(job, fake, **flags)

    assert again.exit_code == 0 and fake.instructions() == [EDIT]  # only the rejected item was sent
    assert again.stats.ok == 1 and again.stats.skipped == 1
    assert records(out)[-1]["id"] == "bad" and records(out)[-1]["status"] == "ok"
    assert (out / "bad.png").is_file()
    assert not (out / "rejected" / "bad.png").exists()  # nanobatch's own, out of date: deleted
    assert json.loads((out / "summary.json").read_text())["counts"]["rejected"] == 0


def test_a_file_in_rejected_that_nanobatch_did_not_write_is_never_replaced(
    tmp_path: Path, with_qa: Callable[[QaSettings], None]
) -> None:
    with_qa(CHECKED)
    job = write_job(tmp_path, [{"id": "bad", "image": "images/b.png"}])
    (tmp_path / "out" / "rejected").mkdir(parents=True)
    (tmp_path / "out" / "rejected" / "bad.png").write_bytes(b"mine")
    fake = FakeGemini({EDIT: [SMALL]})

    summary = run(job, fake)

    assert summary.exit_code == 1 and not fake.requests  # refused before anything was paid for
    assert records(tmp_path / "out")[0]["error"]["kind"] == "output_exists"
    assert (tmp_path / "out" / "rejected" / "bad.png").read_bytes() == b"mine"


def test_an_output_name_under_rejected_is_refused(tmp_path: Path) -> None:
    job = write_job(tmp_path, [{"id": "sku-1", "image": "images/a.png", "output": "rejected/{id}.png"}])
    (problem,) = manifest_problems(job)
    assert "rejected/" in str(problem) and "sku-1" in str(problem)


def test_several_images_pass_only_if_each_passes() -> None:
    small, big = image_bytes(size=(16, 16)), image_bytes(size=(64, 64))
    verdict = check_images([big, small], original=None, aspect_ratio=None, settings=QaSettings(min_side=32))
    assert not verdict.passed and verdict.failed == ("min_side",) and verdict.values["image"] == 2
    assert check_images([big, big], original=None, aspect_ratio=None, settings=QaSettings(min_side=32)).passed


def test_a_verdict_survives_its_record_being_read_back() -> None:
    verdict = Verdict(passed=False, failed=("min_side",), values={"min_side": 16})
    line = ItemRecord(id="x", status="rejected", qa=verdict).to_json()
    assert line["qa"] == {"passed": False, "failed": ["min_side"], "values": {"min_side": 16}}
    assert ItemRecord.from_json(line).qa == verdict
    assert "qa" not in ItemRecord(id="y", status="ok").to_json()  # written only when the item has checks


# -- the batch tier -------------------------------------------------------------------------------------------

BATCH_CONFIG = """
retry: {max_attempts: 3, backoff_initial_s: 0.01, backoff_max_s: 0.05}
batch: {chunk_requests: 4, linger_s: 0.2, poll_initial_s: 0.05, poll_max_s: 0.2}
"""


def batch_job(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, n: int) -> Path:
    return sku_job(tmp_path, monkeypatch, BATCH_CONFIG, n, model="gemini-3.1-flash-image")


def batch_run(job: Path, url: str, *args: str) -> int:
    return main(["run", str(job), "--base-url", url, "--out", str(job.parent / "out"), "--tier", "batch",
                 "--config", str(job.parent / "nanobatch.yaml"), "--quiet", *args])  # fmt: skip


def requests_sent(app: Starlette) -> int:
    return sum(job.counts["request"] for job in app.state.batches._jobs.values())


def test_the_batch_tier_sends_a_refused_answer_again_as_a_request_of_its_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, with_qa: Callable[[QaSettings], None]
) -> None:
    with_qa(QaSettings(min_side=600, retries=2))  # the simulator answers 512 px
    job = batch_job(tmp_path, monkeypatch, 3)
    app = create_app(SimulatorConfig(batch_latency_s=0.3, seed=5))
    with run_in_thread(app=app) as url:
        assert batch_run(job, url) == 1
    done = records(tmp_path / "out")
    assert {r["status"] for r in done} == {"rejected"} and len(done) == 3
    assert requests_sent(app) == 3 * 3 and app.state.stats.images == 9  # each retry a new request, answered
    assert all(r["attempts"] == 3 and r["tier"] == "batch" for r in done)
    assert [p.name for p in (tmp_path / "out" / ".nanobatch-batches").iterdir()] == ["batches.jsonl"]


def test_a_batch_retry_waiting_in_a_job_is_collected_by_the_next_run_not_paid_twice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, with_qa: Callable[[QaSettings], None]
) -> None:
    with_qa(QaSettings(min_side=600, retries=1))
    job = batch_job(tmp_path, monkeypatch, 2)
    app = create_app(SimulatorConfig(batch_latency_s=1.0, seed=5))
    with run_in_thread(app=app) as url:
        assert batch_run(job, url, "--no-wait") == 0  # submitted: nothing answered yet
        time.sleep(1.3)
        assert batch_run(job, url, "--no-wait") == 0  # collects the refused answers, submits their retries
        assert not (tmp_path / "out" / "results.jsonl").read_text() and requests_sent(app) == 4
        time.sleep(1.3)
        assert batch_run(job, url) == 1  # collects the retries: the first answers are read again, not re-bought
    done = records(tmp_path / "out")
    assert sorted(r["id"] for r in done) == ["sku-0", "sku-1"] and {r["status"] for r in done} == {"rejected"}
    assert requests_sent(app) == 4 and app.state.stats.images == 4


def test_a_link_at_rejected_is_never_written_through(tmp_path: Path, with_qa: Callable[[QaSettings], None]) -> None:
    with_qa(CHECKED)
    job = write_job(tmp_path, [{"id": "bad", "image": "images/b.png"}])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "rejected").symlink_to(elsewhere)
    fake = FakeGemini({EDIT: [SMALL]})

    summary = run(job, fake)

    assert summary.exit_code == 1 and not fake.requests  # refused before anything was paid for
    assert records(tmp_path / "out")[0]["error"]["kind"] == "output_exists"
    assert not list(elsewhere.iterdir())


class Spy:
    """check_image, noting the original each call was given."""

    def __init__(self) -> None:
        self.originals: list[bytes | None] = []

    def __call__(self, output: bytes, *, original: bytes | None, **_: Any) -> Verdict:
        self.originals.append(original)
        return Verdict(passed=True)


def test_the_checks_that_compare_get_the_input_as_sent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, with_qa: Callable[[QaSettings], None]
) -> None:
    spy = Spy()
    monkeypatch.setattr("nanobatch.checks.check_image", spy)
    job = write_job(tmp_path, [{"id": "a", "image": "images/a.png"}, {"id": "t"}])
    with_qa(QaSettings(changed=True))
    run(job, FakeGemini(), tmp_path / "compared")
    with_qa(QaSettings(min_side=8))  # nothing compares with the input: it is not held for the checks
    run(job, FakeGemini(), tmp_path / "measured")
    assert sorted(spy.originals, key=bool) == [None, None, None, (tmp_path / "images" / "a.png").read_bytes()]


def test_the_batch_tier_reads_the_input_again_for_the_checks_that_compare(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, with_qa: Callable[[QaSettings], None]
) -> None:
    spy = Spy()
    monkeypatch.setattr("nanobatch.checks.check_image", spy)
    with_qa(QaSettings(changed=True))
    job = batch_job(tmp_path, monkeypatch, 2)
    with run_in_thread(app=create_app(SimulatorConfig(batch_latency_s=0.3, seed=5))) as url:
        assert batch_run(job, url) == 0
    assert sorted(spy.originals) == sorted((tmp_path / "images" / f"p{n}.png").read_bytes() for n in range(2))


def test_a_batch_key_reads_back_as_the_step_it_was_made_for_a_qa_retry_too() -> None:
    # The ledger reads its keys back (status counts answers kept unwritten): a qa retry's key is longer.
    from nanobatch.run.route import Step

    for step in (Step(item="sku-1", work_key="sha256:ab", number=2), Step(item="x", work_key=None, number=1, again=3)):
        assert Step.from_key(step.key) == step


HEIC = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(64)  # an iPhone photo's first bytes


def test_an_input_the_checks_cannot_decode_leaves_out_only_the_checks_that_compare_with_it(
    tmp_path: Path, with_qa: Callable[[QaSettings], None]
) -> None:
    # The API takes HEIC photos; Pillow does not read them. The run must not die with every answer paid for and
    # none recorded: the checks that compare with the input are left out (said so), the others still hold.
    job = write_job(tmp_path, [{"id": "phone", "image": "images/p.heic"}, {"id": "studio", "image": "images/s.png"}])
    (tmp_path / "images" / "p.heic").write_bytes(HEIC)
    with_qa(QaSettings(changed=True, min_side=32, retries=0))
    fake = FakeGemini({EDIT: [BIG]})

    summary = run(job, fake)

    recs = {r["id"]: r for r in records(tmp_path / "out")}
    assert summary.exit_code == 0 and len(fake.requests) == 2
    assert recs["phone"]["status"] == "ok" and recs["phone"]["qa"]["values"]["not_measured"] == ["changed"]
    assert recs["phone"]["qa"]["values"]["min_side"] == 64 and "changed" not in recs["phone"]["qa"]["values"]
    assert "not_measured" not in recs["studio"]["qa"]["values"] and "changed" in recs["studio"]["qa"]["values"]


def test_an_answer_the_checks_cannot_decode_fails_its_item_and_the_others_are_kept(
    tmp_path: Path, with_qa: Callable[[QaSettings], None]
) -> None:
    # Its PNG is whole at both ends, its pixel data damaged in the middle: only a full decode finds that.
    png = bytearray(image_bytes(size=(64, 64)))
    middle = png.index(b"IDAT") + 8
    png[middle : middle + 8] = b"\xff" * 8
    with_qa(QaSettings(min_side=32, retries=0))
    fake = FakeGemini({"big": [BIG], EDIT: [ok_body(inline(bytes(png)))]})

    summary = run(two_items(tmp_path), fake)

    recs = {r["id"]: r for r in records(tmp_path / "out")}
    assert summary.exit_code == 1 and recs["good"]["status"] == "ok"
    assert recs["bad"]["status"] == "failed" and recs["bad"]["error"]["kind"] == "bad_image"
    assert "failed the output checks: it cannot be decoded" in recs["bad"]["error"]["message"]
    assert recs["bad"]["cost_usd"] > 0  # paid for: counted
