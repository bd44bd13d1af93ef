"""``nanobatch qa``: a finished job's images checked again against a tightened ``qa:``, nothing sent; ``--apply``
records the new verdicts (rejected/ folder, append-only records) so that the next run sends only those items."""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path
from typing import Any

import anyio
import pytest
import yaml

import nanobatch
from nanobatch.cli.main import main
from nanobatch.job.fields import ItemFields
from tests.fakes import records, write_job

# The manifest's qa: is read by the branch that brings the checks' settings (qa-checks); the tests that tighten it
# run once it is there. The others hand-make what they need.
needs_qa = pytest.mark.skipif("qa" not in ItemFields.model_fields, reason="the manifest has no qa: yet")

TOO_BIG = 2800  # min_side no simulated answer reaches (they are 1K or 2K; a 1K image of 8:1 could)


def _items(**qa_of: dict[str, Any]) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = [{"id": "a", "image": "images/a.png"}, {"id": "b", "image": "images/b.png"}]
    return [{**item, **({"qa": qa_of[item["id"]]} if item["id"] in qa_of else {})} for item in items]


@pytest.fixture
def done(tmp_path: Path) -> tuple[Path, Path]:
    """A job of two items run to the end against the simulator, with no checks on: (manifest, output folder)."""
    job = write_job(tmp_path, _items())
    out = tmp_path / "out"
    assert main(["run", str(job), "--simulate", "--out", str(out), "--quiet"]) == 0
    return job, out


def _tighten(job: Path, *, top: dict[str, Any] | None = None, **qa_of: dict[str, Any]) -> None:
    """Rewrite *job* with checks: *top* as its top-level qa:, *qa_of* each item's own."""
    doc = yaml.safe_load(job.read_text())
    doc["items"] = _items(**qa_of)
    if top is not None:
        doc["qa"] = top
    job.write_text(yaml.safe_dump(doc, sort_keys=False))


def _reject_by_hand(out: Path, item_id: str, failed: list[str]) -> None:
    """What a run that rejected *item_id* leaves: its image under rejected/, a rejected record with its verdict."""
    (out / "rejected").mkdir(exist_ok=True)
    os.replace(out / f"{item_id}.png", out / "rejected" / f"{item_id}.png")
    last = [r for r in records(out) if r["id"] == item_id][-1]
    line = {**last, "status": "rejected", "outputs": [f"rejected/{item_id}.png"],
            "qa": {"passed": False, "failed": failed, "values": {"min_side": 1024}}}  # fmt: skip
    with (out / "results.jsonl").open("a") as f:
        f.write(json.dumps(line) + "\n")


def _sent_by_next_run(job: Path, out: Path) -> list[str]:
    """The ids the next run of *job* records anew: what it sent."""
    before = len(records(out))
    main(["run", str(job), "--simulate", "--out", str(out), "--quiet"])
    return [r["id"] for r in records(out)[before:]]


@needs_qa
def test_qa_lists_the_images_a_tightened_threshold_fails_and_sends_nothing(
    done: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    job, out = done
    before = (out / "results.jsonl").read_bytes()
    _tighten(job, top={"min_side": TOO_BIG})
    assert main(["qa", str(job), "--out", str(out)]) == 1
    shown = capsys.readouterr().out
    assert "a " in shown and "b " in shown and "min_side" in shown
    assert "2 checked: 0 pass, 2 fail" in shown
    assert "--apply records these 2 new verdicts" in shown
    # Without --apply nothing changes: no record, no image moved.
    assert (out / "results.jsonl").read_bytes() == before
    assert (out / "a.png").is_file() and not (out / "rejected").exists()


@needs_qa
def test_qa_exits_0_when_every_image_passes(done: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    job, out = done
    _tighten(job, top={"min_side": 100})
    assert main(["qa", str(job), "--out", str(out)]) == 0
    assert "2 checked: 2 pass, 0 fail" in capsys.readouterr().out


@needs_qa
def test_apply_rejects_the_failing_item_and_the_next_run_sends_only_it(done: tuple[Path, Path]) -> None:
    job, out = done
    paid = json.loads((out / "summary.json").read_text())["paid_usd"]
    _tighten(job, a={"min_side": TOO_BIG})
    assert main(["qa", str(job), "--out", str(out), "--apply"]) == 1
    assert not (out / "a.png").exists() and (out / "rejected" / "a.png").is_file()
    assert (out / "b.png").is_file()
    last = records(out)[-1]
    assert last["id"] == "a" and last["status"] == "rejected" and last["outputs"] == ["rejected/a.png"]
    assert last["qa"]["passed"] is False and last["qa"]["failed"] == ["min_side"]
    assert last["qa"]["values"]["min_side"] < TOO_BIG
    # A verdict costs nothing: what the folder paid stays what the run paid, and summary.json counts anew.
    summary = json.loads((out / "summary.json").read_text())
    assert summary["paid_usd"] == paid and summary["counts"]["ok"] == 1
    # Recorded once: a second --apply finds the same verdict and adds no line.
    lines = len(records(out))
    assert main(["qa", str(job), "--out", str(out), "--apply"]) == 1
    assert len(records(out)) == lines
    assert _sent_by_next_run(job, out) == ["a"]


def test_apply_puts_a_rejected_image_that_passes_now_back_and_the_next_run_sends_nothing(
    done: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    job, out = done
    _reject_by_hand(out, "a", ["background"])
    _tighten(job, top={"min_side": 100})  # the background no longer asked for: the rejected image passes
    assert main(["qa", str(job), "--out", str(out), "--apply"]) == 0
    assert "1 ok again" in capsys.readouterr().out
    assert (out / "a.png").is_file() and not (out / "rejected" / "a.png").exists()
    last = records(out)[-1]
    assert last["id"] == "a" and last["status"] == "ok" and last["outputs"] == ["a.png"]
    assert last["qa"]["passed"] is True and last["error"] is None
    assert _sent_by_next_run(job, out) == []


def test_apply_never_replaces_a_file_nanobatch_did_not_write(
    done: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    job, out = done
    _reject_by_hand(out, "a", ["background"])
    _tighten(job, top={"min_side": 100})
    (out / "a.png").write_bytes(b"the user's own picture")
    lines = len(records(out))
    assert main(["qa", str(job), "--out", str(out), "--apply"]) == 1
    assert "a: not recorded" in capsys.readouterr().err
    assert (out / "a.png").read_bytes() == b"the user's own picture"
    assert (out / "rejected" / "a.png").is_file()
    assert len(records(out)) == lines and records(out)[-1]["status"] == "rejected"


@needs_qa
def test_a_users_copy_where_apply_was_refused_is_never_taken_for_the_image_it_would_have_moved(
    done: tuple[Path, Path],
) -> None:
    # The user keeps a copy of a's first edit (cp -p) under rejected/ where --apply would put it: the move is
    # refused and no record says so. A later run, the threshold set back and the edit changed, took the copy for
    # the image --apply claimed to move there and deleted it as a's out-of-date rejected image.
    job, out = done
    (out / "rejected").mkdir()
    st = (out / "a.png").stat()
    copy = out / "rejected" / "a.png"
    copy.write_bytes((out / "a.png").read_bytes())
    os.utime(copy, ns=(st.st_atime_ns, st.st_mtime_ns))
    _tighten(job, a={"min_side": TOO_BIG})
    assert main(["qa", str(job), "--out", str(out), "--apply"]) == 1  # refused: a file is there

    doc = yaml.safe_load(job.read_text())
    doc["items"] = [{**item, "instruction": "blur the background"} for item in _items()]
    job.write_text(yaml.safe_dump(doc, sort_keys=False))
    assert main(["run", str(job), "--simulate", "--out", str(out), "--quiet"]) == 0

    assert copy.is_file() and copy.read_bytes() != (out / "a.png").read_bytes()


def test_apply_refuses_a_folder_a_run_holds_and_changes_nothing(
    done: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    job, out = done
    _reject_by_hand(out, "a", ["background"])
    before = (out / "results.jsonl").read_bytes()
    with (out / ".nanobatch.lock").open("r+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # as a run does
        assert main(["qa", str(job), "--out", str(out), "--apply"]) == 4
        assert "another nanobatch run holds" in capsys.readouterr().err
        # Only reading: a look without --apply needs no lock.
        assert main(["qa", str(job), "--out", str(out)]) == 0
    assert (out / "results.jsonl").read_bytes() == before
    assert (out / "rejected" / "a.png").is_file()


def test_json_lists_each_verdict_for_scripts(done: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    job, out = done
    _reject_by_hand(out, "b", ["min_fill"])
    assert main(["qa", str(job), "--out", str(out), "--json"]) == 0
    found = json.loads(capsys.readouterr().out)
    assert found["counts"]["checked"] == 2 and found["counts"]["failed"] == 0 and found["applied"] is False
    assert [item["id"] for item in found["passing_again"]] == ["b"]
    assert found["passing_again"][0]["status"] == "rejected" and found["passing_again"][0]["passed"] is True
    assert found["exit_code"] == 0


def test_a_bad_manifest_or_a_folder_without_results_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    job = write_job(tmp_path, [{"id": "a", "image": "images/a.png", "instrction": "x"}])
    assert main(["qa", str(job), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "item 'a', field 'instrction'" in err
    job = write_job(tmp_path, [{"id": "a", "image": "images/a.png"}])
    assert main(["qa", str(job), "--out", str(tmp_path / "out")]) == 2
    assert "no results.jsonl" in capsys.readouterr().err


@needs_qa
def test_the_python_api_returns_the_failing_items(done: tuple[Path, Path]) -> None:
    job, out = done
    _tighten(job, b={"min_side": TOO_BIG})

    async def go() -> nanobatch.RecheckResult:
        return await nanobatch.recheck(job, out_dir=out)

    result = anyio.run(go)
    assert [item.id for item in result.failing] == ["b"]
    assert result.failing[0].verdict.failed == ("min_side",) and result.exit_code == 1
    assert result.checked == 2 and result.passed == 1 and not result.applied


@needs_qa
def test_an_image_that_cannot_be_read_is_named_and_fails_the_command(
    done: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    job, out = done
    (out / "b.png").write_bytes(b"not a picture any more")
    _tighten(job, top={"min_side": 100})
    assert main(["qa", str(job), "--out", str(out), "--apply"]) == 1
    told = capsys.readouterr()
    assert "1 items not checked (an image or its input cannot be read): b" in told.out
    assert f"b: not checked: {out / 'b.png'}: not an image that can be decoded" in told.err  # the file, not a buffer
    assert [r["status"] for r in records(out) if r["id"] == "b"] == ["ok"]  # nothing recorded for it


@needs_qa
def test_an_input_gone_since_the_run_leaves_out_only_the_checks_that_compare_with_it(done: tuple[Path, Path]) -> None:
    job, out = done
    (job.parent / "images" / "a.png").unlink()
    _tighten(job, top={"changed": True, "min_side": TOO_BIG})

    async def go() -> nanobatch.RecheckResult:
        return await nanobatch.recheck(job, out_dir=out)

    result = anyio.run(go)
    by_id = {item.id: item.verdict for item in result.failing}
    assert by_id["a"].failed == ("min_side",) and "changed" not in by_id["a"].values
    assert "changed" in by_id["b"].values  # its input is still there: measured


@needs_qa
@pytest.mark.parametrize("input_now", ["gone", "undecodable"])
def test_a_rejected_image_whose_input_is_gone_stays_rejected_it_is_not_passed_on_the_checks_left(
    done: tuple[Path, Path], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, input_now: str
) -> None:
    # Rejected as another product; its input archived since (or in a type Pillow cannot read): the checks that
    # compare with it cannot be measured, and passing the rest must not bring a wrong product back to the catalog.
    job, out = done
    _reject_by_hand(out, "a", ["same_subject"])
    picture = job.parent / "images" / "a.png"
    if input_now == "gone":
        picture.unlink()
    else:  # a HEIC photo, say, which the API took and Pillow cannot read
        heic = b"\x00\x00\x00\x18ftypheic" + bytes(64)

        async def undecodable(item: Any, loader: Any) -> tuple[bytes, None]:
            return heic, None

        monkeypatch.setattr("nanobatch.run.recheck._original", undecodable)
    _tighten(job, top={"same_subject": True, "changed": True})

    assert main(["qa", str(job), "--out", str(out), "--apply"]) == 1

    told = capsys.readouterr()
    assert "1 items not checked (an image or its input cannot be read): a" in told.out
    assert "a: not checked: it passes all but the checks that compare it with its input" in told.err
    assert records(out)[-1]["status"] == "rejected" and (out / "rejected" / "a.png").is_file()
    assert not (out / "a.png").exists()


@needs_qa
def test_checks_that_are_on_are_said_on_when_no_image_is_there_to_check(
    done: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    job, out = done
    for name in ("a.png", "b.png"):
        (out / name).unlink()
    _tighten(job, top={"min_side": 100})

    assert main(["qa", str(job), "--out", str(out)]) == 0

    said = capsys.readouterr().out
    assert "no check is on" not in said and "0 checked: 0 pass, 0 fail; 2 not done" in said


@needs_qa
def test_an_apply_killed_before_its_records_leaves_the_next_run_nothing_to_pay_for(done: tuple[Path, Path]) -> None:
    # --apply moved a.png under rejected/ and died before the record saying so: the records still call a ok, at
    # a.png. The next run finds the file there as nanobatch left it and puts it back where the record says,
    # sending nothing; --apply, run again, sets it aside for good.
    from tests.fakes import killed_before_the_records

    job, out = done
    paid = json.loads((out / "summary.json").read_text())["paid_usd"]
    _tighten(job, a={"min_side": TOO_BIG})
    with killed_before_the_records():
        main(["qa", str(job), "--out", str(out), "--apply"])
    assert (out / "rejected" / "a.png").is_file() and records(out)[-1]["status"] == "ok"
    _tighten(job)  # the threshold set back

    assert main(["run", str(job), "--simulate", "--out", str(out), "--quiet"]) == 0
    assert json.loads((out / "summary.json").read_text())["paid_usd"] == paid
    assert (out / "a.png").is_file() and not (out / "rejected" / "a.png").exists()


@needs_qa
@pytest.mark.parametrize("set_back", [False, True])
def test_an_apply_killed_before_its_records_is_finished_by_the_next_apply(
    done: tuple[Path, Path], capsys: pytest.CaptureFixture[str], set_back: bool
) -> None:
    # A CI timeout killed --apply after it moved a.png under rejected/, before the records: a.png is neither
    # where its record says nor "not done". The next --apply checks it where it is and records the verdict:
    # rejected there (the threshold as tight), or ok with its image put back (the threshold set back).
    from tests.fakes import killed_before_the_records

    job, out = done
    _tighten(job, a={"min_side": TOO_BIG})
    with killed_before_the_records():
        main(["qa", str(job), "--out", str(out), "--apply"])
    assert (out / "rejected" / "a.png").is_file() and records(out)[-1]["status"] == "ok"
    if set_back:
        _tighten(job, a={"min_side": 100})
    capsys.readouterr()

    assert main(["qa", str(job), "--out", str(out), "--apply"]) == (0 if set_back else 1)

    said = capsys.readouterr().out
    assert "not done" not in said and "2 checked" in said
    last = records(out)[-1]
    assert last["id"] == "a" and last["status"] == ("ok" if set_back else "rejected")
    assert (out / "a.png").is_file() == set_back and (out / "rejected" / "a.png").is_file() != set_back
    if set_back:
        assert "1 ok, put back where a qa --apply that did not finish had moved them" in said
    assert _sent_by_next_run(job, out) == ([] if set_back else ["a"])


def test_apply_with_no_check_on_records_nothing_and_puts_no_rejected_image_back(
    done: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    # The checks were in a config file this --apply was not given: every image would pass, every rejected one
    # would come back among the good ones (and be uploaded by the next run). Nothing is recorded.
    job, out = done
    _reject_by_hand(out, "a", ["background"])
    lines = len(records(out))

    assert main(["qa", str(job), "--out", str(out), "--apply"]) == 0

    assert "nothing recorded: with no check on, --apply would pass every image" in capsys.readouterr().out
    assert len(records(out)) == lines and (out / "rejected" / "a.png").is_file() and not (out / "a.png").exists()


@needs_qa
def test_apply_records_the_checks_a_still_rejected_image_fails_now(
    done: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    # Rejected for its background and its size; the background check turned off since: its record, its error and
    # its card must name the check it fails now, not the one no longer asked.
    job, out = done
    _reject_by_hand(out, "a", ["background", "min_side"])
    _tighten(job, top={"min_side": TOO_BIG}, b={"min_side": 100})
    capsys.readouterr()

    assert main(["qa", str(job), "--out", str(out), "--apply"]) == 1

    last = records(out)[-1]
    assert last["id"] == "a" and last["status"] == "rejected" and last["qa"]["failed"] == ["min_side"]
    assert last["outputs"] == ["rejected/a.png"] and "min_side" in last["error"]["message"]
    assert "1 still rejected, for the checks they fail now" in capsys.readouterr().out
    assert main(["qa", str(job), "--out", str(out), "--apply"]) == 1
    assert "nothing to record" in capsys.readouterr().out


@needs_qa
def test_an_item_whose_work_changed_since_is_not_done_for_qa_as_for_validate(
    done: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    # Its instruction edited after the run: the next run makes it anew, so its old image is neither checked nor
    # set aside (a record for an image about to be replaced), and qa counts it where validate does.
    job, out = done
    _tighten(job, top={"min_side": TOO_BIG})
    job.write_text(job.read_text().replace("id: a\n", "id: a\n  instruction: make it sepia\n", 1))
    capsys.readouterr()

    assert main(["qa", str(job), "--out", str(out), "--apply"]) == 1

    assert "1 checked: 0 pass, 1 fail (1 of them recorded ok until now); 1 not done" in capsys.readouterr().out
    assert [r["id"] for r in records(out)[2:]] == ["b"] and (out / "a.png").is_file()
    assert nanobatch.check_job(job, out_dir=out).done_items == 0  # validate: a is work left (b rejected now)


@needs_qa
@pytest.mark.parametrize("rewritten", ["same bytes", "other bytes of the same size"])
def test_an_item_whose_input_was_only_touched_is_checked(
    done: tuple[Path, Path], capsys: pytest.CaptureFixture[str], rewritten: str
) -> None:
    # A sync tool rewrote the photo with the same bytes: a run finds the item done (it hashes the file again), so
    # qa must check it too, or a failing image is never set aside (it said "not done", and the run sent nothing);
    # and validate counts it done, as the run does. Other bytes of the same size are other work.
    job, out = done
    _tighten(job, top={"min_side": TOO_BIG})
    picture = job.parent / "images" / "a.png"
    if rewritten != "same bytes":
        data = bytearray(picture.read_bytes())
        data[-20] ^= 0xFF  # (inside the PNG's last chunk's CRC: the size is kept)
        picture.write_bytes(bytes(data))
    os.utime(picture, ns=(picture.stat().st_atime_ns, picture.stat().st_mtime_ns + 10**9))

    assert main(["qa", str(job), "--out", str(out)]) == 1

    said = capsys.readouterr().out
    if rewritten == "same bytes":
        assert "2 checked: 0 pass, 2 fail" in said
    else:
        assert "1 checked: 0 pass, 1 fail (1 of them recorded ok until now); 1 not done" in said
    assert nanobatch.check_job(job, out_dir=out, check_pictures=False).done_items == (
        2 if rewritten == "same bytes" else 1
    )
