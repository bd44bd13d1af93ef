"""Honest counts: each paid request counted once, in results.jsonl, summary.json, status and the report."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest

import nanobatch
from nanobatch.cli.main import main
from nanobatch.cli.report import write_report
from nanobatch.output.results import ResultsIndex

from .fakes import FakeGemini, google_error, ok_body, records, run, write_job


def usage(output_tokens: int) -> dict[str, int]:
    return {"promptTokenCount": 1000, "candidatesTokenCount": output_tokens, "totalTokenCount": 1000 + output_tokens}


def priced() -> FakeGemini:
    """Each instruction answered with its own usage, so that every item costs something different."""
    return FakeGemini({f"edit {name}": [ok_body(usage=usage(1120 + 100 * n))]
                       for n, name in enumerate(["a", "b", "b again", "c", "d"])})  # fmt: skip


def items(**changes: dict[str, Any]) -> list[dict[str, Any]]:
    """Items a-d (each its own instruction), with *changes* to some; an item changed to ``{}`` is dropped."""
    rows = {name: {"id": name, "image": f"images/{name}.png", "instruction": f"edit {name}"} for name in "abcd"}
    return [{**row, **changes[name]} if name in changes else row for name, row in rows.items()
            if changes.get(name, True)]  # fmt: skip


def panel(out: Path) -> dict[str, str]:
    page = write_report(out).read_text(encoding="utf-8")
    totals = page.split('<dl class="totals">')[1].split("</dl>")[0]
    return dict(re.findall(r"<dt>([^<]*)</dt><dd[^>]*>([^<]*)</dd>", totals))


def test_a_rerun_that_moves_redoes_and_drops_items_counts_each_paid_request_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    fake = priced()
    assert run(write_job(tmp_path, items()), fake, out).exit_code == 0
    first = {r["id"]: r for r in records(out)}
    # moved (a new output name), redone (a new instruction), dropped (the row removed), unchanged
    job = write_job(tmp_path, items(a={"output": "moved/{id}"}, b={"instruction": "edit b again"}, c={}))
    assert run(job, fake, out).exit_code == 0 and len(fake.requests) == 5  # b alone was sent again
    lines = records(out)
    moved, redone = lines[-2:] if lines[-1]["id"] == "b" else lines[-1:-3:-1]
    assert moved["moved_from"] == ["a.png"] and moved["cost_usd"] == 0
    assert moved["paid_in"] == {"run": first["a"]["run"], "cost_usd": first["a"]["cost_usd"]}

    paid = sum(r["cost_usd"] for r in first.values()) + redone["cost_usd"]
    current = first["a"]["cost_usd"] + redone["cost_usd"] + first["c"]["cost_usd"] + first["d"]["cost_usd"]
    assert sum(r["cost_usd"] for r in lines) == pytest.approx(paid)  # summing the file counts each request once
    summary = json.loads((out / "summary.json").read_text())
    assert summary["cost_usd"] == pytest.approx(current) and summary["paid_usd"] == pytest.approx(paid)
    assert summary["last_run"]["cost_usd"] == pytest.approx(redone["cost_usd"])
    assert main(["status", str(out), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert (status["cost_usd"], status["paid_usd"]) == (summary["cost_usd"], summary["paid_usd"])
    assert main(["status", str(out)]) == 0
    assert f"cost: ${current:.4f} for the results held now; ${paid:.4f} paid by all runs" in capsys.readouterr().out
    totals = panel(out)
    assert (totals["cost"], totals["paid by all runs"]) == (f"${current:.4f}", f"${paid:.4f}")

    # Moved again: still paid for once, by the first run.
    job = write_job(tmp_path, items(a={"output": "again/{id}"}, b={"instruction": "edit b again"}, c={}))
    assert run(job, fake, out).exit_code == 0 and len(fake.requests) == 5
    again = records(out)[-1]
    assert again["moved_from"] == ["moved/a.png"] and again["paid_in"] == moved["paid_in"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["cost_usd"] == pytest.approx(current) and summary["paid_usd"] == pytest.approx(paid)
    assert sum(r["cost_usd"] for r in records(out)) == pytest.approx(paid)


def test_a_move_recorded_by_an_older_version_is_not_counted_as_paid_again(tmp_path: Path) -> None:
    # Before paid_in, a move's line repeated the cost of the answer it moved.
    lines = [
        {"id": "a", "status": "ok", "run": "r1", "outputs": ["a.png"], "cost_usd": 0.07},
        {"id": "b", "status": "failed", "run": "r1", "cost_usd": 0.02, "error": {"kind": "no_image"}},
        {"id": "b", "status": "ok", "run": "r2", "outputs": ["b.png"], "cost_usd": 0.05},
        {"id": "a", "status": "ok", "run": "r2", "outputs": ["new/a.png"], "cost_usd": 0.07, "moved_from": ["a.png"]},
    ]
    # Every record nanobatch wrote, then as now, carries these fields (the index takes no line without them).
    written = [{"attempts": 1, "key": None, "started_at": None, **line} for line in lines]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(line) + "\n" for line in written))
    with ResultsIndex.load(tmp_path) as index:
        totals = index.totals()
    assert totals["cost_usd"] == pytest.approx(0.12) and totals["paid_usd"] == pytest.approx(0.14)
    assert (panel(tmp_path)["cost"], panel(tmp_path)["paid by all runs"]) == ("$0.1200", "$0.1400")


# --- fallbacks: what was sent at the fallback tier, not what was decided ---------------------------------------


def flex_shed() -> FakeGemini:
    """Every flex request shed (503), every standard one answered."""

    def answer(request: httpx2.Request) -> httpx2.Response:
        if json.loads(request.content).get("serviceTier") == "flex":
            return google_error(503, "UNAVAILABLE", "The model is overloaded. Please try again later.")
        return httpx2.Response(200, json=ok_body())

    return FakeGemini({text: [answer] for text in ("edit a", "crop it", "make it white", "edit c")})


def flex_settings(**overrides: Any) -> nanobatch.Settings:
    flex = {"api.tier": "flex", "limits.flex_fallback": True, "retry.max_attempts": 2, "limits.concurrency": 1}
    return nanobatch.load_settings(overrides={**flex, **overrides})


def test_a_fallback_the_run_stopped_before_sending_is_not_counted(tmp_path: Path) -> None:
    job = write_job(tmp_path, [{"id": "a", "image": "images/a.png", "instruction": "edit a"}])
    fake = flex_shed()
    # Two tries on flex use up the request budget: the fallback is decided, and never sent.
    summary = run(job, fake, settings=flex_settings(**{"budget.max_requests": 2}))
    assert summary.outcome == "aborted" and len(fake.requests) == 2
    last_run = json.loads((tmp_path / "out" / "summary.json").read_text())["last_run"]
    assert (last_run["requests"], last_run["fallbacks"]) == (2, 0) and last_run["fallback_requests"] == 0


def test_fallbacks_count_the_items_sent_at_the_fallback_tier_and_their_requests(tmp_path: Path) -> None:
    job = write_job(tmp_path, [{"id": "b", "image": "images/b.png", "steps": ["crop it", "make it white"]},
                               {"id": "c", "image": "images/c.png", "instruction": "edit c"}])  # fmt: skip
    fake = flex_shed()
    summary = run(job, fake, settings=flex_settings())
    assert summary.exit_code == 0
    tiers = [json.loads(r.content).get("serviceTier", "standard") for r in fake.requests]
    assert tiers.count("standard") == 3  # b's two steps (the second goes straight there) and c
    assert {(r["id"], r["tier"], r["fallback"]) for r in records(tmp_path / "out")} == {
        ("b", "standard", True), ("c", "standard", True)}  # fmt: skip
    last_run = json.loads((tmp_path / "out" / "summary.json").read_text())["last_run"]
    assert (last_run["fallbacks"], last_run["fallback_requests"]) == (2, 3)


# --- durations: the monotonic clock, whatever the wall clock does ----------------------------------------------


@pytest.mark.parametrize("jump_s", [7200.0, -7200.0], ids=["forward 2 h", "back 2 h"])
def test_a_wall_clock_jump_during_a_run_does_not_change_its_duration(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, jump_s: float
) -> None:
    import time

    real, offset = time.time, [0.0]
    monkeypatch.setattr(time, "time", lambda: real() + offset[0])

    def answer(request: httpx2.Request) -> httpx2.Response:
        offset[0] = jump_s  # the clock is set (NTP, a VM resumed) while the request is out
        return httpx2.Response(200, json=ok_body())

    job = write_job(tmp_path, [{"id": "a", "image": "images/a.png", "instruction": "edit a"}])
    assert run(job, FakeGemini({"edit a": [answer]})).exit_code == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert 0 <= summary["wall_s"] < 60  # the run took no time on the (virtual) monotonic clock
    assert summary["last_run"]["started_at"] != summary["last_run"]["finished_at"]  # the stamps are the wall's


# --- the last run, as status tells it --------------------------------------------------------------------------


def test_status_tells_a_run_that_crashed_from_the_one_before_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from nanobatch.cli.status import folder_status
    from nanobatch.output.lock import RunLock

    job = write_job(tmp_path, [{"id": n, "image": f"images/{n}.png", "instruction": f"edit {n}"} for n in "ab"])
    out = tmp_path / "out"
    budget = nanobatch.load_settings(overrides={"budget.max_requests": 1, "limits.concurrency": 1})
    assert run(job, FakeGemini(), out, settings=budget).outcome == "aborted"
    assert "request budget reached" in folder_status(out)["last_run"]["reason"]

    def crash(request: httpx2.Request) -> httpx2.Response:
        raise MemoryError  # what a bug, or the machine, can do to a run: it ends, and writes no end

    with pytest.raises((MemoryError, BaseExceptionGroup)):
        run(job, FakeGemini({"edit a": [crash], "edit b": [crash]}), out)
    last = folder_status(out)["last_run"]
    assert last["outcome"] == "crashed" and last["reason"] == "ended without a summary: killed or crashed"
    assert main(["status", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "last run: crashed, started " in shown and "reason: ended without a summary: killed or crashed" in shown

    async def while_held() -> dict[str, Any]:
        async with RunLock(out):
            return folder_status(out)

    assert anyio.run(while_held)["last_run"]["outcome"] == "running"  # a run holds the folder: not dead


def test_a_stop_rule_between_the_steps_of_an_item_keeps_what_was_paid_on_the_books(tmp_path: Path) -> None:
    # --max-requests 2 lets steps 1 and 2 of a three-step item go out, then stops the run: those two answers were
    # billed, so the folder's paid_usd, status and the item's record must say so (the item is failed, kind
    # "stopped", and the next run sends it again).
    item = {"id": "hero", "image": "images/h.png", "steps": ["crop it", "make it white", "add a shadow"]}
    job = write_job(tmp_path, [item])
    out = tmp_path / "out"
    budget = nanobatch.load_settings(overrides={"budget.max_requests": 2, "limits.concurrency": 1})

    summary = run(job, FakeGemini(), out, settings=budget)

    assert summary.outcome == "aborted" and summary.exit_code == 3
    (record,) = records(out)
    assert record["status"] == "failed" and record["error"]["kind"] == "stopped" and record["error"]["step"] == 3
    assert record["cost_usd"] > 0 and len(record["steps"]) == 3
    folder = json.loads((out / "summary.json").read_text())
    assert folder["paid_usd"] == pytest.approx(record["cost_usd"]) and folder["counts"]["failed"] == 1


def test_a_fatal_answer_to_a_later_step_keeps_the_earlier_steps_cost_and_stops_the_run(tmp_path: Path) -> None:
    item = {"id": "hero", "image": "images/h.png", "steps": ["crop it", "make it white"]}
    job = write_job(tmp_path, [item, {"id": "next", "image": "images/n.png", "instruction": "make it blue"}])
    out = tmp_path / "out"
    key_revoked = google_error(401, "UNAUTHENTICATED", "API key not valid")
    fake = FakeGemini({"make it white": [key_revoked]})

    summary = run(job, fake, out, settings=nanobatch.load_settings(overrides={"limits.concurrency": 1}))

    assert summary.exit_code == 3 and len(fake.requests) == 2  # the run stopped: "next" was not sent
    (record,) = records(out)
    assert record["error"]["step"] == 2 and record["cost_usd"] > 0
    assert json.loads((out / "summary.json").read_text())["paid_usd"] == pytest.approx(record["cost_usd"])


def test_a_time_limit_that_cuts_an_item_between_its_steps_still_ends_the_run_aborted(tmp_path: Path) -> None:
    # The limit came after the last item had gone out, but before its second step: the run did not finish it, so
    # it is aborted (exit 3, the reason kept), not "complete" for an item recorded as stopped.
    import httpx2 as _httpx2

    from .conftest import run_virtual

    job = write_job(tmp_path, [{"id": "hero", "image": "images/h.png", "steps": ["crop it", "make it white"]}])
    fake = FakeGemini()

    class Slow(_httpx2.AsyncBaseTransport):
        async def handle_async_request(self, request: _httpx2.Request) -> _httpx2.Response:
            await anyio.sleep(20)  # virtual time: step 2 would start after the limit
            return await fake.transport.handle_async_request(request)

    settings = nanobatch.load_settings(overrides={"limits.max_duration_s": 10, "limits.concurrency": 1})
    summary = run_virtual(lambda: nanobatch.run_job(job, settings=settings, transport=Slow(), out_dir=tmp_path / "o"))
    assert (summary.outcome, summary.exit_code) == ("aborted", 3) and "time limit" in str(summary.reason)
    assert records(tmp_path / "o")[0]["error"]["kind"] == "stopped"


def test_billed_answers_without_an_image_before_a_stop_rule_stay_on_the_books(tmp_path: Path) -> None:
    # Each answer is a 200 with text and no image: billed, and retried. --max-requests 2 stops the run before the
    # item's third attempt: no step succeeded, but two answers were paid for, so the item's record (failed, kind
    # "stopped") carries them, and the folder's paid_usd counts them.
    job = write_job(tmp_path, [{"id": "a", "image": "images/a.png"}])
    out = tmp_path / "out"
    text_only = ok_body({"text": "I cannot edit this picture."})
    fake = FakeGemini({"make the background white": [text_only, text_only, text_only]})
    budget = nanobatch.load_settings(overrides={"budget.max_requests": 2, "limits.concurrency": 1})

    summary = run(job, fake, out, settings=budget)

    assert summary.exit_code == 3 and len(fake.requests) == 2
    (record,) = records(out)
    assert (record["status"], record["error"]["kind"]) == ("failed", "stopped") and record["cost_usd"] > 0
    assert json.loads((out / "summary.json").read_text())["paid_usd"] == pytest.approx(record["cost_usd"])
