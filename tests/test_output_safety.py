"""The output folder holds the user's files too: a run never writes over, or deletes, what it did not write."""

from __future__ import annotations

import base64
import errno
import gc
import json
import os
from pathlib import Path
from typing import Any

import httpx2
import pytest

import nanobatch
import nanobatch.output.files
import nanobatch.output.outdir
import nanobatch.run.engine
from nanobatch.api.gemini import Image
from nanobatch.api.spool import Spooled, spool_name, write_spooled
from nanobatch.cli.main import main
from nanobatch.cli.status import folder_status
from nanobatch.errors import ManifestError

from .fakes import (
    FakeGemini,
    google_error,
    image_bytes,
    inline,
    killed_before_the_records,
    manifest_problems,
    ok_body,
    run,
    write_job,
)


def latest(out: Path) -> dict[str, dict[str, Any]]:
    lines = (out / "results.jsonl").read_text().splitlines()
    return {r["id"]: r for r in map(json.loads, lines)}


def catalog(folder: Path, rows: list[tuple[str, str]], **top: str) -> Path:
    """A manifest over catalog.csv (sku, category), each row's picture in photos/<sku>.png."""
    (folder / "photos").mkdir(exist_ok=True)
    for sku, _ in rows:
        if not (folder / "photos" / f"{sku}.png").exists():
            (folder / "photos" / f"{sku}.png").write_bytes(image_bytes((len(sku) * 30 % 255, 9, 9)))
    (folder / "catalog.csv").write_text("sku,category\n" + "".join(f"{s},{c}\n" for s, c in rows))
    extra = "".join(f"{k}: {v!r}\n" for k, v in top.items())
    path = folder / "job.yaml"
    path.write_text(
        f"name: job\n{extra}items_from:\n  - csv: catalog.csv\n    id: '{{sku}}'\n"
        "    image: 'photos/{sku}.png'\n    instruction: make the background white\n"
    )
    return path


# 1. Outputs that would land on the job's own inputs


def test_an_output_folder_holding_the_inputs_is_refused_before_anything_is_sent(tmp_path: Path) -> None:
    job = catalog(tmp_path, [("s1", "shoes"), ("s2", "hats")])
    originals = {p.name: p.read_bytes() for p in (tmp_path / "photos").iterdir()}
    with pytest.raises(ManifestError) as caught:
        nanobatch.check_job(job, out_dir=tmp_path / "photos")
    assert {(p.item, p.field) for p in caught.value.problems} == {("s1", "id"), ("s2", "id")}
    assert all("written over" in p.message and "photos" in p.message for p in caught.value.problems)
    fake = FakeGemini()
    with pytest.raises(ManifestError):
        run(job, fake, tmp_path / "photos")
    assert fake.requests == [] and {p.name: p.read_bytes() for p in (tmp_path / "photos").iterdir()} == originals


@pytest.mark.parametrize("image", ["img/a.jpg", "linked/a.jpg"], ids=["plain", "through-a-linked-folder"])
def test_validate_refuses_an_output_template_over_the_inputs_in_the_manifest_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], image: str
) -> None:
    # output_dir: . with output: img/{id}.jpg, where the pictures are img/<id>.jpg: the extension does not matter,
    # nor whether the manifest names the pictures through a linked folder (linked -> img).
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.jpg").write_bytes(image_bytes(fmt="JPEG"))
    (tmp_path / "linked").symlink_to(tmp_path / "img", target_is_directory=True)
    job = write_job(tmp_path, [{"id": "a", "image": image, "output": "img/{id}.jpg"}], output_dir=".")
    assert main(["validate", str(job)]) == 2
    assert "item 'a', field 'output': its image would be written over" in capsys.readouterr().err


def test_an_output_over_another_items_input_is_refused_through_a_symbolic_link(tmp_path: Path) -> None:
    (tmp_path / "link").symlink_to(tmp_path / "images", target_is_directory=True)
    job = write_job(tmp_path, [{"id": "a", "image": "images/b.png"}, {"id": "b", "image": "images/x.png"}])
    with pytest.raises(ManifestError) as caught:
        nanobatch.check_job(job, out_dir=tmp_path / "link")
    (problem,) = caught.value.problems
    assert (problem.item, problem.field) == ("b", "id") and "an input of item 'a'" in problem.message


def test_an_input_linking_to_where_an_output_goes_is_refused(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "b.png").write_bytes(image_bytes())
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").symlink_to(tmp_path / "out" / "b.png")
    job = write_job(tmp_path, [{"id": "b", "instruction": "a poster"}, {"id": "a", "image": "images/a.png"}])
    with pytest.raises(ManifestError) as caught:
        nanobatch.check_job(job, out_dir=tmp_path / "out")
    (problem,) = caught.value.problems
    assert (problem.item, problem.field) == ("a", "image") and "item 'b' would be written over" in problem.message


def test_an_item_with_an_input_written_over_still_has_its_outputs_checked_against_later_inputs(
    tmp_path: Path,
) -> None:
    # d reads a's image; e reads d's: both are told, though d's own problem came first
    (tmp_path / "out" / "sub").mkdir(parents=True)
    for name in ("a.png", "sub/d.png"):
        (tmp_path / "out" / name).write_bytes(image_bytes())
    job = write_job(tmp_path, [
        {"id": "a", "instruction": "a poster"}, {"id": "d", "image": "out/a.png", "output": "sub/{id}"},
        {"id": "e", "image": "out/sub/d.png"},
    ])  # fmt: skip
    with pytest.raises(ManifestError) as caught:
        nanobatch.check_job(job, out_dir=tmp_path / "out")
    told = [(p.item, p.field, p.message.split(" would")[0]) for p in caught.value.problems]
    assert told == [("d", "image", "the image of item 'a'"), ("e", "image", "the image of item 'd'")]


def test_inputs_beside_the_outputs_under_other_names_are_fine(tmp_path: Path) -> None:
    job = write_job(tmp_path, [{"id": "a", "image": "images/a.png", "output": "{id}-edited.png"}])
    assert nanobatch.check_job(job, out_dir=tmp_path / "images").items == 1


def test_a_file_of_the_users_at_an_output_name_fails_the_item_before_anything_is_paid(tmp_path: Path) -> None:
    job = write_job(tmp_path, [{"id": "a", "image": "images/a.png"}, {"id": "b", "image": "images/a.png"}])
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.webp").write_bytes(b"the user's own picture")  # whichever type the answer would have
    fake = FakeGemini()
    summary = run(job, fake, out)
    assert (
        summary.exit_code == 1
        and len(fake.requests) == 1
        and (out / "a.webp").read_bytes() == b"the user's own picture"
    )
    records = latest(out)
    assert records["b"]["status"] == "ok" and (out / "b.png").is_file()
    assert records["a"]["status"] == "failed" and records["a"]["error"]["kind"] == "output_exists"
    assert records["a"]["cost_usd"] == 0 and str(out / "a.webp") in records["a"]["error"]["message"]
    # Moved away by the user: the next run makes it, and sends nothing else.
    (out / "a.webp").rename(tmp_path / "kept.webp")
    fake = FakeGemini()
    assert run(job, fake, out).exit_code == 0 and len(fake.requests) == 1 and latest(out)["a"]["status"] == "ok"


def test_the_writer_never_replaces_a_file_that_appeared_while_the_request_was_out(tmp_path: Path) -> None:
    job = write_job(tmp_path, [{"id": "a", "image": "images/a.png"}, {"id": "b", "image": "images/b.png"}])
    out = tmp_path / "out"

    a_picture = base64.b64encode((tmp_path / "images" / "a.png").read_bytes())

    def answer_and_meanwhile_a_file_appears(request: httpx2.Request) -> httpx2.Response:
        if a_picture in request.content:  # a's request is out (b's may go first)
            (out / "a.png").write_bytes(b"copied in by hand")
        return httpx2.Response(200, json=ok_body())

    summary = run(job, FakeGemini({"make the background white": [answer_and_meanwhile_a_file_appears]}), out)
    assert summary.exit_code == 1 and (out / "a.png").read_bytes() == b"copied in by hand"
    records = latest(out)
    assert records["a"]["error"]["kind"] == "output_exists" and records["a"]["cost_usd"] > 0
    assert records["a"]["outputs"] == [] and records["b"]["status"] == "ok"


def test_a_file_that_appears_while_the_image_is_being_written_is_not_replaced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # After the writer's last look and before its image is in place (its temporary file written and fsync'ed:
    # milliseconds on a slow disk), a file is copied in at the same name.
    job = write_job(tmp_path, [{"id": "a", "image": "images/a.png"}, {"id": "b", "image": "images/b.png"}])
    out = tmp_path / "out"
    real_write = nanobatch.output.outdir.write_image

    def write(path: str, data: bytes, **options: Any) -> None:
        if path.endswith("a.png"):
            Path(path).write_bytes(b"copied in by hand")
        real_write(path, data, **options)

    monkeypatch.setattr(nanobatch.output.outdir, "write_image", write)
    assert run(job, FakeGemini(), out).exit_code == 1
    assert (out / "a.png").read_bytes() == b"copied in by hand" and (out / "b.png").is_file()
    records = latest(out)
    assert records["a"]["error"]["kind"] == "output_exists" and str(out / "a.png") in records["a"]["error"]["message"]
    assert records["b"]["status"] == "ok" and not list(out.glob(".nanobatch-*.tmp"))


@pytest.mark.parametrize("spooled", [False, True], ids=["in memory", "a worker's temporary file"])
@pytest.mark.parametrize("hard_links", [True, False], ids=["hard links", "no hard links (FAT)"])
def test_a_new_image_never_takes_a_name_that_is_taken(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hard_links: bool, spooled: bool
) -> None:
    if not hard_links:

        def no_links(src: str, dst: str) -> None:
            raise PermissionError(errno.EPERM, "Operation not permitted", src)

        monkeypatch.setattr(os, "link", no_links)
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "theirs.png").write_bytes(b"theirs")

    def ours() -> Image:
        if not spooled:
            return Image("image/png", b"ours")
        prefix = spool_name(str(folder))  # as a worker process writes an answer's image
        return Image("image/png", spooled=Spooled(write_spooled(prefix, 0, b"ours"), 4, None))

    nanobatch.output.files.write_image(str(folder / "new.png"), ours(), replace=False)
    with pytest.raises(FileExistsError) as caught:
        nanobatch.output.files.write_image(str(folder / "theirs.png"), ours(), replace=False)
    assert caught.value.filename == str(folder / "theirs.png")
    assert (folder / "theirs.png").read_bytes() == b"theirs" and (folder / "new.png").read_bytes() == b"ours"
    del caught  # its traceback holds the image that was refused: once let go, its temporary file goes too
    gc.collect()
    assert sorted(p.name for p in folder.iterdir()) == ["new.png", "theirs.png"]  # no temporary file left


def test_the_writer_replaces_its_own_earlier_output_even_after_a_failed_attempt(tmp_path: Path) -> None:
    job = write_job(tmp_path, [{"id": "a", "image": "images/a.png"}])
    out = tmp_path / "out"
    assert run(job, FakeGemini(), out).exit_code == 0
    denied = FakeGemini({"make the background white": [google_error(400, "INVALID_ARGUMENT", "no")]})
    assert run(job, denied, out, force=True).exit_code == 1  # the latest record is failed, with no outputs
    new = image_bytes((1, 2, 3))
    fake = FakeGemini({"make the background white": [ok_body(inline(new))]})
    assert run(job, fake, out).exit_code == 0 and (out / "a.png").read_bytes() == new


def test_an_image_whose_run_died_before_its_record_is_still_nanobatchs_to_replace(tmp_path: Path) -> None:
    job = write_job(tmp_path, [{"id": "a", "image": "images/a.png"}])
    out = tmp_path / "out"

    with killed_before_the_records():
        run(job, FakeGemini(), out)
    assert (out / "a.png").is_file() and not (out / "results.jsonl").read_text()
    new = image_bytes((7, 7, 7))
    for _ in range(2):  # and again after a run that failed it: the journal keeps the name until a record has it
        denied = FakeGemini({"make the background white": [google_error(400, "INVALID_ARGUMENT", "no")]})
        assert run(job, denied, out).exit_code == 1
    assert run(job, FakeGemini({"make the background white": [ok_body(inline(new))]}), out).exit_code == 0
    assert (out / "a.png").read_bytes() == new and latest(out)["a"]["status"] == "ok"
    assert folder_status(out)["possibly_charged"] == 0  # the journal's file lines are not requests


# 2. Cleaning up after a killed run


def test_cleanup_removes_only_nanobatchs_own_temporary_files(tmp_path: Path) -> None:
    job = write_job(tmp_path, [{"id": "a", "image": "images/a.png"}])
    out = tmp_path / "out"
    (out / "notes").mkdir(parents=True)
    user_files = [out / ".cache.tmp", out / "notes" / ".important.tmp", out / ".a.png.123-4.tmp"]
    # Named like nanobatch's own, but reached only through a link: another folder's, not the output folder's.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    user_files.append(elsewhere / ".nanobatch-77-1.tmp")
    (out / "linked").symlink_to(elsewhere, target_is_directory=True)
    (out / ".nanobatch-77-2.tmp").symlink_to(tmp_path / "kept.txt")
    user_files.append(tmp_path / "kept.txt")
    for path in user_files:
        path.write_text("mine")
    left = out / "notes" / ".nanobatch-4242-7.tmp"
    left.write_bytes(b"half an image")
    assert run(job, FakeGemini(), out).exit_code == 0
    assert all(path.read_text() == "mine" for path in user_files) and not left.exists()
    assert (out / ".nanobatch-77-2.tmp").is_symlink()


def test_cleanup_leaves_the_temporary_files_of_another_output_folder_inside_this_one(tmp_path: Path) -> None:
    # `--out out` beside `out/catalog`, another job's folder, whose run is writing a paid answer into place now:
    # its temporary file is that run's, and deleting it would lose the answer (and pay for it again).
    job = write_job(tmp_path, [{"id": "a", "image": "images/a.png"}])
    out = tmp_path / "out"
    inner = out / "catalog" / "shoes"
    inner.mkdir(parents=True)
    (out / "catalog" / ".nanobatch.lock").write_text("{}")
    theirs = inner / ".nanobatch-4242-7.tmp"
    theirs.write_bytes(b"another run's answer, on its way to its name")
    ours = out / ".nanobatch-4242-8.tmp"
    ours.write_bytes(b"half an image a killed run of this folder left")
    assert run(job, FakeGemini(), out).exit_code == 0
    assert theirs.read_bytes() == b"another run's answer, on its way to its name" and not ours.exists()


def test_temporary_files_are_named_in_nanobatchs_own_namespace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[str] = []
    real_open = os.open

    def spying_open(path: Any, flags: int, *args: Any) -> int:
        made.append(os.path.basename(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", spying_open)
    nanobatch.output.files.atomic_write(tmp_path / "x.png", b"data")
    assert made[0].startswith(".nanobatch-") and made[0].endswith(".tmp")


# 3. nanobatch's own files, and one item's write failing


@pytest.mark.parametrize(
    "output",
    ["results.jsonl/{id}", "summary.json/{id}.png", "journal.jsonl/{id}", "report.html/{id}", ".nanobatch.{id}",
     ".nanobatch.lock/{id}", "pics/.nanobatch-{id}", "Results.JSONL/{id}", "./results.jsonl/{id}",
     ".//report.html/{id}", "./.nanobatch-batches/{id}"],
)  # fmt: skip
def test_output_names_on_nanobatchs_own_files_are_refused(tmp_path: Path, output: str) -> None:
    job = write_job(tmp_path, [{"id": "a", "image": "images/a.png", "output": output}])
    (problem,) = manifest_problems(job)
    assert (problem.item, problem.field) == ("a", "output") and "nanobatch" in problem.message


@pytest.mark.parametrize("code", [errno.EACCES, errno.EISDIR, errno.ENAMETOOLONG], ids=errno.errorcode.get)
def test_one_items_write_failure_fails_that_item_and_the_run_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    job = write_job(tmp_path, [{"id": f"i{n}", "image": "images/a.png"} for n in range(6)])
    out = tmp_path / "out"
    real_write = nanobatch.output.outdir.write_image

    def write(path: str, data: bytes, **options: Any) -> None:
        if path.endswith("i3.png"):
            raise OSError(code, os.strerror(code), path)
        real_write(path, data, **options)

    monkeypatch.setattr(nanobatch.output.outdir, "write_image", write)
    summary = run(job, FakeGemini(), out)
    assert (summary.outcome, summary.exit_code, summary.stats.ok, summary.stats.failed) == ("complete", 1, 5, 1)
    failed = latest(out)["i3"]
    assert failed["status"] == "failed" and failed["error"]["kind"] == "write" and failed["cost_usd"] > 0
    counts = json.loads((out / "summary.json").read_text())["counts"]
    assert counts == {"ok": 5, "failed": 1, "blocked": 0, "rejected": 0}
    monkeypatch.setattr(nanobatch.output.outdir, "write_image", real_write)
    fake = FakeGemini()
    assert run(job, fake, out).exit_code == 0 and len(fake.requests) == 1 and (out / "i3.png").is_file()


# 4. Output names that changed


def test_a_done_item_whose_output_name_changed_is_moved_without_paying_again(tmp_path: Path) -> None:
    rows = [("s1", "shoes"), ("s2", "shoes"), ("s3", "hats")]
    job = catalog(tmp_path, rows, output_dir="out")
    text = job.read_text().replace("instruction:", "output: '{category}/{id}.png'\n    instruction:")
    job.write_text(text)
    out = tmp_path / "out"
    fake = FakeGemini()
    assert run(job, fake, None).exit_code == 0 and len(fake.requests) == 3
    before = (out / "shoes" / "s2.png").read_bytes()
    cost, paid_by = latest(out)["s2"]["cost_usd"], latest(out)["s2"]["run"]
    catalog(tmp_path, [("s1", "shoes"), ("s2", "sale"), ("s3", "hats")], output_dir="out")
    job.write_text(text)
    summary = run(job, fake, None)
    assert summary.exit_code == 0 and len(fake.requests) == 3  # nothing sent
    assert not (out / "shoes" / "s2.png").exists() and (out / "sale" / "s2.png").read_bytes() == before
    record = latest(out)["s2"]
    assert record["status"] == "ok" and record["outputs"] == ["sale/s2.png"]
    # The move paid nothing; what its images cost is kept as a reference to the run that paid for them.
    assert record["moved_from"] == ["shoes/s2.png"] and record["cost_usd"] == 0
    assert record["paid_in"] == {"run": paid_by, "cost_usd": cost}
    assert summary.stats.skipped == 3 and summary.stats.cost_usd == 0
    # Done now, under its new name.
    assert run(job, fake, None).stats.skipped == 3 and len(fake.requests) == 3
    assert len((out / "results.jsonl").read_text().splitlines()) == 4


@pytest.mark.parametrize("when", ["before the run", "just before the move"])
def test_a_move_never_replaces_a_file_it_did_not_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, when: str
) -> None:
    # A re-categorised item's new name is taken: by a file there before the run, or one copied in after the
    # writer's look and before its move.
    job = catalog(tmp_path, [("s1", "shoes")], output_dir="out")
    text = job.read_text().replace("instruction:", "output: '{category}/{id}.png'\n    instruction:")
    job.write_text(text)
    out = tmp_path / "out"
    fake = FakeGemini()
    assert run(job, fake, None).exit_code == 0
    catalog(tmp_path, [("s1", "sale")], output_dir="out")
    job.write_text(text)
    if when == "before the run":
        (out / "sale").mkdir()
        (out / "sale" / "s1.png").write_bytes(b"someone else's")
    else:
        real_move = nanobatch.output.outdir.move_file

        def move(src: str, dst: str, **options: Any) -> None:
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            Path(dst).write_bytes(b"someone else's")
            real_move(src, dst, **options)

        monkeypatch.setattr(nanobatch.output.outdir, "move_file", move)
    assert run(job, fake, None).exit_code == 1 and len(fake.requests) == 1  # nothing paid for the move
    assert (out / "sale" / "s1.png").read_bytes() == b"someone else's" and (out / "shoes" / "s1.png").is_file()
    assert latest(out)["s1"]["outputs"] == ["shoes/s1.png"]  # its record is as it was


def test_a_moved_item_takes_its_kept_steps_along(tmp_path: Path) -> None:
    job = catalog(tmp_path, [("s1", "shoes")], output_dir="out")
    text = job.read_text().replace(
        "    instruction: make the background white\n",
        "    output: '{category}/{id}.png'\n    keep_steps: true\n    steps: [crop it, make the background white]\n",
    )
    job.write_text(text)
    out = tmp_path / "out"
    fake = FakeGemini()
    assert run(job, fake, None).exit_code == 0 and len(fake.requests) == 2
    catalog(tmp_path, [("s1", "sale")], output_dir="out")
    job.write_text(text)
    assert run(job, fake, None).exit_code == 0 and len(fake.requests) == 2
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png")) == ["sale/s1.png", "sale/s1.step1.png"]
    record = latest(out)["s1"]
    assert record["outputs"] == ["sale/s1.png"] and record["steps"][0]["outputs"] == ["sale/s1.step1.png"]


def test_a_done_item_whose_output_template_changed_is_moved_without_paying_again(tmp_path: Path) -> None:
    job = write_job(tmp_path, [{"id": "a", "image": "images/a.png"}, {"id": "b", "image": "images/b.png"}])
    out = tmp_path / "out"
    fake = FakeGemini()
    assert run(job, fake, out).exit_code == 0 and len(fake.requests) == 2
    before = (out / "a.png").read_bytes()
    job.write_text(job.read_text().replace("defaults:\n", "defaults:\n  output: edited/{id}\n"))
    summary = run(job, fake, out)
    assert summary.exit_code == 0 and len(fake.requests) == 2 and summary.stats.skipped == 2
    assert not (out / "a.png").exists() and (out / "edited" / "a.png").read_bytes() == before
    assert latest(out)["a"]["outputs"] == ["edited/a.png"] and latest(out)["b"]["moved_from"] == ["b.png"]


def test_a_move_across_disks_is_undone_when_a_later_move_of_the_item_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Its files go to a folder on another disk (a rename cannot: EXDEV, so they are copied); the item's second
    # file cannot be moved, so the first goes back where it was: its record, unchanged, still names it.
    out = nanobatch.output.outdir.OutDir(tmp_path / "out")
    (tmp_path / "out" / "old").mkdir(parents=True)
    (tmp_path / "out" / "old" / "s1.png").write_bytes(b"step 2")
    (tmp_path / "out" / "old" / "s1.step1.png").write_bytes(b"step 1")
    real_replace, real_link = os.replace, os.link

    def across(src: Any, dst: Any) -> bool:  # "new" is on another disk than "old"
        return ("/new/" in str(src)) != ("/new/" in str(dst))

    def replace(src: Any, dst: Any) -> None:
        if across(src, dst):
            raise OSError(errno.EXDEV, "Invalid cross-device link", str(src))
        real_replace(src, dst)

    def link(src: Any, dst: Any) -> None:
        if across(src, dst):
            raise OSError(errno.EXDEV, "Invalid cross-device link", str(src))
        real_link(src, dst)

    real_write = nanobatch.output.files.atomic_write

    def write(path: Any, data: bytes, **options: Any) -> None:
        if str(path).endswith("step1.png"):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        real_write(path, data, **options)

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "link", link)
    monkeypatch.setattr(nanobatch.output.files, "atomic_write", write)
    moves = [("old/s1.png", "new/s1.png"), ("old/s1.step1.png", "new/s1.step1.png")]
    with pytest.raises(PermissionError):
        out.put([], moves, frozenset(), set())
    assert (tmp_path / "out" / "old" / "s1.png").read_bytes() == b"step 2"
    assert (tmp_path / "out" / "old" / "s1.step1.png").read_bytes() == b"step 1"
    assert not (tmp_path / "out" / "new" / "s1.png").exists()
