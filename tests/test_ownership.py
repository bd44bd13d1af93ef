"""Which files are nanobatch's: a name it once wrote is not enough. Each record, and each of the journal's claims
written before the files, carries what nanobatch left there (``file_stamps``: size and mtime), and a file is
replaced, moved over, deleted or adopted only while it is still that file: a file of the user's put at a name
nanobatch vacated, or an output edited in place, stays the user's."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import nanobatch.output.outdir
from nanobatch.qa import QaSettings

from .fakes import FakeGemini, image_bytes, inline, killed_before_the_records, ok_body, records, run, write_job

SMALL = ok_body(inline(image_bytes(size=(16, 16))))  # fails min_side 32
BIG = ok_body(inline(image_bytes(size=(64, 64))))
EDIT = "make the background white"
MINE = b"the user's own file"


def catalog(folder: Path, category: str) -> Path:
    """One item, sku x, whose output is ``<category>/x.png``."""
    (folder / "photos").mkdir(exist_ok=True)
    (folder / "photos" / "x.png").write_bytes(image_bytes((90, 9, 9)))
    (folder / "catalog.csv").write_text(f"sku,category\nx,{category}\n")
    path = folder / "job.yaml"
    path.write_text(
        "name: job\nitems_from:\n  - csv: catalog.csv\n    id: '{sku}'\n    image: 'photos/{sku}.png'\n"
        "    output: '{category}/{id}.png'\n    instruction: make the background white\n"
    )
    return path


def test_each_record_says_what_each_file_it_names_was_left_as(tmp_path: Path) -> None:
    job = write_job(tmp_path, [{"id": "a", "image": "images/a.png"}])
    run(job, FakeGemini())
    (record,) = records(tmp_path / "out")
    st = (tmp_path / "out" / "a.png").stat()
    assert record["outputs"] == ["a.png"] and record["file_stamps"] == [[st.st_size, st.st_mtime_ns]]


def test_a_file_of_the_users_at_a_name_nanobatch_moved_away_from_is_not_moved_over(tmp_path: Path) -> None:
    out = tmp_path / "out"
    fake = FakeGemini()
    assert run(catalog(tmp_path, "shoes"), fake).exit_code == 0
    assert run(catalog(tmp_path, "hats"), fake).exit_code == 0  # moved: shoes/x.png -> hats/x.png
    (out / "shoes" / "x.png").write_bytes(MINE)  # the name nanobatch left is the user's now

    summary = run(catalog(tmp_path, "shoes"), fake)

    assert summary.exit_code == 1 and len(fake.requests) == 1
    assert (out / "shoes" / "x.png").read_bytes() == MINE and (out / "hats" / "x.png").is_file()
    assert records(out)[-1]["outputs"] == ["hats/x.png"]


def test_an_output_edited_in_place_is_not_replaced_when_its_item_is_sent_again(tmp_path: Path) -> None:
    job = write_job(tmp_path, [{"id": "a", "image": "images/a.png"}])
    out = tmp_path / "out"
    run(job, FakeGemini())
    (out / "a.png").write_bytes(MINE)  # retouched by hand
    job.write_text(job.read_text().replace(EDIT, "make the background grey"))
    fake = FakeGemini()

    summary = run(job, fake)

    assert summary.exit_code == 1 and fake.requests == []  # found before paying
    assert records(out)[-1]["error"]["kind"] == "output_exists" and (out / "a.png").read_bytes() == MINE


def test_an_output_edited_in_place_to_the_same_size_is_not_replaced_either(tmp_path: Path) -> None:
    # The run that wrote a.png left its claim in the journal; its own record settled it. An edit that keeps the
    # size (a byte changed) must not make the claim adopt the user's file as one nanobatch wrote.
    job = write_job(tmp_path, [{"id": "a", "image": "images/a.png"}])
    out = tmp_path / "out"
    run(job, FakeGemini())
    edited = bytearray((out / "a.png").read_bytes())
    edited[-20] ^= 0xFF
    (out / "a.png").write_bytes(edited)  # retouched by hand: same size, new modification time
    job.write_text(job.read_text().replace(EDIT, "make the background grey"))
    fake = FakeGemini()

    summary = run(job, fake)

    assert summary.exit_code == 1 and fake.requests == [] and (out / "a.png").read_bytes() == edited
    assert records(out)[-1]["error"]["kind"] == "output_exists"


def test_a_refused_write_leaves_no_claim_the_next_run_adopts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The user's file appears while the request is out: the writer refuses it, but its claim was in the
    # journal already. The next run must not take the user's file for one nanobatch wrote and died before
    # recording.
    job = write_job(tmp_path, [{"id": "a", "image": "images/a.png"}])
    out = tmp_path / "out"
    real_claims = nanobatch.output.outdir.OutDir.claims

    def claims(self: nanobatch.output.outdir.OutDir, *args: Any) -> list[tuple[str, int | None]]:
        (out / "a.png").write_bytes(MINE)
        return real_claims(self, *args)

    monkeypatch.setattr(nanobatch.output.outdir.OutDir, "claims", claims)
    assert run(job, FakeGemini()).exit_code == 1
    monkeypatch.undo()
    assert '"event":"writing"' in (out / "journal.jsonl").read_text()  # the claim, left by the refusal

    summary = run(job, FakeGemini())

    assert summary.exit_code == 1 and (out / "a.png").read_bytes() == MINE
    assert records(out)[-1]["error"]["kind"] == "output_exists"


def test_a_claimed_file_a_killed_run_put_in_place_is_still_adopted(tmp_path: Path) -> None:
    # The run died between the image and its record: the file there is the one claimed, and the next run
    # replaces it when it sends the item again.
    job = write_job(tmp_path, [{"id": "a", "image": "images/a.png"}])
    out = tmp_path / "out"
    out.mkdir()
    left = image_bytes((1, 2, 3))
    (out / "a.png").write_bytes(left)
    claim = {"event": "writing", "run": "dead", "id": "a", "files": ["a.png"], "sizes": [len(left)]}
    (out / "journal.jsonl").write_text(json.dumps(claim) + "\n")

    assert run(job, FakeGemini()).exit_code == 0
    assert (out / "a.png").read_bytes() != left and records(out)[-1]["status"] == "ok"


def test_a_users_file_where_an_earlier_rejected_image_was_deleted_is_kept(
    tmp_path: Path, with_qa: Callable[[QaSettings], None]
) -> None:
    with_qa(QaSettings(min_side=32, retries=0))
    job = write_job(tmp_path, [{"id": "x", "image": "images/x.png"}])
    out = tmp_path / "out"
    run(job, FakeGemini({EDIT: [SMALL]}))  # rejected: rejected/x.png
    run(job, FakeGemini({EDIT: [BIG]}))  # passes: x.png, and rejected/x.png (nanobatch's) deleted
    assert not (out / "rejected" / "x.png").exists()
    (out / "rejected" / "x.png").write_bytes(MINE)
    job.write_text(job.read_text().replace(EDIT, "make it brighter"))

    fake = FakeGemini({"make it brighter": [BIG]})

    summary = run(job, fake)

    # Where its answer would go if refused is taken: refused before paying, as for any file of the user's.
    assert summary.exit_code == 1 and fake.requests == []
    assert (out / "rejected" / "x.png").read_bytes() == MINE


def test_records_from_before_stamps_still_let_an_item_replace_its_own_files(tmp_path: Path) -> None:
    job = write_job(tmp_path, [{"id": "a", "image": "images/a.png"}])
    out = tmp_path / "out"
    run(job, FakeGemini())
    old = [{k: v for k, v in r.items() if k != "file_stamps"} for r in records(out)]
    (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in old))
    (out / "summary.json").unlink()
    job.write_text(job.read_text().replace(EDIT, "make the background grey"))

    assert run(job, FakeGemini()).exit_code == 0
    assert records(out)[-1]["status"] == "ok" and records(out)[-1]["outputs"] == ["a.png"]


def test_a_link_under_rejected_out_of_the_output_folder_is_never_written_through(
    tmp_path: Path, with_qa: Callable[[QaSettings], None]
) -> None:
    # No template names rejected/, so the manifest's check never looked there: the run does, before paying.
    with_qa(QaSettings(min_side=32, retries=0))
    job = write_job(tmp_path, [{"id": "x", "image": "images/x.png", "output": "cat/{id}.png"}])
    archive = tmp_path / "archive"
    archive.mkdir()
    (archive / "x.png").write_bytes(MINE)
    (tmp_path / "out" / "rejected").mkdir(parents=True)
    (tmp_path / "out" / "rejected" / "cat").symlink_to(archive, target_is_directory=True)
    fake = FakeGemini({EDIT: [SMALL]})

    summary = run(job, fake)

    assert summary.exit_code == 1 and fake.requests == []
    assert "leads out of the output folder" in records(tmp_path / "out")[-1]["error"]["message"]
    assert sorted(p.name for p in archive.iterdir()) == ["x.png"] and (archive / "x.png").read_bytes() == MINE


def test_a_folder_swapped_for_a_link_out_of_the_output_folder_is_not_written_moved_or_deleted_through(
    tmp_path: Path,
) -> None:
    # Between the run's look and its write, a folder on the way becomes a link to the user's archive.
    from nanobatch.api.gemini import Image

    out = nanobatch.output.outdir.OutDir(tmp_path / "out")
    archive = tmp_path / "archive"
    archive.mkdir()
    (archive / "old.png").write_bytes(MINE)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "cat").symlink_to(archive, target_is_directory=True)
    for files, moves in [([("cat/x.png", Image("image/png", b"ours"))], []), ([], [("cat/old.png", "new.png")])]:
        with pytest.raises(PermissionError):
            out.put(files, moves, {}, set())
    assert sorted(p.name for p in archive.iterdir()) == ["old.png"] and not (tmp_path / "out" / "new.png").exists()


def test_a_run_that_died_after_replacing_the_items_own_file_leaves_it_the_items_to_replace(tmp_path: Path) -> None:
    # The item's instruction changed: its new image replaced its old one, and the run died before the record.
    # The record's stamp is the old file's; the journal's claim says the new one is nanobatch's.
    job = write_job(tmp_path, [{"id": "a", "image": "images/a.png"}])
    out = tmp_path / "out"
    run(job, FakeGemini())
    job.write_text(job.read_text().replace(EDIT, "make the background grey"))

    with killed_before_the_records():
        run(job, FakeGemini({"make the background grey": [BIG]}))
    fake = FakeGemini({"make the background grey": [BIG]})

    assert run(job, fake).exit_code == 0
    assert len(fake.requests) == 1 and records(out)[-1]["status"] == "ok"


def test_a_retouched_output_is_not_moved_when_its_output_name_changes(tmp_path: Path) -> None:
    out = tmp_path / "out"
    fake = FakeGemini()
    run(catalog(tmp_path, "shoes"), fake)
    (out / "shoes" / "x.png").write_bytes(MINE)  # retouched by hand

    summary = run(catalog(tmp_path, "hats"), fake)

    assert (out / "shoes" / "x.png").read_bytes() == MINE and not (out / "hats" / "x.png").exists()
    assert len(fake.requests) == 1 and records(out)[-1]["outputs"] == ["shoes/x.png"] and summary.exit_code in (0, 1)


def test_files_moved_by_a_run_killed_before_its_records_are_the_items_not_paid_for_again(tmp_path: Path) -> None:
    # The output template changed: the run moved shoes/x.png to hats/x.png and died before the record saying so.
    # The record still names shoes/x.png; the file at hats/x.png is the one it names (its stamp): done, not sent.
    out = tmp_path / "out"
    fake = FakeGemini()
    run(catalog(tmp_path, "shoes"), fake)
    made = (out / "shoes" / "x.png").read_bytes()
    with killed_before_the_records():
        run(catalog(tmp_path, "hats"), fake)
    assert not (out / "shoes" / "x.png").exists() and records(out)[-1]["outputs"] == ["shoes/x.png"]

    summary = run(catalog(tmp_path, "hats"), fake)

    assert summary.exit_code == 0 and len(fake.requests) == 1 and summary.stats.skipped == 1
    assert records(out)[-1]["outputs"] == ["hats/x.png"] and (out / "hats" / "x.png").read_bytes() == made
    assert run(catalog(tmp_path, "hats"), fake).stats.skipped == 1 and len(records(out)) == 2  # settled


def test_a_file_at_the_new_name_that_is_not_the_moved_one_is_not_taken_for_it(tmp_path: Path) -> None:
    # The old file is gone (deleted by the user) and a file of the user's is at the new name: not the item's file
    # (another stamp), so the item is sent, and the user's file is left alone (output_exists, nothing paid).
    out = tmp_path / "out"
    fake = FakeGemini()
    run(catalog(tmp_path, "shoes"), fake)
    (out / "shoes" / "x.png").unlink()
    (out / "hats").mkdir()
    (out / "hats" / "x.png").write_bytes(MINE)

    summary = run(catalog(tmp_path, "hats"), fake)

    assert summary.exit_code == 1 and len(fake.requests) == 1 and (out / "hats" / "x.png").read_bytes() == MINE
    assert records(out)[-1]["error"]["kind"] == "output_exists"


def test_a_copy_of_the_image_at_the_new_name_whose_move_was_refused_stays_the_users(tmp_path: Path) -> None:
    # The output name changed and the user had a copy of the image at the new name (cp -p: its size and time
    # too): the move is refused and no record says so. The next run took the copy for the file the run claimed
    # to move, and replaced it with nanobatch's image, or deleted it.
    out = tmp_path / "out"
    fake = FakeGemini()
    run(catalog(tmp_path, "shoes"), fake)
    (out / "hats").mkdir()
    st = (out / "shoes" / "x.png").stat()
    mine = (out / "shoes" / "x.png").read_bytes()[:-4] + b"mine"  # the user's bytes, of the image's size
    (out / "hats" / "x.png").write_bytes(mine)
    os.utime(out / "hats" / "x.png", ns=(st.st_atime_ns, st.st_mtime_ns))
    assert run(catalog(tmp_path, "hats"), fake).exit_code == 1  # refused: the user's file is there

    summary = run(catalog(tmp_path, "hats"), fake)

    assert (out / "hats" / "x.png").read_bytes() == mine and (out / "shoes" / "x.png").is_file()
    assert summary.exit_code == 1 and len(fake.requests) == 1  # refused again, nothing paid


def test_a_moved_files_claim_is_kept_only_by_the_file_it_moved(tmp_path: Path) -> None:
    # A run claimed to move shoes/x.png to hats/x.png and died. The file at hats/x.png is the one moved only with
    # the stamp it had (a rename keeps it): a copy of the same size, written since, is the user's.
    out = tmp_path / "out"
    fake = FakeGemini()
    run(catalog(tmp_path, "shoes"), fake)
    moved = out / "shoes" / "x.png"
    st = moved.stat()
    (out / "hats").mkdir()
    claim = {"event": "writing", "run": "dead", "id": "x", "files": ["hats/x.png"], "sizes": [st.st_size],
             "stamps": [[st.st_size, st.st_mtime_ns]]}  # fmt: skip
    (out / "journal.jsonl").write_text(json.dumps(claim) + "\n")
    moved.unlink()
    (out / "hats" / "x.png").write_bytes(MINE.ljust(st.st_size, b"."))

    summary = run(catalog(tmp_path, "hats"), fake)

    assert summary.exit_code == 1 and (out / "hats" / "x.png").read_bytes() == MINE.ljust(st.st_size, b".")
    assert records(out)[-1]["error"]["kind"] == "output_exists"


def test_an_answer_of_several_images_one_of_whose_names_is_taken_is_paid_for_once_not_every_night(
    tmp_path: Path,
) -> None:
    # lamp's answer holds two images, lamp-1.png and lamp-2.png; a file of the user's is at lamp-1.png. The first
    # night pays and is refused (no check can foresee a second image). Its failed record names no file, so the
    # next nights look at the numbered names too: refused before paying, the user's file kept.
    job = write_job(tmp_path, [{"id": "lamp", "image": "images/a.png"}])
    out = tmp_path / "out"
    out.mkdir()
    (out / "lamp-1.png").write_bytes(MINE)
    two = ok_body(inline(image_bytes((1, 2, 3))), inline(image_bytes((4, 5, 6))))
    fake = FakeGemini({EDIT: [two, two, two]})

    assert run(job, fake, out).exit_code == 1 and len(fake.requests) == 1
    assert run(job, fake, out).exit_code == 1 and run(job, fake, out).exit_code == 1

    assert len(fake.requests) == 1 and (out / "lamp-1.png").read_bytes() == MINE
    assert records(out)[-1]["error"]["kind"] == "output_exists" and records(out)[-1]["cost_usd"] == 0


EDIT = "make the background white"
THREE = ok_body(*(inline(image_bytes((60 * n, 90, 160))) for n in range(3)))


def test_a_new_image_deletes_the_earlier_images_of_its_item_it_does_not_replace(tmp_path: Path) -> None:
    # Three images once (a-1 to a-3.png), one now (a.jpg): a folder synced to a shop would publish all four.
    job = write_job(tmp_path, [{"id": "a", "image": "images/a.png"}])
    out = tmp_path / "out"
    run(job, FakeGemini({EDIT: [THREE]}))
    (out / "a-2.png").write_bytes(b"retouched by hand")  # the user's now: never deleted
    (out / "a-9.png").write_bytes(b"a file of yours")

    run(job, FakeGemini({EDIT: [ok_body(inline(image_bytes(fmt="JPEG"), "image/jpeg"))]}), force=True)

    assert sorted(p.name for p in out.glob("a*.*")) == ["a-2.png", "a-9.png", "a.jpg"]
    assert records(out)[-1]["outputs"] == ["a.jpg"]


def test_a_rejected_new_edit_leaves_the_items_earlier_image_where_it_was(
    tmp_path: Path, with_qa: Callable[[QaSettings], None]
) -> None:
    # The catalog keeps the image it had while the new edit is set aside; kept steps stay in any case.
    job = write_job(tmp_path, [{"id": "a", "image": "images/a.png", "steps": ["one", "two"], "keep_steps": True}])
    out = tmp_path / "out"
    run(job, FakeGemini())
    with_qa(QaSettings(min_side=32, retries=0))  # the fake's 16 px answers fail it

    assert run(job, FakeGemini(), force=True).exit_code == 1

    assert (out / "a.png").is_file() and (out / "rejected" / "a.png").is_file() and (out / "a.step1.png").is_file()


@pytest.mark.parametrize("images", [1, 2])
def test_steps_kept_by_an_earlier_run_stay_when_keep_steps_is_turned_off(tmp_path: Path, images: int) -> None:
    steps = {"id": "a", "image": "images/a.png", "steps": ["one", "two"]}
    out = tmp_path / "out"
    step_one = ok_body(*(inline(image_bytes((60 * n, 90, 160))) for n in range(images)))
    run(write_job(tmp_path, [{**steps, "keep_steps": True}]), FakeGemini({"one": [step_one]}))
    kept = sorted(p.name for p in out.glob("a.step1*"))

    run(write_job(tmp_path, [steps]), FakeGemini(), force=True)

    assert kept == (["a.step1.png"] if images == 1 else ["a.step1-1.png", "a.step1-2.png"])
    assert sorted(p.name for p in out.glob("a.step1*")) == kept and (out / "a.png").is_file()


def test_an_item_recorded_under_a_dotted_name_before_names_were_plain_is_still_its_own(tmp_path: Path) -> None:
    # "sub/./{id}.png" was recorded as written; its files are now named plainly, sub/a.png. Its file must still be
    # the item's: skipped while done, replaced once its instruction changes (not refused as a file of yours).
    out = tmp_path / "out"
    job = write_job(tmp_path, [{"id": "a", "image": "images/a.png", "output": "sub/./{id}.png"}])
    fake = FakeGemini()
    run(job, fake)
    results = out / "results.jsonl"
    results.write_text(results.read_text().replace('"sub/a.png"', '"sub/./a.png"'))  # as an older version wrote it
    assert '"sub/./a.png"' in results.read_text()

    assert run(job, fake).exit_code == 0 and len(fake.requests) == 1
    job.write_text(job.read_text().replace("make the background white", "make the background grey"))
    assert run(job, fake).exit_code == 0 and len(fake.requests) == 2

    assert records(out)[-1]["status"] == "ok" and records(out)[-1]["outputs"] == ["sub/a.png"]


def test_an_earlier_image_named_by_a_record_from_before_stamps_is_never_deleted(tmp_path: Path) -> None:
    # Such a record names its files without their size and time: a file of yours put there since cannot be told
    # from nanobatch's, so it is not deleted (it may still be replaced by the item's own new image of that name).
    job = write_job(tmp_path, [{"id": "a", "image": "images/a.png"}])
    out = tmp_path / "out"
    run(job, FakeGemini({EDIT: [THREE]}))
    results = out / "results.jsonl"
    lines = [json.loads(line) for line in results.read_text().splitlines()]
    results.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "file_stamps"}) + "\n" for r in lines))

    run(job, FakeGemini({EDIT: [ok_body(inline(image_bytes(fmt="JPEG"), "image/jpeg"))]}), force=True)

    assert sorted(p.name for p in out.glob("a*.*")) == ["a-1.png", "a-2.png", "a-3.png", "a.jpg"]
