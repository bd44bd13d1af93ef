"""``validate`` of a done folder answered from the last run's summary (nanobatch.run.unchanged): only while nothing
it rests on has changed since; any change is seen, and the whole check says what it finds."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from nanobatch import models
from nanobatch.cli.main import main
from nanobatch.errors import ManifestError
from nanobatch.job.manifest import Manifest
from nanobatch.run.preflight import check_job

from .fakes import image_bytes

N = 4


def _job(folder: Path) -> Path:
    """A job of N items from a CSV source, each its own picture."""
    (folder / "images").mkdir(parents=True)
    for n in range(N):
        (folder / "images" / f"i{n}.png").write_bytes(image_bytes((40 * n, 90, 160)))
    (folder / "rows.csv").write_text("id,what\n" + "".join(f"i{n},make item {n} white\n" for n in range(N)))
    (folder / "job.yaml").write_text(
        "name: job\ndefaults:\n  aspect_ratio: '1:1'\n"
        "items_from:\n  - csv: rows.csv\n    image: images/{id}.png\n    instruction: '{what}'\n"
    )
    return folder / "job.yaml"


@pytest.fixture
def done(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path, list[int]]:
    """(manifest, output folder, the whole checks made since): a job run to its end."""
    job = _job(tmp_path)
    out = tmp_path / "out"
    assert main(["run", str(job), "--simulate", "--out", str(out), "--quiet"]) == 0
    checks: list[int] = []
    real = Manifest.check
    monkeypatch.setattr(Manifest, "check", lambda self, **kw: checks.append(1) or real(self, **kw))
    return job, out, checks


def test_a_folder_unchanged_since_its_run_is_validated_without_reading_its_items(
    done: tuple[Path, Path, list[int]], capsys: pytest.CaptureFixture[str]
) -> None:
    job, out, checks = done
    result = check_job(job, out_dir=out)
    assert (result.items, result.done_items, result.requests, result.left_requests) == (N, N, N, 0)
    assert (result.cost_likely_usd, result.cost_worst_usd, result.duration_s) == (0.0, 0.0, 0.0)
    assert main(["validate", str(job), "--out", str(out)]) == 0
    assert f"done:      {N} already done in {out} (a run skips them); 0 left" in capsys.readouterr().out
    assert checks == []


def _append_changed_record(out: Path) -> None:
    """Another record of item i0, as a run writes one, for other work (another key)."""
    lines = (out / "results.jsonl").read_text().splitlines()
    record = next(json.loads(line) for line in lines if json.loads(line).get("id") == "i0")
    with (out / "results.jsonl").open("a") as f:
        f.write(json.dumps({**record, "key": "sha256:" + "0" * 64}) + "\n")


CHANGES: dict[str, tuple[Callable[[Path, Path], Any], list[str], int]] = {
    # what changes, the command line's extra options, the items still done
    "the manifest": (lambda job, out: job.write_text(job.read_text().replace("'1:1'", "'4:3'")), [], 0),
    "its CSV source": (
        lambda job, out: (job.parent / "rows.csv").write_text(
            (job.parent / "rows.csv").read_text().replace("make item 2 white", "make item 2 black")
        ),
        [],
        N - 1,
    ),
    "the settings": (lambda job, out: None, ["--model", "gemini-3-pro-image"], 0),
    "results.jsonl": (lambda job, out: _append_changed_record(out), [], N - 1),
    "an input": (lambda job, out: (job.parent / "images" / "i1.png").write_bytes(image_bytes((1, 2, 3))), [], N - 1),
    "an output": (lambda job, out: (out / "i3.png").unlink(), [], N - 1),
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_any_change_since_the_run_is_seen_by_the_whole_check(
    done: tuple[Path, Path, list[int]], change: str, capsys: pytest.CaptureFixture[str]
) -> None:
    job, out, checks = done
    make, options, still_done = CHANGES[change]
    make(job, out)
    assert main(["validate", str(job), "--out", str(out), *options]) == 0
    printed = capsys.readouterr().out
    assert checks == [1]
    if still_done:
        assert f"done:      {still_done} already done in {out} (a run skips them); {N - still_done} left" in printed
    else:
        assert "done:" not in printed and f"requests:  {N} (steps counted)" in printed


def test_a_model_shut_down_since_the_run_is_a_problem_named_where_it_was_written(
    done: tuple[Path, Path, list[int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    job, out, checks = done
    shut = (models.DEFAULT_MODEL, "was shut down at Google")
    monkeypatch.setattr(
        models, "lifecycle_problem", lambda model, base_url, day=None, backend=None: ("error", " ".join(shut))
    )
    with pytest.raises(ManifestError) as caught:
        check_job(job, out_dir=out)
    # The items' model is the settings' (the built-in default): named there, once, not with the first item
    assert [(p.file, p.item, p.field) for p in caught.value.problems] == [
        ("api.model (not set: the built-in default)", None, None)
    ]
    assert checks == [1]


# --- a run over a done folder ----------------------------------------------------------------------------------


def _results(out: Path) -> bytes:
    return (out / "results.jsonl").read_bytes()


def _summary_stats(out: Path) -> dict[str, Any]:
    return dict(json.loads((out / "summary.json").read_text())["last_run"])


def test_a_run_over_a_folder_unchanged_since_its_run_goes_through_no_item(
    done: tuple[Path, Path, list[int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A nightly run over finished work sends nothing and resolves no item: the last run's summary answers, as
    it does validate's; the run's own summary says every item was skipped, and the next night answers alike."""
    job, out, checks = done
    went: list[int] = []
    real = Manifest.items
    monkeypatch.setattr(Manifest, "items", lambda self, **kw: went.append(1) or real(self, **kw))
    before = _results(out)
    for _ in range(2):
        assert main(["run", str(job), "--simulate", "--out", str(out), "--quiet"]) == 0
        stats = _summary_stats(out)
        assert (stats["items"], stats["skipped"], stats["ok"], stats["requests"]) == (N, N, 0, 0)
    assert checks == [] and went == [] and _results(out) == before
    assert check_job(job, out_dir=out).done_items == N


@pytest.mark.parametrize("change", list(CHANGES))
def test_a_run_after_any_change_goes_through_every_item(
    done: tuple[Path, Path, list[int]], change: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    job, out, checks = done
    make, options, still_done = CHANGES[change]
    make(job, out)
    went: list[int] = []
    real = Manifest.items
    monkeypatch.setattr(Manifest, "items", lambda self, **kw: went.append(1) or real(self, **kw))
    assert main(["run", str(job), "--simulate", "--out", str(out), "--quiet", *options]) == 0
    stats = _summary_stats(out)
    assert checks == [1] and went == [1]
    assert (stats["skipped"], stats["ok"]) == (still_done, N - still_done)


@pytest.mark.parametrize("option", ["--force", "--retry-failed"])
def test_a_run_asked_to_redo_work_goes_through_every_item(done: tuple[Path, Path, list[int]], option: str) -> None:
    job, out, checks = done
    assert main(["run", str(job), "--simulate", "--out", str(out), "--quiet", option]) == 0
    stats = _summary_stats(out)
    assert checks == [1]
    assert (stats["skipped"], stats["ok"]) == ((0, N) if option == "--force" else (N, 0))


def test_a_run_reads_the_index_for_the_summary_only_once_the_summary_itself_holds(
    done: tuple[Path, Path, list[int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The usual night (something changed: here another record) reads the folder's index once, for the run
    itself: asking the summary costs nothing then."""
    from nanobatch.output.results import ResultsIndex

    job, out, _ = done
    _append_changed_record(out)
    loads: list[Path] = []
    real = ResultsIndex.load.__func__  # type: ignore[attr-defined]
    monkeypatch.setattr(
        ResultsIndex, "load", classmethod(lambda cls, folder: loads.append(folder) or real(cls, folder))
    )
    assert main(["run", str(job), "--simulate", "--out", str(out), "--quiet"]) == 0
    assert _summary_stats(out)["ok"] == 1 and len(loads) == 1


def test_a_run_that_waited_for_the_folder_looks_at_it_again(
    done: tuple[Path, Path, list[int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """What changed while a run waited for another to let the folder go (--wait-lock) is done: an output
    deleted, an input replaced after its check found every item done."""
    from nanobatch.output.lock import RunLock

    job, out, _ = done
    real_enter = RunLock.__aenter__

    async def enter(self: RunLock) -> RunLock:  # as if another run had held it meanwhile
        (out / "i0.png").unlink()
        (job.parent / "images" / "i1.png").write_bytes(image_bytes((9, 9, 9)))
        held = await real_enter(self)
        self.waited = True
        return held

    monkeypatch.setattr(RunLock, "__aenter__", enter)
    assert main(["run", str(job), "--simulate", "--out", str(out), "--quiet", "--wait-lock"]) == 0
    stats = _summary_stats(out)
    assert (stats["ok"], stats["skipped"]) == (2, N - 2) and (out / "i0.png").is_file()


def test_an_input_moved_into_the_output_folder_behind_a_link_is_seen_by_the_whole_check(
    done: tuple[Path, Path, list[int]],
) -> None:
    """Its path, size and mtime are as its record stamped them; only where it now lies tells. The summary does
    not answer for a folder a run would read from; the whole check looks (and finds the item done: it writes
    elsewhere)."""
    import os

    job, out, checks = done
    picture = job.parent / "images" / "i1.png"
    moved = out / "kept" / "i1-input.png"
    moved.parent.mkdir()
    os.rename(picture, moved)  # keeps its size and mtime
    os.symlink(moved, picture)
    assert check_job(job, out_dir=out).done_items == N
    assert checks == [1]
