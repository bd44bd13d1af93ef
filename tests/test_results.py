"""The output folder's files: atomic images, the results log, the index a re-run resumes from, the journal."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import nanobatch
from nanobatch.output.files import atomic_write
from nanobatch.output.journal import orphaned_requests
from nanobatch.output.outdir import Journal, ResultsLog
from nanobatch.output.record import ItemRecord
from nanobatch.output.record_lines import read_records
from nanobatch.output.results import ResultsIndex
from nanobatch.output.resume import is_done


def as_written(line: dict[str, Any]) -> dict[str, Any]:
    """*line* with the fields nanobatch writes on every record (null where it knew nothing): the index takes only
    nanobatch's records."""
    return {"attempts": None, "key": None, "started_at": None, **line}


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "out"
    target = folder / "a.png"
    atomic_write(target, b"old picture")

    def disk_full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("nanobatch.output.files.os.fsync", disk_full)
    with pytest.raises(OSError, match="No space"):
        atomic_write(target, b"new picture, half written")
    assert target.read_bytes() == b"old picture"
    assert [p.name for p in folder.iterdir()] == ["a.png"]


def test_a_torn_last_line_is_skipped_on_read_and_cut_before_appending(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "results.jsonl"
    path.write_text('{"id": "a", "status": "ok", "attempts": 1, "key": null, "started_at": null}\n{"id": "b", "stat')
    assert [r.id for r in read_records(path)] == ["a"]
    assert "not valid JSON" in caplog.text
    log = ResultsLog(path)
    log.open()
    log.append_many([ItemRecord(id="c", status="ok")])
    log.close()
    assert [json.loads(line)["id"] for line in path.read_text().splitlines()] == ["a", "c"]


def test_a_whole_last_record_without_its_newline_is_kept_not_cut(tmp_path: Path) -> None:
    # Saved by an editor that drops the final newline: the record counts for the re-run, so it must stay.
    path = tmp_path / "results.jsonl"
    path.write_text('{"id": "a", "status": "ok"}\n{"id": "b", "status": "ok"}')
    log = ResultsLog(path)
    log.open()
    log.append_many([ItemRecord(id="c", status="ok")])
    log.close()
    assert [json.loads(line)["id"] for line in path.read_text().splitlines()] == ["a", "b", "c"]


def test_the_latest_record_of_an_id_wins(tmp_path: Path) -> None:
    lines = [
        {"id": "a", "status": "failed", "key": "k1", "error": {"kind": "overloaded"}},
        {"id": "a", "status": "ok", "key": "k1", "outputs": ["a.png"], "usage": {"totalTokenCount": 10}},
        {"id": "b", "status": "blocked", "key": "k2", "error": {"kind": "blocked"}},
    ]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(as_written(r)) + "\n" for r in lines))
    (tmp_path / "a.png").write_bytes(b"x")
    index = ResultsIndex.load(tmp_path)
    assert is_done(index.get("a"), "k1", tmp_path) and not is_done(index.get("a"), "other-key", tmp_path)
    totals = index.totals()
    assert totals["counts"] == {"ok": 1, "failed": 0, "blocked": 1, "rejected": 0}
    assert totals["failures_by_kind"] == {"blocked": 1} and totals["tokens"]["totalTokenCount"] == 10


def test_the_index_keeps_input_stamps_and_ignores_hand_edited_ones(tmp_path: Path) -> None:
    lines = [
        {"id": "a", "status": "ok", "inputs": ["/in/a.png"], "input_stamps": [[3, 7, "ab12"]]},
        {"id": "b", "status": "ok", "inputs": ["/in/b.png"], "input_stamps": [["three", None]]},
        {"id": "c", "status": "ok", "inputs": ["/in/c.png"]},
    ]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(as_written(r)) + "\n" for r in lines))
    with ResultsIndex.load(tmp_path) as index:
        assert len(index) == 3
        entries = {item_id: index.get(item_id) for item_id in "abcd"}
    assert entries["a"] is not None and entries["a"].stamps == {"/in/a.png": (3, 7, "ab12")}
    assert entries["b"] is not None and entries["b"].stamps == {}  # its files are simply read again
    assert entries["c"] is not None and entries["c"].stamps == {}
    assert entries["d"] is None


def test_journal_entries_without_a_result_are_possibly_charged(tmp_path: Path) -> None:
    journal = Journal(tmp_path, "run1")
    journal.open()
    for item in ("a", "b", "c"):
        journal.dispatched(item, "k", 1)
    journal.close()
    (tmp_path / "results.jsonl").write_text(json.dumps(as_written({"id": "a", "run": "run1", "status": "ok"})) + "\n")
    with ResultsIndex.load(tmp_path) as index:
        assert sorted(o["id"] for o in orphaned_requests(tmp_path, index)) == ["b", "c"]


def test_a_settled_request_is_not_possibly_charged_but_an_earlier_unanswered_try_is(tmp_path: Path) -> None:
    journal = Journal(tmp_path, "run1")
    journal.open()
    journal.dispatched("a", "k", 1)
    journal.settled("a", 1)  # an error answer: definite
    journal.dispatched("b", "k", 1)  # no answer: in doubt, whatever its next try got
    journal.dispatched("b", "k", 2)
    journal.settled("b", 2)
    journal.close()
    with ResultsIndex.load(tmp_path) as index:
        assert [o["id"] for o in orphaned_requests(tmp_path, index)] == ["b"]


def run_behind_a_holder(
    job: Path, out: Path, fake: Any, *, hold_s: float, as_it_runs: Callable[[], None] = lambda: None,
    at_its_end: Callable[[], None] = lambda: None, **options: Any,
) -> tuple[float, nanobatch.RunSummary]:  # fmt: skip
    """A ``--wait-lock`` run of *job* into *out* (answered by *fake*), on the virtual clock, started while another
    run holds the folder for *hold_s*: *as_it_runs* is done once it holds it, *at_its_end* just before it lets
    go. Returns when the run ended, and how."""
    import anyio

    from nanobatch.output.lock import RunLock

    from .conftest import run_virtual

    async def go() -> tuple[float, nanobatch.RunSummary]:
        async with anyio.create_task_group() as tg:
            held = anyio.Event()

            async def holder() -> None:
                async with RunLock(out):
                    as_it_runs()
                    held.set()
                    await anyio.sleep(hold_s)
                    at_its_end()

            tg.start_soon(holder)
            await held.wait()
            summary = await nanobatch.run_job(job, transport=fake.transport, out_dir=out, wait_lock=True, **options)
            return anyio.current_time(), summary

    return run_virtual(go)


def test_wait_lock_queues_behind_the_holder(tmp_path: Path) -> None:
    from .fakes import FakeGemini, write_job

    job = write_job(tmp_path, [{"id": "a", "instruction": "x"}])
    finished_at, summary = run_behind_a_holder(job, tmp_path / "out", FakeGemini(), hold_s=60)
    assert summary.exit_code == 0 and finished_at >= 60


def test_a_run_whose_time_limit_comes_while_it_waits_for_the_folder_ends_then_sending_nothing(
    tmp_path: Path,
) -> None:
    # --max-duration counts the wait for the lock: a holder that hangs must not keep tonight's run waiting past
    # its window. It ends at its limit (exit 3, nothing sent), and leaves the holder's summary and metrics alone.
    from nanobatch.errors import TimeLimitReached

    from .fakes import FakeGemini, run, write_job

    job = write_job(tmp_path, [{"id": f"i{n}", "image": f"images/{n}.png", "instruction": "x"} for n in range(20)])
    out = tmp_path / "out"
    assert run(job, FakeGemini(), out).exit_code == 0
    ended = (out / "summary.json").read_text()
    fake = FakeGemini()
    limited = nanobatch.load_settings(overrides={"limits.max_duration_s": 2})

    with pytest.raises(BaseExceptionGroup) as caught:  # (the holder's task group around it)
        run_behind_a_holder(job, out, fake, hold_s=3600, settings=limited)
    assert caught.group_contains(TimeLimitReached, match="while another run held")

    assert not fake.requests and (out / "summary.json").read_text() == ended


def test_a_forced_run_that_waited_for_the_folder_still_redoes_every_item(tmp_path: Path) -> None:
    from .fakes import FakeGemini, run, write_job

    job = write_job(tmp_path, [{"id": f"i{n}", "image": f"images/{n}.png", "instruction": "x"} for n in range(5)])
    out = tmp_path / "out"
    assert run(job, FakeGemini(), out).exit_code == 0
    fake = FakeGemini()
    _, summary = run_behind_a_holder(job, out, fake, hold_s=5, force=True)
    assert summary.exit_code == 0 and len(fake.requests) == 5  # --force: sent again, waited or not


def test_status_tells_a_live_run_from_a_dead_one(tmp_path: Path) -> None:
    import anyio

    from nanobatch.cli.status import folder_status
    from nanobatch.output.lock import RunLock

    journal = Journal(tmp_path, "run1")
    journal.open()
    journal.dispatched("a", "k", 1)
    journal.close()

    async def while_held() -> dict[str, object]:
        async with RunLock(tmp_path):
            return folder_status(tmp_path)

    live = anyio.run(while_held)
    assert live["running"] and live["in_flight"] == 1 and live["possibly_charged"] == 0
    dead = folder_status(tmp_path)
    assert dead["running"] is None and dead["possibly_charged"] == 1 and dead["possibly_charged_ids"] == ["a"]


@pytest.mark.parametrize(
    "line",
    [
        pytest.param({"id": "a", "status": "ok", "outputs": ["a.png"],
                      "usage": {"promptTokenCount": 5, "totalTokenCount": 9}, "cost_usd": 0.04,
                      "key": "k", "run": "r", "inputs": ["x.png"], "input_stamps": [[1, 2, "ab"]]},
                     id="ok"),
        pytest.param({"id": 7, "status": None}, id="sparse-old"),
        pytest.param({"id": "m", "status": "ok", "outputs": ["m.png"], "steps": [
            {"step": 1, "instruction": "i", "outputs": ["m.step1.png"]}, {"step": 2, "instruction": "j"}, "junk"]},
                     id="multi-step"),
        pytest.param({"id": "f", "status": "failed", "error": {"kind": "timeout", "message": "m"},
                      "cost_usd": True, "usage": {"totalTokenCount": "12", "promptTokenCount": True},
                      "outputs": "f.png", "input_stamps": [["bad"]]}, id="odd-types"),
        pytest.param({"id": "e", "status": "failed", "error": {"message": "no kind"}, "steps": []}, id="error-no-kind"),
        pytest.param({"id": "s", "status": "failed", "error": "said in words", "steps": "junk"},
                     id="error-not-an-object"),
        pytest.param({"id": "m", "status": "ok", "run": "r2", "outputs": ["new/m.png"], "cost_usd": 0.0,
                      "moved_from": ["m.png"], "paid_in": {"run": "r1", "cost_usd": 0.07}}, id="moved"),
        pytest.param({"id": "m", "status": "ok", "run": "r2", "outputs": ["new/m.png"], "cost_usd": 0.07,
                      "moved_from": ["m.png"]}, id="moved-before-paid-in"),
        pytest.param({"id": "m", "status": "ok", "moved_from": "m.png", "paid_in": {"run": 3, "cost_usd": "x"}},
                     id="moved-odd-types"),
        pytest.param({"id": "u", "status": "ok", "outputs": ["u.jpg"], "uploads": ["s3://b/u.jpg"],
                      "upload_stamps": [[12, '"9b2c"']]}, id="uploaded"),
        pytest.param({"id": "u", "status": "ok", "outputs": ["u.jpg", "v.jpg"], "uploads": ["s3://b/u.jpg", "s3://b/v"],
                      "upload_stamps": [[12, '"9b2c"']]}, id="uploaded-stamps-not-one-per-url"),
    ],
)  # fmt: skip
def test_the_index_reads_a_line_as_it_reads_its_record(line: dict[str, Any]) -> None:
    from nanobatch.output.record import ItemRecord
    from nanobatch.output.results import _line_row, _row

    record = ItemRecord.from_json(line)
    uploads = record.uploads or ()
    objects = list(zip(uploads, record.upload_stamps or [None] * len(uploads), strict=True))
    assert _line_row(line) == (
        _row(record),
        (record.files, record.file_stamps, objects),
        record.costs()[1],
    )


def test_records_read_ahead_answer_for_their_items_and_one_added_since_is_read_again() -> None:
    """A run over a done folder asks the index about each item: the records of a few hundred are read in one
    query as the items are taken, and a record the run adds meanwhile is the one that counts."""
    index = ResultsIndex()
    for name in ("a", "b", "c"):
        index.add(ItemRecord(id=name, status="ok", key=f"k-{name}"))
    items = [ItemRecord(id=name, status="ok") for name in ("a", "b", "c", "new")]
    asked: list[str] = []
    index._db.set_trace_callback(asked.append)
    taken = index.read_ahead(items)
    assert next(taken).id == "a" and len(asked) == 1  # the four read together
    index.add(ItemRecord(id="b", status="failed", key="k-b"))  # b's answer came back failed since
    answers = {name: index.get(name) for name in ("a", "b", "c", "new")}
    assert {name: entry and entry.status for name, entry in answers.items()} == {
        "a": "ok",
        "b": "failed",
        "c": "ok",
        "new": None,
    }
    assert [item.id for item in taken] == ["b", "c", "new"]
    assert sum(text.startswith("SELECT") for text in asked) == 2  # the read ahead, and b's new record
    assert index.get("a") is not None and sum(text.startswith("SELECT") for text in asked) == 3  # asked again
