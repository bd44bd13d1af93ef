"""validate's pictures looked at ahead on a second core (issue 25): the problems found are those found without
it, every picture is still read once, and a picture changed since it was looked at is judged as it is now."""

from __future__ import annotations

import concurrent.futures
import os
from pathlib import Path
from typing import Any

import pytest

import nanobatch
from nanobatch.errors import ManifestError
from nanobatch.job import pictures
from nanobatch.job.pictures import PictureCheck, look_at

from .fakes import image_bytes, write_job


@pytest.fixture(autouse=True)
def forkable(monkeypatch: pytest.MonkeyPatch) -> None:
    """The look-ahead forks only a process with no other thread; a test's process may keep an idle one."""
    monkeypatch.setattr(pictures, "can_fork", lambda: True)


JPEG = image_bytes(fmt="JPEG")


def _catalog(tmp_path: Path) -> Path:
    """60 items: good pictures, cut and garbage ones, missing files, a folder, pictures shared by path and by a
    hard link, an item with two pictures, and one whose picture comes from the defaults."""
    items: list[dict[str, Any]] = []
    for n in range(60):
        kind = n % 10
        item: dict[str, Any] = {"id": f"i{n}", "image": f"images/{n}.png"}
        if kind == 6:
            item = {"id": f"i{n}"}  # the defaults' picture
        elif kind == 7:
            item = {"id": f"i{n}", "images": [f"images/{n}.png", "images/0.png"]}
        items.append(item)
    job = write_job(tmp_path, items, defaults={"instruction": "white", "image": "images/8.png"})
    for n in range(60):
        path, kind = tmp_path / f"images/{n}.png", n % 10
        if kind == 1:
            path.write_bytes(JPEG[: len(JPEG) // 2])  # cut short
        elif kind == 2:
            path.write_bytes(image_bytes()[:33] + bytes(range(256)))  # garbage after the header
        elif kind == 3:
            path.unlink()  # missing
        elif kind == 4:
            path.unlink()
            path.mkdir()  # a folder
        elif kind == 5:
            path.unlink()
            os.link(tmp_path / "images/0.png", path)
    return job


def _problems(job: Path, out: Path) -> list[tuple[str | None, str | None, str]]:
    with pytest.raises(ManifestError) as err:
        nanobatch.check_job(job, out_dir=out)
    return [(p.item, p.field, p.message.replace(str(job.parent), "")) for p in err.value.problems]


def test_pictures_looked_at_ahead_give_the_problems_found_without_it_and_are_read_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = _catalog(tmp_path)
    read: list[str] = []
    real = pictures.file_problem
    monkeypatch.setattr(pictures, "file_problem", lambda path: read.append(os.path.basename(path)) or real(path))
    monkeypatch.setattr(pictures, "START_AFTER", 10**9)
    alone = _problems(job, tmp_path / "out")
    # Each picture read once: not the missing ones, folders or hard links to 0.png, nor 6.png (no item names it)
    assert sorted(read) == sorted(f"{n}.png" for n in range(60) if n % 10 not in (3, 4, 5, 6))
    read.clear()
    monkeypatch.setattr(pictures, "START_AFTER", 10)  # scaled down from thousands
    monkeypatch.setattr(pictures, "_CHUNK", 7)
    assert _problems(job, tmp_path / "out") == alone
    # This process read only the first ten items' pictures (and 0.png, which they share); the rest were read in
    # the other one.
    assert sorted(read) == ["0.png", "1.png", "2.png", "7.png", "8.png", "9.png"]
    assert {(item, field) for item, field, _ in alone} >= {("i1", "image"), ("i52", "image"), ("i53", "image")}


def test_an_input_linked_into_the_output_folder_is_found_with_the_pictures_looked_at_ahead(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The other process says which inputs are symbolic links (this one then does not ask again): an input that
    is a link to another item's output is the same problem with the look-ahead as without it. (Without it, the
    lstat of the picture's own stat tells.)"""
    job = write_job(tmp_path, [{"id": f"i{n}", "image": f"images/{n}.png"} for n in range(40)],
                    defaults={"instruction": "white"})  # fmt: skip
    out = tmp_path / "out"
    out.mkdir()
    for n in range(4, 40, 5):  # i4's picture is the file i3 writes (last night's answer), and so on
        (out / f"i{n - 1}.png").write_bytes(image_bytes())
        (tmp_path / f"images/{n}.png").unlink()
        (tmp_path / f"images/{n}.png").symlink_to(out / f"i{n - 1}.png")
    asked: list[str] = []
    real = os.lstat
    monkeypatch.setattr(os, "lstat", lambda path, **kw: asked.append(str(path)) or real(path, **kw))

    def pictures_asked() -> set[int]:  # lstat: taken for a stat, to tell a link, or to follow one (realpath)
        return {int(p.rsplit("/", 1)[1][:-4]) for p in asked if "/images/" in p and p.endswith(".png")}

    monkeypatch.setattr(pictures, "START_AFTER", 10**9)
    alone = _problems(job, out)
    assert {item for item, _, _ in alone} >= {f"i{n}" for n in range(4, 40, 5)}
    asked_alone, asked[:] = len(pictures_asked()), []
    monkeypatch.setattr(pictures, "START_AFTER", 10)  # scaled down from thousands
    monkeypatch.setattr(pictures, "_CHUNK", 7)
    assert _problems(job, out) == alone
    # Here: the first ten items' pictures, and where each later link leads (its real path)
    assert asked_alone == 40 and pictures_asked() == set(range(10)) | set(range(14, 40, 5))


def _die(paths: list[str], read: bool) -> None:
    os._exit(1)  # the other process dies at its first look


def test_pictures_are_looked_at_here_when_the_other_process_dies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = _catalog(tmp_path)
    monkeypatch.setattr(pictures, "START_AFTER", 10**9)
    alone = _problems(job, tmp_path / "out")
    monkeypatch.setattr(pictures, "START_AFTER", 10)
    monkeypatch.setattr(pictures, "look_at", _die)
    assert _problems(job, tmp_path / "out") == alone


def test_the_other_process_stats_and_reads_what_it_is_asked_to_and_leaves_the_rest(tmp_path: Path) -> None:
    """Its stat stands for the picture's, its verdict for a read of it; asked only to stat (a done folder's
    pictures are trusted as sent and answered), it reads nothing, and what it did not read is read here."""
    good, cut = tmp_path / "good.png", tmp_path / "cut.jpg"
    good.write_bytes(image_bytes())
    cut.write_bytes(JPEG[: len(JPEG) // 2])
    paths = [str(good), str(cut), str(tmp_path / "missing.png"), str(tmp_path)]
    for read in (True, False):
        check = PictureCheck()
        found = look_at(paths, read)
        assert found[2:] == [None, None]  # left for the check that needs them to say why
        check.ahead = {p: pictures.Looked(*fields) for p, fields in zip(paths[:2], found[:2], strict=True) if fields}
        assert check.stat(str(cut)).st_size == cut.stat().st_size
        assert [check.ahead[p].read for p in paths[:2]] == [read, read]
        assert check(str(good), check.stat(str(good))) is None
        assert "cannot be decoded" in (check(str(cut), check.stat(str(cut))) or "")


def _stubborn(parent: int) -> None:  # the look-ahead's own start, then a wait that outlives the test's process
    pictures._settle(parent)
    import time

    time.sleep(60)


def _alive(pid: int) -> bool:
    """Whether process *pid* runs (a dead one not reaped yet, a zombie, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="Linux: the kernel kills it (PR_SET_PDEATHSIG)")
def test_the_other_process_dies_with_validate(tmp_path: Path) -> None:
    """A validate killed (SIGKILL, out of memory) leaves no process behind holding its output open."""
    import signal
    import subprocess
    import sys
    import time

    script = (
        "import os, sys, concurrent.futures, multiprocessing\n"
        "from tests.test_pictures_ahead import _stubborn\n"
        "pool = concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context('fork'),"
        " initializer=_stubborn, initargs=(os.getpid(),))\n"
        "pool.submit(print, 'started')\n"
        "print(pool._processes and list(pool._processes)[0], flush=True)\n"
        "import time; time.sleep(60)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).resolve().parent.parent)  # fmt: skip
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    parent.stdout.close()
    for _ in range(500):  # the kernel kills it as its parent dies; a few milliseconds at most
        if not _alive(child):
            break
        time.sleep(0.01)
    else:
        os.kill(child, signal.SIGKILL)
        raise AssertionError("the look-ahead's process outlived validate")


def test_a_done_folder_checked_item_by_item_reads_no_picture_and_looks_up_records_together(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pictures sent and answered as they are now are not read again, also past the look-ahead's start (the
    other process only stats them), and the records of the items coming next are looked up together."""
    from nanobatch.cli.main import main
    from nanobatch.output.results import ResultsIndex

    job = write_job(tmp_path, [{"id": f"i{n}", "image": f"images/{n}.png"} for n in range(30)])
    out = tmp_path / "out"
    assert main(["run", str(job), "--simulate", "--out", str(out), "--quiet"]) == 0
    job.write_text(job.read_text() + "\n# another manifest than the run's: checked item by item\n")
    monkeypatch.setattr(pictures, "START_AFTER", 5)
    monkeypatch.setattr(pictures, "_CHUNK", 4)
    monkeypatch.setattr("nanobatch.job.manifest.TOLD_AHEAD", 3)  # all three scaled down from hundreds
    read: list[str] = []
    real = pictures.file_problem
    monkeypatch.setattr(pictures, "file_problem", lambda path: read.append(path) or real(path))
    one_by_one: list[str] = []
    real_entry = ResultsIndex.ok_entry
    monkeypatch.setattr(ResultsIndex, "ok_entry", lambda self, i: one_by_one.append(i) or real_entry(self, i))
    asked: list[bool] = []  # whether the other process was asked to read each chunk's pictures (or stat them)
    real_submit = concurrent.futures.ProcessPoolExecutor.submit
    monkeypatch.setattr(
        concurrent.futures.ProcessPoolExecutor, "submit",
        lambda self, fn, *args: asked.append(args[1]) or real_submit(self, fn, *args),
    )  # fmt: skip
    result = nanobatch.check_job(job, out_dir=out)
    assert (result.items, result.done_items, result.left_requests) == (30, 30, 0)
    assert read == [] and one_by_one == [] and asked and not any(asked)


def test_a_done_folder_s_outputs_are_stat_ed_ahead_too_and_one_deleted_is_not_counted_done(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past the look-ahead's start, the other process stats a done item's files with its pictures: this one
    does not look for them again, and an item whose image was deleted is work left, as without it."""
    from nanobatch.cli.main import main

    job = write_job(tmp_path, [{"id": f"i{n}", "image": f"images/{n}.png"} for n in range(30)])
    out = tmp_path / "out"
    assert main(["run", str(job), "--simulate", "--out", str(out), "--quiet"]) == 0
    job.write_text(job.read_text() + "\n# another manifest than the run's: checked item by item\n")
    for gone in ("i3", "i12", "i27"):  # one before the look-ahead starts, two after
        image = next(out.glob(f"{gone}.*"))
        os.unlink(image)
        if gone == "i27":
            image.mkdir()  # a folder where the image was is no image either
    monkeypatch.setattr(pictures, "START_AFTER", 5)
    monkeypatch.setattr(pictures, "_CHUNK", 4)
    monkeypatch.setattr("nanobatch.job.manifest.TOLD_AHEAD", 3)  # all three scaled down from hundreds
    looked_for: list[str] = []
    real = os.path.isfile
    monkeypatch.setattr(os.path, "isfile", lambda path: looked_for.append(os.path.basename(path)) or real(path))
    result = nanobatch.check_job(job, out_dir=out)
    assert (result.items, result.done_items, result.left_requests) == (30, 27, 3)
    here = {name.split(".")[0] for name in looked_for if name.startswith("i")}
    assert here == {f"i{n}" for n in range(5)} | {"i12", "i27"}  # the first five, and the two not found ahead


def test_no_process_is_forked_while_another_thread_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """A program with threads of its own gets no look-ahead (a fork would copy their held locks), and none is
    ever started afresh, which would import its main module again."""
    import threading

    monkeypatch.undo()  # the real can_fork
    waiting = threading.Event()
    thread = threading.Thread(target=waiting.wait)
    thread.start()
    try:
        assert not pictures.can_fork()
    finally:
        waiting.set()
        thread.join()


def test_a_check_that_reads_no_pictures_asks_once_about_each_and_still_finds_a_link(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run's check reads no picture, but stats each and asks whether it is a symbolic link into the output
    folder: one lstat answers both for a plain file (it was a stat and an lstat), and a link is still caught."""
    job = write_job(tmp_path, [{"id": f"i{n}", "image": f"images/{n}.png"} for n in range(6)],
                    defaults={"instruction": "white"})  # fmt: skip
    out = tmp_path / "out"
    out.mkdir()
    (out / "i4.png").write_bytes(image_bytes())
    (tmp_path / "images/5.png").unlink()
    (tmp_path / "images/5.png").symlink_to(out / "i4.png")  # i5's picture is the file i4 writes
    asked: list[str] = []
    for name in ("stat", "lstat"):
        real = getattr(os, name)
        monkeypatch.setattr(os, name, lambda path, _real=real, **kw: asked.append(str(path)) or _real(path, **kw))
    with pytest.raises(ManifestError) as err:
        nanobatch.check_job(job, out_dir=out, check_pictures=False, count_done=False)
    assert [(p.item, p.field) for p in err.value.problems] == [("i5", "image")]
    assert [sum(p.endswith(f"/images/{n}.png") for p in asked) for n in range(5)] == [1] * 5
