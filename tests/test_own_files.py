"""nanobatch's own names in the output folder: a file there that nanobatch did not write is never written over,
no file is written through a link, and another tool's results.jsonl lines are never taken for nanobatch's."""

from __future__ import annotations

import json
import os
from pathlib import Path

import anyio
import pytest

from nanobatch.cli.main import main
from nanobatch.cli.status import folder_status
from nanobatch.errors import ConfigError
from nanobatch.output.lock import RunLock
from nanobatch.output.outdir import Journal, ResultsLog
from nanobatch.run.batch.ledger import Chunk, Ledger

from .fakes import FakeGemini, records, run, write_job

USERS = {  # the user's own files, under nanobatch's names
    "summary.json": '{\n  "total": 3,\n  "last_run": "yesterday"\n}\n',
    "report.html": "<!doctype html><title>My quarterly report</title>",
    "journal.jsonl": '{"date": "2026-12-01", "entry": "shot the spring catalog"}\n',
    "results.jsonl": "".join(json.dumps({"id": f"p{n}", "status": "ok", "score": n}) + "\n" for n in range(7)),
    ".nanobatch.lock": "the user's notes about locking",
}


def _folder(tmp_path: Path) -> tuple[Path, Path]:
    """A two-item job writing into its own folder (``output_dir: .``), and that folder."""
    return write_job(tmp_path, [{"id": "a", "image": "images/a.png"}, {"id": "b", "image": "images/b.png"}],
                     output_dir="."), tmp_path  # fmt: skip


# Point 5: files nanobatch did not write, under its names


def test_the_issue_folder_is_refused_by_validate_and_by_run_with_report(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    job, out = _folder(tmp_path)
    mine = {name: USERS[name] for name in ("summary.json", "report.html", "journal.jsonl")}
    for name, text in mine.items():
        (out / name).write_text(text)
    assert main(["validate", str(job)]) == 2
    err = capsys.readouterr().err
    assert all(f"{name} was not written by nanobatch" in err for name in mine) and "HINT: move them" in err
    assert main(["run", str(job), "--simulate", "--report", "--quiet"]) == 2
    assert "summary.json was not written by nanobatch" in capsys.readouterr().err
    assert {name: (out / name).read_text() for name in mine} == mine
    assert not (out / "results.jsonl").exists() and not (out / "a.png").exists()


@pytest.mark.parametrize("name", list(USERS))
def test_any_file_of_the_users_under_one_of_nanobatchs_names_refuses_the_folder_before_anything_is_sent(
    tmp_path: Path, name: str
) -> None:
    job, out = _folder(tmp_path)
    (out / name).write_text(USERS[name])
    before = sorted(out.iterdir())
    fake = FakeGemini()
    with pytest.raises(ConfigError, match=f"{name} was not written by nanobatch"):
        run(job, fake, out)
    assert fake.requests == [] and (out / name).read_text() == USERS[name] and sorted(out.iterdir()) == before


def test_a_folder_nanobatch_wrote_is_run_again_as_before_also_in_the_first_versions_format(tmp_path: Path) -> None:
    job, out = _folder(tmp_path)
    assert main(["run", str(job), "--simulate", "--report", "--quiet"]) == 0
    assert main(["report", str(out)]) == 0 and main(["validate", str(job)]) == 0
    # As the first versions wrote them: json.dumps' spaces, a holder left in the lock, a journal line.
    lines = [json.dumps(json.loads(line)) for line in (out / "results.jsonl").read_text().splitlines()]
    (out / "results.jsonl").write_text("\n".join(lines) + "\n")
    (out / ".nanobatch.lock").write_text(json.dumps({"pid": 1, "host": "old", "since": "2026-11-25T10:00:00+0000"}))
    (out / "journal.jsonl").write_text(
        json.dumps({"event": "writing", "run": "r1", "id": "a", "files": ["a.png"]}) + "\n"
    )
    fake = FakeGemini()
    summary = run(job, fake, out)
    assert summary.exit_code == 0 and summary.stats.skipped == 2 and fake.requests == []


def test_only_a_line_nanobatch_tore_is_cut_from_results_jsonl(tmp_path: Path) -> None:
    job = write_job(tmp_path, [{"id": "a", "image": "images/a.png"}])
    out = tmp_path / "out"
    assert run(job, FakeGemini(), out).exit_code == 0
    notes = ['{"checked_by": "Ann"}', "checked by Ann, all fine", '{"note": "redo a, the shadow is']
    for n, note in enumerate(notes, 1):
        with (out / "results.jsonl").open("a") as f:
            f.write(note)  # the user's own last line, without its newline
        write_job(tmp_path, [{"id": "a", "image": "images/a.png"}, {"id": f"n{n}", "image": "images/a.png"}])
        assert run(job, FakeGemini(), out).exit_code == 0
        lines = (out / "results.jsonl").read_text().splitlines()
        assert note in lines and json.loads(lines[-1])["id"] == f"n{n}"
    torn = '{"id":"n9","run":"x","sta'  # a record of nanobatch's cut short by a crash: that goes
    with (out / "results.jsonl").open("a") as f:
        f.write(torn)
    assert run(job, FakeGemini(), out).exit_code == 0
    lines = (out / "results.jsonl").read_text().splitlines()
    assert torn not in lines and all(note in lines for note in notes)


def test_report_never_replaces_a_report_html_it_did_not_write(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    job = write_job(tmp_path, [{"id": "a", "image": "images/a.png"}])
    out = tmp_path / "out"
    assert run(job, FakeGemini(), out).exit_code == 0
    for theirs in ("<html><body>The team's page</body></html>", ""):
        (out / "report.html").write_text(theirs)
        assert main(["report", str(out)]) == 2
        assert "report.html " in capsys.readouterr().err and (out / "report.html").read_text() == theirs
    (out / "report.html").unlink()
    assert main(["report", str(out)]) == 0 and main(["report", str(out)]) == 0  # its own, replaced
    assert oct((out / "report.html").stat().st_mode & 0o777) == oct(0o644)


# Point 6: links


LINKED = ["results.jsonl", "journal.jsonl", "summary.json", "report.html", ".nanobatch.lock"]


@pytest.mark.parametrize("name", LINKED)
def test_a_link_at_one_of_nanobatchs_names_refuses_the_folder_and_its_target_is_untouched(
    tmp_path: Path, name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    job = write_job(tmp_path, [{"id": "a", "image": "images/a.png"}])
    out = tmp_path / "out"
    assert run(job, FakeGemini(), out).exit_code == 0  # nanobatch's files: the link points at one of them
    target = tmp_path / "elsewhere" / name
    target.parent.mkdir()
    if (out / name).exists():
        os.replace(out / name, target)
    else:  # report.html: no run asked for one
        target.write_text("someone else's")
    before = target.read_bytes()
    (out / name).symlink_to(target)
    assert main(["run", str(job), "--simulate", "--out", str(out), "--force", "--report", "--quiet"]) == 2
    assert f"{name} is a symbolic link (to {target})" in capsys.readouterr().err
    assert target.read_bytes() == before and (out / name).is_symlink()


def test_a_dangling_lock_link_is_not_followed_to_make_a_file(tmp_path: Path) -> None:
    job = write_job(tmp_path, [{"id": "a", "image": "images/a.png"}])
    out = tmp_path / "out"
    out.mkdir()
    (out / ".nanobatch.lock").symlink_to(tmp_path / "made-elsewhere")
    fake = FakeGemini()
    with pytest.raises(ConfigError, match="symbolic link"):
        run(job, fake, out)
    assert fake.requests == [] and not (tmp_path / "made-elsewhere").exists()


@pytest.mark.parametrize("name", [".nanobatch-batches", ".nanobatch-steps"])
def test_a_linked_folder_of_nanobatch_refuses_the_folder_before_anything_is_paid(tmp_path: Path, name: str) -> None:
    job = write_job(tmp_path, [{"id": "a", "image": "images/a.png", "steps": ["crop it", "make it white"]}])
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    (out / name).symlink_to(elsewhere, target_is_directory=True)
    fake = FakeGemini()
    with pytest.raises(ConfigError, match=rf"\{name} is a symbolic link"):
        run(job, fake, out)
    assert list(elsewhere.iterdir()) == [] and fake.requests == []


def test_a_link_put_there_after_the_check_is_not_written_through(tmp_path: Path) -> None:
    # Every open for writing refuses a link itself, whatever the folder's check found before.
    target = tmp_path / "precious.txt"
    target.write_text("keep me\nno newline at the end")
    out = tmp_path / "out"
    out.mkdir()
    for name in ("results.jsonl", "journal.jsonl", ".nanobatch.lock", ".nanobatch-batches/batches.jsonl"):
        (out / name).parent.mkdir(exist_ok=True)
        (out / name).symlink_to(target)
    opens = [ResultsLog(out / "results.jsonl").open, Journal(out, "r1").open,
             lambda: Ledger(out / ".nanobatch-batches").note("written", Chunk(id="c", model="m", display="d",
                                                                               path="p", keys=[]))]  # fmt: skip
    for open_for_writing in opens:
        with pytest.raises(OSError, match="symbolic link"):
            open_for_writing()
    with pytest.raises(ConfigError, match="symbolic link"):
        anyio.run(RunLock(out).__aenter__)
    assert target.read_text() == "keep me\nno newline at the end"


# Point 12: another tool's results.jsonl lines


def test_status_and_the_resume_index_take_only_nanobatchs_records(tmp_path: Path) -> None:
    items = [{"id": f"i{n}", "image": "images/a.png"} for n in range(6)]
    job = write_job(tmp_path, items)
    out = tmp_path / "out"
    assert run(job, FakeGemini(), out).exit_code == 0
    theirs = [{"id": "i0", "status": "failed"}, {"id": "x", "status": "ok"}, {"id": "i9", "status": "ok",
              "outputs": ["i9.png"], "key": "sha256:0", "attempts": 1}]  # fmt: skip
    with (out / "results.jsonl").open("a") as f:
        f.writelines(json.dumps(line) + "\n" for line in theirs)
    info = folder_status(out)
    assert info["items"] == 6 and info["counts"] == {"ok": 6, "failed": 0, "blocked": 0, "rejected": 0}
    # A line that is not nanobatch's makes no file nanobatch's to replace: the user's i9.png stays.
    (out / "i9.png").write_bytes(b"the user's picture")
    write_job(tmp_path, [*items, {"id": "i9", "image": "images/a.png"}])
    fake = FakeGemini()
    summary = run(job, fake, out)
    assert summary.exit_code == 1 and fake.requests == [] and summary.stats.skipped == 6
    assert (out / "i9.png").read_bytes() == b"the user's picture"
    assert records(out)[-1]["id"] == "i9" and records(out)[-1]["error"]["kind"] == "output_exists"
    assert folder_status(out)["counts"] == {"ok": 6, "failed": 1, "blocked": 0, "rejected": 0}
