"""A catalog that grows each night (nanobatch.run.unchanged): rows appended to a CSV or JSONL source since the
last run's check, which found every item done, are the only ones checked and sent; anything else that changed,
or a new row that may clash with a done item, has the whole manifest checked as before."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from nanobatch.cli.main import main
from nanobatch.errors import ManifestError
from nanobatch.job.manifest import Manifest
from nanobatch.run.preflight import check_job

from .fakes import image_bytes

N = 4


def _row(kind: str, n: int | str, name: str = "p") -> str:
    """A row of item i<n> (id <n> if a string), written as <name><id>.png."""
    item_id = n if isinstance(n, str) else f"i{n}"
    if kind == "csv":
        return f"{item_id},{name},make item {n} white\n"
    return json.dumps({"id": item_id, "name": name, "what": f"make item {n} white"}) + "\n"


def _job(folder: Path, kind: str) -> Path:
    """A job of N items from a CSV or JSONL source, each its own picture (and pictures for rows to come)."""
    (folder / "images").mkdir(parents=True)
    for n, name in enumerate([f"i{n}" for n in range(N + 4)] + ["1", "x"]):
        (folder / "images" / f"{name}.png").write_bytes(image_bytes((20 * n, 90, 160)))
    head = "id,name,what\n" if kind == "csv" else ""
    (folder / f"rows.{kind}").write_text(head + "".join(_row(kind, n) for n in range(N)))
    (folder / "job.yaml").write_text(
        "name: job\ndefaults:\n  aspect_ratio: '1:1'\n"
        f"items_from:\n  - {kind}: rows.{kind}\n    image: images/{{id}}.png\n    instruction: '{{what}}'\n"
        "    output: '{name}{id}'\n"
    )
    return folder / "job.yaml"


def _resolved(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The ids of the rows resolved from now on, by a check or a run, in order."""
    resolved: list[str] = []
    real = Manifest._resolve

    def counted(manifest: Manifest, raw: Any, **kw: Any) -> Any:
        resolved.append(str((raw.fields or {}).get("id")))
        return real(manifest, raw, **kw)

    monkeypatch.setattr(Manifest, "_resolve", counted)
    return resolved


class Done:
    """A job run to its end: its manifest, source and output folder, and what checks resolved since."""

    def __init__(self, folder: Path, kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
        self.job = _job(folder, kind)
        self.source = folder / f"rows.{kind}"
        self.kind = kind
        self.out = folder / "out"
        assert main(["run", str(self.job), "--simulate", "--out", str(self.out), "--quiet"]) == 0
        self.checks = 0
        self.resolved = _resolved(monkeypatch)
        check = Manifest.check

        def counted_check(manifest: Manifest, **kw: Any) -> Any:
            self.checks += 1
            return check(manifest, **kw)

        monkeypatch.setattr(Manifest, "check", counted_check)

    def append(self, *rows: str) -> None:
        with self.source.open("a") as f:
            f.write("".join(rows))

    def last_run(self) -> dict[str, Any]:
        return dict(json.loads((self.out / "summary.json").read_text())["last_run"])


@pytest.fixture(params=["csv", "jsonl"])
def done(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Done:
    return Done(tmp_path, request.param, monkeypatch)


def test_only_the_rows_appended_since_the_run_are_checked(done: Done, capsys: pytest.CaptureFixture[str]) -> None:
    done.append(_row(done.kind, N), _row(done.kind, N + 1))
    result = check_job(done.job, out_dir=done.out)
    assert (result.items, result.done_items, result.requests, result.left_requests) == (N + 2, N, N + 2, 2)
    assert done.resolved == [f"i{N}", f"i{N + 1}"]
    assert main(["validate", str(done.job), "--out", str(done.out)]) == 0
    assert f"done:      {N} already done in {done.out} (a run skips them); 2 left" in capsys.readouterr().out


def test_a_run_sends_only_the_rows_appended_since_and_the_next_night_holds(done: Done) -> None:
    done.append(_row(done.kind, N), _row(done.kind, N + 1))
    lines = len((done.out / "results.jsonl").read_text().splitlines())
    assert main(["run", str(done.job), "--simulate", "--out", str(done.out), "--quiet"]) == 0
    stats = done.last_run()
    assert (stats["items"], stats["skipped"], stats["ok"], stats["requests"]) == (N + 2, N, 2, 2)
    records = [json.loads(line) for line in (done.out / "results.jsonl").read_text().splitlines()]
    assert len(records) == lines + 2 and {r["id"] for r in records[lines:]} == {f"i{N}", f"i{N + 1}"}
    assert (done.out / f"pi{N}.png").is_file() and (done.out / f"pi{N + 1}.png").is_file()
    # resolved twice each (the run's check, then the run), and no other row
    assert sorted(done.resolved) == sorted([f"i{N}", f"i{N + 1}"] * 2)
    done.resolved.clear()
    checks = done.checks
    result = check_job(done.job, out_dir=done.out)  # the next night: nothing new, nothing resolved
    assert (result.items, result.done_items, done.checks, done.resolved) == (N + 2, N + 2, checks, [])


def test_status_counts_the_rows_appended_since_and_reads_no_other(done: Done) -> None:
    """The usual state of a folder between the nightly export and the nightly run."""
    from nanobatch.cli.status import folder_status

    done.append(_row(done.kind, N), _row(done.kind, N + 1))
    info = folder_status(done.out)
    assert (info["left"], info["manifest_items"], done.resolved) == (2, N + 2, [f"i{N}", f"i{N + 1}"])
    summary = (done.out / "summary.json").read_text()  # counted from every record and item: the same
    (done.out / "summary.json").write_text(json.dumps({k: v for k, v in json.loads(summary).items() if k != "state"}))
    assert (folder_status(done.out)["left"], folder_status(done.out)["manifest_items"]) == (2, N + 2)
    (done.out / "summary.json").write_text(summary)
    # A record since, of a new row's item, by a run of this manifest that started with the last run's count (as
    # one the export landed under, killed): every item counted again
    records = [json.loads(line) for line in (done.out / "results.jsonl").read_text().splitlines()]
    with (done.out / "results.jsonl").open("a") as f:
        f.write(json.dumps({**records[0], "id": f"i{N}", "run": "killed"}) + "\n")
    carried = json.loads(summary)
    carried["state"]["runs"] = ["killed"]
    (done.out / "summary.json").write_text(json.dumps(carried))
    done.resolved.clear()
    assert (folder_status(done.out)["left"], len(done.resolved)) == (1, N + 2)


def test_a_run_after_rows_were_appended_loads_the_index_once_for_its_check_and_once_for_itself(
    done: Done, monkeypatch: pytest.MonkeyPatch
) -> None:
    from nanobatch.output.results import ResultsIndex

    done.append(_row(done.kind, N))
    loads: list[Path] = []
    real = ResultsIndex.load.__func__  # type: ignore[attr-defined]
    monkeypatch.setattr(
        ResultsIndex, "load", classmethod(lambda cls, folder: loads.append(folder) or real(cls, folder))
    )
    assert main(["run", str(done.job), "--simulate", "--out", str(done.out), "--quiet"]) == 0
    assert done.last_run()["ok"] == 1 and len(loads) == 2


def test_a_problem_in_an_appended_row_names_its_line(done: Done) -> None:
    done.append(_row(done.kind, N), _row(done.kind, 9))  # images/i9.png does not exist
    with pytest.raises(ManifestError) as caught:
        check_job(done.job, out_dir=done.out)
    line = N + 2 + (done.kind == "csv")  # the header, N rows, then the first appended one
    assert [(p.file, p.item, p.field) for p in caught.value.problems] == [(f"{done.source}:{line}", "i9", "image")]
    assert done.resolved == [f"i{N}", "i9"]


def test_appended_rows_that_hold_no_item_leave_the_check_as_it_was(done: Done) -> None:
    done.append("\n\n")
    result = check_job(done.job, out_dir=done.out)
    assert (result.items, result.done_items, result.left_requests, done.resolved) == (N, N, 0, [])


def test_a_source_saved_again_with_the_same_rows_is_not_read_again(done: Done) -> None:
    """An export written anew each night, the same rows: its mtime changed, its bytes did not."""
    done.source.write_bytes(done.source.read_bytes())
    os.utime(done.source, ns=(1, 1))
    result = check_job(done.job, out_dir=done.out)
    assert (result.items, result.done_items, done.checks, done.resolved) == (N, N, 0, [])


def _edit_first_row(done: Done) -> None:
    done.source.write_text(done.source.read_text().replace("make item 0 white", "make item 0 black"))


def _cut_last_line_end(done: Done) -> None:
    """The run read rows.csv without the last line end; the row appended since continues that line."""
    done.source.write_bytes(done.source.read_bytes().rstrip(b"\n"))


def test_an_old_row_edited_has_the_whole_check_run(done: Done) -> None:
    _edit_first_row(done)
    done.append(_row(done.kind, N))
    result = check_job(done.job, out_dir=done.out)
    assert (result.items, result.done_items, done.checks, len(done.resolved)) == (N + 1, N - 1, 1, N + 1)


# A new row that may clash with a done item: its id, name and what the whole check says
CLASHES: dict[str, tuple[int | str, str, str]] = {
    "its id is a done item's": (0, "q", "duplicate id 'i0'"),
    "its image is a done item's": ("1", "pi", "as is its image of item 'i1'"),  # pi + 1: item i1's pi + i1
    "its folder is a done item's image": ("x", "pi1.png/", "may be the name of item 'i1'"),
    "it reads a done item's image": (N, "p", "would be written over this input"),  # its picture: below
}


@pytest.mark.parametrize("clash", list(CLASHES))
def test_a_new_row_that_may_clash_with_a_done_item_has_the_whole_check_say_so(done: Done, clash: str) -> None:
    item, name, said = CLASHES[clash]
    if clash == "it reads a done item's image":
        (done.job.parent / "images" / f"i{N}.png").unlink()
        (done.job.parent / "images" / f"i{N}.png").symlink_to(done.out / "pi1.png")
    done.append(_row(done.kind, item, name=name))
    with pytest.raises(ManifestError) as caught:
        check_job(done.job, out_dir=done.out)
    assert said in " ".join(p.message for p in caught.value.problems)
    assert done.checks == 2 and len(done.resolved) == 1 + N + 1  # the new row alone, then the whole manifest


@pytest.mark.parametrize("clashes", [False, True])
@pytest.mark.parametrize("warning", ["deprecated", "unknown"])
def test_a_warning_is_given_once_whether_or_not_the_whole_check_is_run(
    done: Done, clashes: bool, warning: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from nanobatch import models

    if warning == "deprecated":
        done.job.write_text(done.job.read_text().replace("name: job\n", "name: job\nmodel: gemini-3.1-flash-image\n"))
    assert main(["run", str(done.job), "--simulate", "--out", str(done.out), "--quiet"]) == 0
    if warning == "unknown":  # as a proxy's own model id is: sent as is
        monkeypatch.setattr(models, "lookup", lambda model: None)
    done.append(_row(done.kind, 0 if clashes else N))  # i0: a done item's id
    capsys.readouterr()
    assert main(["validate", str(done.job), "--out", str(done.out)]) == (2 if clashes else 0)
    assert capsys.readouterr().err.count("is deprecated" if warning == "deprecated" else "unknown model") == 1


def test_a_last_row_without_its_line_end_then_continued_has_the_whole_check_run(done: Done) -> None:
    """Bytes appended to a source whose last row had no line end may change that row: the whole check reads it."""
    _cut_last_line_end(done)
    assert main(["run", str(done.job), "--simulate", "--out", str(done.out), "--quiet"]) == 0
    done.resolved.clear()
    done.append("0\n" if done.kind == "csv" else "\n")  # "white" becomes "white0" in a CSV
    result = check_job(done.job, out_dir=done.out)
    assert len(done.resolved) == N
    assert result.done_items == (N - 1 if done.kind == "csv" else N)


def _quoted_job(folder: Path, rows: str, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path, list[str]]:
    """(manifest, its CSV, the ids resolved from now on) of a job of *rows* run to its end."""
    (folder / "images").mkdir()
    for n in range(3):
        (folder / "images" / f"i{n}.png").write_bytes(image_bytes((30 * n, 90, 160)))
    (folder / "rows.csv").write_text(rows)
    job = folder / "job.yaml"
    job.write_text("name: job\nitems_from:\n  - csv: rows.csv\n    image: images/{id}.png\n    instruction: '{what}'\n")
    assert main(["run", str(job), "--simulate", "--out", str(folder / "out"), "--quiet"]) == 0
    return job, folder / "rows.csv", _resolved(monkeypatch)


def test_a_csv_with_a_line_end_in_quotes_grows_from_its_last_row(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A line end inside quotes does not end a row; the new rows' lines are counted from the file's start."""
    job, rows, resolved = _quoted_job(tmp_path, 'id,what\ni0,"make it white\nand square"\n', monkeypatch)
    with rows.open("a") as f:
        f.write("i1,make it white\ni3,make it white\n")  # images/i3.png does not exist
    with pytest.raises(ManifestError) as caught:
        check_job(job, out_dir=tmp_path / "out")
    assert [(p.file, p.item) for p in caught.value.problems] == [(f"{rows}:5", "i3")]
    assert resolved == ["i1", "i3"]


def test_a_csv_left_inside_quotes_then_continued_has_the_whole_check_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its last row was cut inside quotes when the run read it: what is appended goes on with that row."""
    job, rows, resolved = _quoted_job(tmp_path, 'id,what\ni0,make it white\ni1,"make it white\n', monkeypatch)
    with rows.open("a") as f:
        f.write('and square"\n')
    result = check_job(job, out_dir=tmp_path / "out")
    assert (result.items, result.done_items, resolved) == (2, 1, ["i0", "i1"])


def test_of_a_manifest_with_its_own_items_and_two_sources_only_the_grown_sources_new_rows_are_checked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "images").mkdir()
    for name in ["own", "a0", "a1", "b0", "b1", "b2"]:
        (tmp_path / "images" / f"{name}.png").write_bytes(image_bytes((len(name) * 40, 90, 160)))
    (tmp_path / "a.csv").write_text("id\na0\n")
    (tmp_path / "b.jsonl").write_text('{"id": "b0"}\n')
    job = tmp_path / "job.yaml"
    job.write_text(
        "name: job\ndefaults:\n  instruction: make it white\n"
        "items:\n  - id: own\n    image: images/own.png\n"
        "items_from:\n  - csv: a.csv\n    image: images/{id}.png\n  - jsonl: b.jsonl\n    image: images/{id}.png\n"
    )
    out = tmp_path / "out"
    assert main(["run", str(job), "--simulate", "--out", str(out), "--quiet"]) == 0
    resolved = _resolved(monkeypatch)
    with (tmp_path / "b.jsonl").open("a") as f:
        f.write('{"id": "b1"}\n{"id": "b2"}\n')
    result = check_job(job, out_dir=out)
    assert (result.items, result.done_items, resolved) == (5, 3, ["b1", "b2"])
    assert main(["run", str(job), "--simulate", "--out", str(out), "--quiet"]) == 0
    with (tmp_path / "a.csv").open("a") as f:  # now the other source
        f.write("a1\n")
    resolved.clear()
    result = check_job(job, out_dir=out)
    assert (result.items, result.done_items, resolved) == (6, 5, ["a1"])


def test_a_new_row_writing_beside_done_items_in_their_folder_is_checked_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Images kept in a folder of their own (output: shop/{id}): the done items' files there are no clash."""
    job = _job(tmp_path, "csv")
    job.write_text(job.read_text().replace("output: '{name}{id}'", "output: 'shop/{id}'"))
    out = tmp_path / "out"
    assert main(["run", str(job), "--simulate", "--out", str(out), "--quiet"]) == 0
    resolved = _resolved(monkeypatch)
    with (tmp_path / "rows.csv").open("a") as f:
        f.write(_row("csv", N))
    result = check_job(job, out_dir=out)
    assert (result.items, result.done_items, resolved) == (N + 1, N, [f"i{N}"])


@pytest.mark.parametrize("meanwhile", ["nothing", "an output deleted"])
def test_a_run_that_waited_for_the_folder_looks_again_before_it_sends_only_the_new_rows(
    done: Done, meanwhile: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--wait-lock: what the check found may have changed while another run held the folder."""
    from nanobatch.output.lock import RunLock

    real_enter = RunLock.__aenter__

    async def enter(self: RunLock) -> RunLock:  # as if another run had held it meanwhile
        if meanwhile == "an output deleted":
            (done.out / "pi0.png").unlink()
        held = await real_enter(self)
        self.waited = True
        return held

    monkeypatch.setattr(RunLock, "__aenter__", enter)
    done.append(_row(done.kind, N))
    assert main(["run", str(done.job), "--simulate", "--out", str(done.out), "--quiet", "--wait-lock"]) == 0
    stats = done.last_run()
    if meanwhile == "nothing":  # the new row alone, resolved by the check and by the run
        assert (stats["ok"], stats["skipped"], done.resolved) == (1, N, [f"i{N}", f"i{N}"])
    else:  # every item gone through: the deleted image made again
        assert (stats["ok"], stats["skipped"]) == (2, N - 1) and (done.out / "pi0.png").is_file()
