"""``status`` after a run that was killed, or records appended since the last summary (issue 25 point 4): the last
summary's counts moved on by the new records only, equal to a full recount; a results file cut or rewritten, or
records of another manifest's run, are counted again in full."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

import nanobatch.run.runner
from nanobatch.cli.main import main
from nanobatch.cli.status import folder_status
from nanobatch.job import manifest as manifest_module
from nanobatch.output import index_cache, results

from .fakes import records, write_job

_COUNTED = ("items", "counts", "tokens", "cost_usd", "paid_usd", "failures_by_kind", "left", "manifest_items")


class _Killed(BaseException):
    """What the test raises where a SIGKILL would have stopped the run: before it wrote its summary at the end."""


def _run(job: Path, out: Path, *extra: str) -> None:
    assert main(["run", str(job), "--simulate", "--out", str(out), "--quiet", *extra]) in (0, 1, 3)


def _killed_run(job: Path, out: Path, monkeypatch: pytest.MonkeyPatch, *extra: str) -> None:
    """A run whose records are written but which never writes the summary of its end (killed)."""

    def killed(*args: Any, **kwargs: Any) -> Any:
        raise _Killed

    with monkeypatch.context() as m:
        m.setattr(nanobatch.run.runner, "build_summary", killed)
        with pytest.raises(BaseException) as stopped:  # noqa: PT011 - the run's task group wraps it
            main(["run", str(job), "--simulate", "--out", str(out), "--quiet", *extra])
    assert stopped.group_contains(_Killed) if isinstance(stopped.value, BaseExceptionGroup) else stopped.type is _Killed


def _manifest_reads(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    reads: list[Path] = []
    real = manifest_module.load_manifest
    monkeypatch.setattr(manifest_module, "load_manifest", lambda path, **kw: reads.append(path) or real(path, **kw))
    return reads


def _recounted(out: Path) -> dict[str, Any]:
    """``status`` of *out* counted from every record and every item: its summary's ``state`` taken away."""
    summary = json.loads((out / "summary.json").read_text())
    saved = (out / "summary.json").read_text()
    (out / "summary.json").write_text(json.dumps({k: v for k, v in summary.items() if k != "state"}))
    try:
        info = folder_status(out)
    finally:
        (out / "summary.json").write_text(saved)
    return {key: info[key] for key in _COUNTED}


def _append(out: Path, *changes: dict[str, Any]) -> None:
    """Records appended as the last run would have written them: the first record's fields, changed."""
    first = records(out)[0]
    with (out / "results.jsonl").open("a") as f:
        for change in changes:
            f.write(json.dumps(first | change) + "\n")


@pytest.fixture
def folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """A job of 8 items, done by a run that ended (its summary written), then a run sending them again
    (``--force``) killed after 2."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    job = write_job(tmp_path, [{"id": f"i{n}", "image": "images/a.png", "instruction": f"edit {n}"} for n in range(8)])
    out = tmp_path / "out"
    _run(job, out)
    _killed_run(job, out, monkeypatch, "--force", "--max-requests", "2")
    assert json.loads((out / "summary.json").read_text())["last_run"]["outcome"] == "started"
    return job, out


def test_status_after_a_killed_run_counts_only_its_records_and_agrees_with_a_full_recount(
    folder: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, out = folder
    reads = _manifest_reads(monkeypatch)
    info = folder_status(out)
    assert (info["counts"]["ok"], info["left"], info["manifest_items"]) == (8, 0, 8)
    assert info["last_run"]["outcome"] == "crashed"
    assert reads == []  # the manifest's 8 items were not resolved again
    assert {key: info[key] for key in _COUNTED} == _recounted(out)


def test_appended_records_of_every_status_move_the_counts_as_a_full_recount_does(
    folder: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, out = folder
    run = records(out)[-1]["run"]  # the killed run's: its records are of the manifest's items
    done = [r for r in records(out) if r["status"] == "ok" and r["id"] != "i7"]  # (i7: below)
    gone = done[1]["outputs"][0]
    (out / gone).unlink()
    (out / "extra.txt").write_text("the folder holds as many entries as before")
    _append(
        out,
        {"id": done[0]["id"], "status": "failed", "outputs": [], "run": run,
         "error": {"kind": "server", "message": "boom"}},  # done before: failed now, so left
        {"id": done[1]["id"], "status": "ok", "run": run, "outputs": [gone]},  # ok again, its output gone: left
        {"id": done[2]["id"], "status": "blocked", "outputs": [], "run": run,
         "error": {"kind": "safety", "message": "no"}},
        {"id": done[2]["id"], "status": "ok", "run": run, "outputs": done[2]["outputs"]},  # ok again: done
        {"id": "i7", "status": "failed", "outputs": [], "run": run, "error": {"kind": "server", "message": "x"}},
        {"id": "i7", "status": "rejected", "outputs": [], "run": run},
    )  # fmt: skip
    reads = _manifest_reads(monkeypatch)
    info = folder_status(out)
    assert reads == []
    assert {key: info[key] for key in _COUNTED} == _recounted(out)
    assert (info["left"], info["counts"]["failed"], info["counts"]["rejected"]) == (3, 1, 1)


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(lambda lines: lines[:-3], id="cut"),
        pytest.param(lambda lines: [lines[1], lines[0], *lines[2:]], id="reordered"),
        pytest.param(lambda lines: [lines[0].replace('"ok"', '"failed"', 1), *lines[1:]], id="rewritten"),
    ],
)
def test_a_results_file_cut_or_rewritten_is_counted_again_in_full(
    folder: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, change: Any
) -> None:
    _, out = folder
    lines = (out / "results.jsonl").read_text().splitlines(keepends=True)
    (out / "results.jsonl").write_text("".join(change(lines)))
    reads = _manifest_reads(monkeypatch)
    info = folder_status(out)
    assert len(reads) == 1  # counted again from the manifest
    assert {key: info[key] for key in _COUNTED} == _recounted(out)


def test_a_results_file_replaced_by_one_of_the_same_size_is_counted_again_in_full(
    folder: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file written anew (as an editor saves one) differs from the counted one in its middle alone, where the
    digest does not read (scaled down here to 16 bytes at each end): which file it is tells."""
    _, out = folder
    monkeypatch.setattr(index_cache, "_WINDOW", 16)
    summary = json.loads((out / "summary.json").read_text())
    state = summary["state"]
    state["results_digest"] = index_cache.prefix_digest(out / "results.jsonl", state["results"][0])  # as if so then
    (out / "summary.json").write_text(json.dumps(summary))
    lines = (out / "results.jsonl").read_text().splitlines(keepends=True)
    middle = len(lines) // 2
    changed = (
        lines[middle]
        .replace('"status":"ok"', '"status":"failed"')
        .replace('"finish_reason":"STOP"', '"finish_reason":""')
    )
    assert changed != lines[middle] and len(changed) == len(lines[middle])
    (out / "new.jsonl").write_text("".join([*lines[:middle], changed, *lines[middle + 1 :]]))
    os.replace(out / "new.jsonl", out / "results.jsonl")
    reads = _manifest_reads(monkeypatch)
    info = folder_status(out)
    assert len(reads) == 1
    assert {key: info[key] for key in _COUNTED} == _recounted(out)


def test_records_of_another_run_are_counted_again_in_full(
    folder: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, out = folder
    _append(out, {"id": "elsewhere", "run": "another-job-run"})  # a run of another manifest into this folder
    reads = _manifest_reads(monkeypatch)
    info = folder_status(out)
    assert len(reads) == 1
    assert {key: info[key] for key in _COUNTED} == _recounted(out)
    assert (info["items"], info["left"], info["manifest_items"]) == (9, 0, 8)  # its item counted, not the manifest's


def test_a_run_of_a_changed_manifest_carries_no_counts_over(
    folder: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    job, out = folder
    job.write_text(job.read_text().replace("edit 7", "edit seven"))
    _killed_run(job, out, monkeypatch, "--max-requests", "1")
    assert "state" not in json.loads((out / "summary.json").read_text())
    reads = _manifest_reads(monkeypatch)
    assert folder_status(out)["left"] == 0 and len(reads) == 1


def test_a_copy_of_the_index_kept_after_the_summary_still_tells_what_each_new_record_replaced(
    folder: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The index's kept copy may stop past the summary's count (here every load keeps one): it still holds
    what the records since replaced, so ``status`` neither reads the manifest nor those records again."""
    job, out = folder
    monkeypatch.setattr(results, "MIN_LINES", 1)
    first = folder_status(out)  # reads the killed run's records, keeps a copy that stops past the summary's count
    _killed_run(job, out, monkeypatch, "--max-requests", "1", "--force")  # one more, a done item's
    reads = _manifest_reads(monkeypatch)
    parsed: list[str] = []
    real_row = results._line_row
    monkeypatch.setattr(results, "_line_row", lambda line: parsed.append(line["id"]) or real_row(line))
    info = folder_status(out)
    assert reads == [] and len(parsed) == 1  # the one record appended since the copy
    assert {key: info[key] for key in _COUNTED} == _recounted(out)
    assert (info["left"], info["counts"]["ok"]) == (first["left"], first["counts"]["ok"]) == (0, 8)


def test_nights_that_send_every_item_again_do_not_grow_the_index(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What each record replaced is kept only past the last count: a catalog sent again every night (``--force``)
    would otherwise add a row per item per night to the index and to its copy in the user's cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    job = write_job(tmp_path, [{"id": f"i{n}", "image": "images/a.png", "instruction": f"edit {n}"} for n in range(6)])
    out = tmp_path / "out"
    for _ in range(4):
        _run(job, out, "--force")
    _killed_run(job, out, monkeypatch, "--force", "--max-requests", "2")

    with results.ResultsIndex.load(out) as index:
        (kept,) = index._db.execute("SELECT COUNT(*) FROM superseded").fetchone()
    assert kept == 2  # the killed night's two records, which status still needs; none of the 18 before
    info = folder_status(out)
    assert {key: info[key] for key in _COUNTED} == _recounted(out)


def test_a_run_cut_short_leaves_no_count_of_items_it_never_reached(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run stopped by ``--max-requests`` (or a deadline, or an abort) never looked at some items: done or not,
    they are not known from it, so its summary carries no count for ``status`` to trust or to move on from."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    job = write_job(tmp_path, [{"id": f"i{n}", "image": "images/a.png", "instruction": f"edit {n}"} for n in range(8)])
    out = tmp_path / "out"
    _run(job, out)
    _run(job, out, "--force", "--max-requests", "2")  # ended, having reached two items of eight
    info = folder_status(out)
    assert (info["left"], info["counts"]["ok"]) == (0, 8)
    assert {key: info[key] for key in _COUNTED} == _recounted(out)

    for record in records(out)[:3]:  # three outputs deleted: three items left
        (out / record["outputs"][0]).unlink(missing_ok=True)
    _run(job, out, "--max-requests", "1")  # makes one again, reaches no further
    _killed_run(job, out, monkeypatch, "--max-requests", "1")  # one more, then killed
    info = folder_status(out)
    assert info["left"] == 1
    assert {key: info[key] for key in _COUNTED} == _recounted(out)


def test_a_temporary_file_left_by_a_killed_worker_does_not_hide_a_deleted_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``status`` trusts the last count while the folder holds as many entries: nanobatch's own working files
    (a killed run's worker leaves its images' temporary files until the next run) are not among them."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    job = write_job(tmp_path, [{"id": f"i{n}", "image": "images/a.png", "instruction": f"edit {n}"} for n in range(4)])
    out = tmp_path / "out"
    _run(job, out)
    (out / records(out)[0]["outputs"][0]).unlink()
    (out / ".nanobatch-99999-0-0.tmp").write_bytes(b"a killed worker's image")
    info = folder_status(out)
    assert info["left"] == 1
    assert {key: info[key] for key in _COUNTED} == _recounted(out)
