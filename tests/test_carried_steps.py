"""A multi-step item cut off between its steps goes on, in the next run, from the step it paid for."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest

import nanobatch

from .conftest import run_virtual
from .emulators import Emulator, new_bucket
from .fakes import (
    FakeGemini,
    google_error,
    image_bytes,
    inline,
    killed_before_the_records,
    ok_body,
    records,
    run,
    run_now,
    taken_at_write,
    write_job,
)
from .test_upload import puts_failing_for

STEPS = ["crop it", "make it white", "add a shadow"]
HERO = {"id": "hero", "image": "images/h.png", "steps": STEPS}
KEPT = "out/.nanobatch-steps/hero.step2.png"
STEP_2 = image_bytes((10, 200, 10))  # what "make it white" answers: the image step 3 must edit


def sent_image(request: Any) -> bytes:
    """The image a request carries."""
    parts = json.loads(request.content)["contents"][0]["parts"]
    return base64.b64decode(next(p["inlineData"]["data"] for p in parts if "inlineData" in p))


def capped(n: int) -> nanobatch.Settings:
    return nanobatch.load_settings(overrides={"budget.max_requests": n, "limits.concurrency": 1})


def folder(out: Path) -> dict[str, Any]:
    return dict(json.loads((out / "summary.json").read_text()))


def stopped_after_step_2(tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    job = write_job(tmp_path, [HERO])
    run(job, FakeGemini({"make it white": [ok_body(inline(STEP_2))]}), tmp_path / "out", settings=capped(2))
    (record,) = records(tmp_path / "out")
    return job, record


def test_a_night_stopped_between_steps_keeps_the_latest_steps_image_beside_its_failed_record(tmp_path: Path) -> None:
    _, record = stopped_after_step_2(tmp_path)
    assert (record["status"], record["error"]["kind"], record["error"]["step"]) == ("failed", "stopped", 3)
    assert record["steps"][1]["outputs"] == [".nanobatch-steps/hero.step2.png"] and record["outputs"] == []
    assert (tmp_path / KEPT).read_bytes() == STEP_2
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if p.suffix == ".png") == []  # nothing published


def test_the_next_night_sends_only_the_steps_left_and_pays_each_step_once(tmp_path: Path) -> None:
    job, first = stopped_after_step_2(tmp_path)
    fake = FakeGemini()

    summary = run(job, fake, tmp_path / "out")

    assert summary.exit_code == 0 and fake.instructions() == ["add a shadow"]
    assert sent_image(fake.requests[0]) == STEP_2  # it edits what step 2 answered, not the input
    done = records(tmp_path / "out")[-1]
    assert (done["status"], done["outputs"]) == ("ok", ["hero.png"]) and len(done["steps"]) == 3
    # The record counts what this night paid (step 3), and refers to the night that paid steps 1 and 2.
    assert done["paid_in"] == {"run": first["run"], "cost_usd": first["cost_usd"]}
    assert done["cost_usd"] == pytest.approx(first["cost_usd"] / 2)
    assert done["usage"]["totalTokenCount"] == 3 * 2432  # the item's whole usage, over its three steps
    assert folder(tmp_path / "out")["paid_usd"] == pytest.approx(first["cost_usd"] * 3 / 2)  # three steps, once each
    assert not (tmp_path / KEPT).exists()  # done: the kept step is nanobatch's to delete, and it does


def test_a_night_stopped_twice_goes_on_from_where_the_second_one_stopped(tmp_path: Path) -> None:
    job = write_job(tmp_path, [HERO])
    out = tmp_path / "out"
    fakes = [FakeGemini(), FakeGemini(), FakeGemini()]
    run(job, fakes[0], out, settings=capped(1))
    run(job, fakes[1], out, settings=capped(1))
    assert (out / ".nanobatch-steps/hero.step2.png").exists() and not (out / ".nanobatch-steps/hero.step1.png").exists()
    run(job, fakes[2], out)

    assert [f.instructions() for f in fakes] == [["crop it"], ["make it white"], ["add a shadow"]]
    lines = records(out)
    assert [r["status"] for r in lines] == ["failed", "failed", "ok"]
    assert [r["cost_usd"] for r in lines] == pytest.approx([lines[0]["cost_usd"]] * 3)  # each night paid one step
    assert lines[2]["paid_in"] == {"run": lines[1]["run"], "cost_usd": pytest.approx(2 * lines[0]["cost_usd"])}
    assert folder(out)["paid_usd"] == pytest.approx(3 * lines[0]["cost_usd"])


def test_a_fatal_answer_to_a_later_step_keeps_the_step_before_it(tmp_path: Path) -> None:
    job = write_job(tmp_path, [HERO])
    revoked = google_error(401, "UNAUTHENTICATED", "API key not valid")
    run(job, FakeGemini({"add a shadow": [revoked]}), tmp_path / "out", settings=capped(10))
    fake = FakeGemini()
    assert run(job, fake, tmp_path / "out").exit_code == 0 and fake.instructions() == ["add a shadow"]


@pytest.mark.parametrize("change", ["the work", "the kept image", "--force"])
def test_a_kept_step_is_used_only_for_the_same_work_as_nanobatch_left_it(tmp_path: Path, change: str) -> None:
    job, _ = stopped_after_step_2(tmp_path)
    force = False
    if change == "the work":
        job = write_job(tmp_path, [{**HERO, "steps": [*STEPS[:2], "add a soft shadow"]}])
    elif change == "the kept image":
        (tmp_path / KEPT).write_bytes(image_bytes((1, 2, 3)))  # someone's retouch: not nanobatch's any more
    else:
        force = True
    fake = FakeGemini()

    assert run(job, fake, tmp_path / "out", force=force).exit_code == 0
    assert len(fake.instructions()) == 3  # sent from its first step
    # The kept image is deleted with the record that no longer names it, unless it is not as nanobatch left it.
    assert (tmp_path / KEPT).exists() == (change == "the kept image")


def test_status_says_how_many_stopped_items_go_on_from_a_step_already_paid_for(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from nanobatch.cli.main import main

    stopped_after_step_2(tmp_path)
    capsys.readouterr()
    assert main(["status", str(tmp_path / "out")]) == 0
    assert "  stopped: 1\n  1 of them go on from a step already paid for (its image kept)\n" in capsys.readouterr().out


def test_a_time_limit_whose_grace_runs_out_during_a_later_step_keeps_the_steps_paid_for(tmp_path: Path) -> None:
    # Each step takes 10 s; the limit at 25 s with 2 s of grace cancels step 3 in flight: steps 1 and 2 were paid.
    import anyio
    import httpx2

    job = write_job(tmp_path, [HERO])
    fake = FakeGemini()

    async def slow(request: httpx2.Request) -> httpx2.Response:
        await anyio.sleep(10)
        return fake(request)

    settings = nanobatch.load_settings(overrides={"limits.max_duration_s": 25, "limits.grace_s": 2})
    out = tmp_path / "out"
    transport = httpx2.MockTransport(slow)
    summary = run_virtual(lambda: nanobatch.run_job(job, settings=settings, transport=transport, out_dir=out))
    assert summary.exit_code == 3 and len(fake.requests) == 2  # (step 3 was cancelled before it was answered)
    (record,) = records(out)
    assert (record["error"]["kind"], record["error"]["step"]) == ("stopped", 3) and record["cost_usd"] > 0
    assert (tmp_path / KEPT).is_file()
    again = FakeGemini()
    assert run(job, again, out).exit_code == 0 and again.instructions() == ["add a shadow"]


def test_a_night_refused_before_it_sends_still_keeps_the_step_for_the_night_after(tmp_path: Path) -> None:
    # Night 2 finds a file of the user's where the item's image goes: nothing is sent, and its record must still
    # name the kept step and what it cost, or night 3 (the file moved away) pays for steps 1 and 2 again.
    job, first = stopped_after_step_2(tmp_path)
    (tmp_path / "out" / "hero.png").write_bytes(b"mine")
    refused = FakeGemini()
    assert run(job, refused, tmp_path / "out").exit_code == 1 and not refused.requests
    second = records(tmp_path / "out")[-1]
    assert second["error"]["kind"] == "output_exists" and second["steps"][1]["outputs"] == [KEPT[4:]]
    assert second["paid_in"]["cost_usd"] == pytest.approx(first["cost_usd"]) and second["cost_usd"] == 0
    (tmp_path / "out" / "hero.png").unlink()
    third = FakeGemini()
    assert run(job, third, tmp_path / "out").exit_code == 0 and third.instructions() == ["add a shadow"]
    assert folder(tmp_path / "out")["paid_usd"] == pytest.approx(first["cost_usd"] * 3 / 2)


def test_a_new_output_name_for_the_same_work_goes_on_from_the_kept_step(tmp_path: Path) -> None:
    job, _ = stopped_after_step_2(tmp_path)
    job = write_job(tmp_path, [{**HERO, "output": "shop/{id}"}])
    fake = FakeGemini()
    assert run(job, fake, tmp_path / "out").exit_code == 0 and fake.instructions() == ["add a shadow"]
    assert (tmp_path / "out/shop/hero.png").is_file() and not (tmp_path / KEPT).exists()


def test_a_keep_steps_item_cut_off_writes_the_step_images_its_record_names(tmp_path: Path) -> None:
    job = write_job(tmp_path, [{**HERO, "keep_steps": True}])
    run(job, FakeGemini({"make it white": [ok_body(inline(STEP_2))]}), tmp_path / "out", settings=capped(2))
    (record,) = records(tmp_path / "out")
    named = [name for step in record["steps"] for name in step.get("outputs") or []]
    assert named == ["hero.step1.png", "hero.step2.png"]
    assert (tmp_path / "out/hero.step2.png").read_bytes() == STEP_2 and all(record["file_stamps"])


def test_a_file_of_yours_that_appears_as_the_image_is_written_does_not_lose_the_kept_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Night 2 answers step 3, and a file of the user's appears at hero.png just before the write: refused (never
    # overwritten). Its failed record must still name the kept step, or night 3 pays for steps 1 and 2 again.
    job, first = stopped_after_step_2(tmp_path)
    with taken_at_write(tmp_path / "out", "hero.png"):
        assert run(job, FakeGemini(), tmp_path / "out").exit_code == 1
    second = records(tmp_path / "out")[-1]
    assert second["error"]["kind"] == "output_exists" and second["steps"][1]["outputs"] == [KEPT[4:]]
    assert (tmp_path / "out" / "hero.png").read_bytes() == b"mine"
    (tmp_path / "out" / "hero.png").unlink()
    third = FakeGemini()
    assert run(job, third, tmp_path / "out").exit_code == 0 and third.instructions() == ["add a shadow"]


def test_paid_in_names_the_night_that_paid_not_one_that_failed_again_at_no_cost(tmp_path: Path) -> None:
    job, first = stopped_after_step_2(tmp_path)
    refused = google_error(400, "INVALID_ARGUMENT", "Request contains an invalid argument.")
    run(job, FakeGemini({"add a shadow": [refused]}), tmp_path / "out")  # a 400 is not billed
    assert records(tmp_path / "out")[-1]["cost_usd"] == 0
    assert run(job, FakeGemini(), tmp_path / "out").exit_code == 0
    assert records(tmp_path / "out")[-1]["paid_in"] == {"run": first["run"], "cost_usd": first["cost_usd"]}


def test_an_upload_that_fails_on_the_night_that_goes_on_keeps_the_kept_step(gcs_env: Emulator, tmp_path: Path) -> None:
    upload = {"output.upload_to": f"gs://{new_bucket('gs')}/edited", "limits.concurrency": 1}
    job = write_job(tmp_path, [HERO])
    out = tmp_path / "out"
    settings = nanobatch.load_settings(env={}, overrides=upload)
    run_now(
        job, FakeGemini(), out, settings=nanobatch.load_settings(env={}, overrides={**upload, "budget.max_requests": 2})
    )
    assert records(out)[-1]["steps"][1]["outputs"] == [KEPT[4:]]
    second = FakeGemini()
    with puts_failing_for("hero.png"):  # night 2 answers step 3; its PUT fails (kind upload)
        run_now(job, second, out, settings=settings)
    assert second.instructions() == ["add a shadow"]
    assert records(out)[-1]["error"]["kind"] == "upload" and (tmp_path / KEPT).is_file()
    third = FakeGemini()
    run_now(job, third, out, settings=settings)
    assert third.instructions() == ["add a shadow"]  # steps 1 and 2 were paid by night 1, never answered again


def test_a_night_killed_between_its_image_and_its_record_does_not_lose_the_kept_step(tmp_path: Path) -> None:
    job, _ = stopped_after_step_2(tmp_path)
    second = FakeGemini()
    with killed_before_the_records():  # night 2 answers step 3, writes hero.png, dies before its record
        run(job, second, tmp_path / "out")
    third = FakeGemini()
    run(job, third, tmp_path / "out")
    # kill -9 may cost the step in flight (step 3, as for any item); steps 1 and 2 were paid by night 1
    assert third.instructions() == ["add a shadow"]


def test_a_nights_token_counts_are_what_it_used_not_the_steps_earlier_nights_paid(tmp_path: Path) -> None:
    job, first = stopped_after_step_2(tmp_path)
    refused = FakeGemini()
    (tmp_path / "out" / "hero.png").write_bytes(b"mine")
    run(job, refused, tmp_path / "out")  # night 2 sends nothing (a file of yours at hero.png)
    assert not refused.requests
    (tmp_path / "out" / "hero.png").unlink()
    run(job, FakeGemini(), tmp_path / "out")  # night 3 sends step 3
    assert folder(tmp_path / "out")["last_run"]["tokens"]["totalTokenCount"] == 2432  # one request's


def test_status_does_not_count_a_kept_image_no_record_goes_on_from(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from nanobatch.cli.main import main

    job, _ = stopped_after_step_2(tmp_path)
    (tmp_path / KEPT).write_bytes(image_bytes((1, 2, 3)))  # retouched: nanobatch leaves it where it is
    assert run(job, FakeGemini(), tmp_path / "out").exit_code == 0  # sent from step 1, done
    assert records(tmp_path / "out")[-1]["status"] == "ok" and (tmp_path / KEPT).exists()
    capsys.readouterr()
    assert main(["status", str(tmp_path / "out"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["counts"]["ok"] == 1 and info["steps_kept"] == 0  # every item is done: none goes on from a step


def test_an_input_that_cannot_be_downloaded_for_a_night_does_not_lose_the_kept_step(tmp_path: Path) -> None:
    import httpx2

    from .test_inputs import Host, routed

    url = "https://cdn.example.com/h.png"
    picture = image_bytes((9, 9, 9))
    job = write_job(tmp_path, [{**HERO, "image": url}])
    out = tmp_path / "out"

    def night(answer: Any, **options: Any) -> FakeGemini:
        api = FakeGemini()
        host = Host({url: [answer]})
        run_virtual(lambda: nanobatch.run_job(job, transport=routed(api, host), out_dir=out, **options))
        return api

    night(picture, settings=capped(2))
    first = records(out)[-1]
    assert first["steps"][1]["outputs"] == [KEPT[4:]]
    assert not night(httpx2.Response(404)).requests  # night 2: the CDN does not have it for a while; nothing sent
    second = records(out)[-1]
    assert second["steps"][1]["outputs"] == [KEPT[4:]] and second["paid_in"]["cost_usd"] == first["cost_usd"]
    third = night(picture)  # night 3: back, the same bytes: the same work
    assert third.instructions() == ["add a shadow"]  # steps 1 and 2 were paid by night 1


def test_a_retouched_kept_image_does_not_make_every_later_stop_pay_its_steps_again(tmp_path: Path) -> None:
    # A kept image retouched is left where it is, and the item is sent from step 1. Night 2 is stopped after step 2
    # again: its step 2 is kept under a free name beside the retouch (the record says stopped, not output_exists),
    # and night 3 goes on from it.
    job, first = stopped_after_step_2(tmp_path)
    out = tmp_path / "out"
    (tmp_path / KEPT).write_bytes(image_bytes((1, 2, 3)))  # retouched
    second = FakeGemini()
    run(job, second, out, settings=capped(2))
    assert second.instructions() == ["crop it", "make it white"]
    stopped = records(out)[-1]
    third = FakeGemini()
    run(job, third, out)
    assert stopped["error"]["kind"] == "stopped" and stopped["steps"][1]["outputs"] == [
        ".nanobatch-steps/hero~1.step2.png"
    ]
    assert (tmp_path / KEPT).read_bytes() == image_bytes((1, 2, 3))  # the retouch, left as it is
    assert third.instructions() == ["add a shadow"]  # night 2 paid steps 1 and 2


def test_a_kept_image_deleted_by_hand_sends_the_item_from_its_first_step_and_refers_to_no_earlier_night(
    tmp_path: Path,
) -> None:
    job, first = stopped_after_step_2(tmp_path)
    (tmp_path / KEPT).unlink()
    fake = FakeGemini()
    assert run(job, fake, tmp_path / "out").exit_code == 0 and len(fake.instructions()) == 3
    done = records(tmp_path / "out")[-1]
    assert done.get("paid_in") is None and done["cost_usd"] == pytest.approx(first["cost_usd"] * 3 / 2)
    assert done["usage"]["totalTokenCount"] == 3 * 2432  # this night's three steps, nothing of the earlier one
