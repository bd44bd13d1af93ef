"""What operators are told: requests possibly charged, an unreachable API, status, lock waits, JSON logs."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

import nanobatch
from nanobatch.status import folder_status

from .conftest import run_virtual
from .fakes import FakeGemini, google_error, ok_body, quota_failure, retry_info, write_job


def _refused(request: httpx.Request) -> httpx.Response:
    raise httpx.ConnectError("[Errno 111] Connection refused", request=request)


def _no_answer(request: httpx.Request) -> httpx.Response:
    raise httpx.ReadTimeout("timed out", request=request)


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param(google_error(403, "PERMISSION_DENIED", "no access"), id="403"),
        pytest.param(
            google_error(429, "RESOURCE_EXHAUSTED", "Quota exceeded", retry_info("30s"), quota_failure("PerDay")),
            id="daily-429",
        ),
        pytest.param(google_error(429, "RESOURCE_EXHAUSTED", "Slow down", retry_info("3600s")), id="429-for-an-hour"),
        pytest.param(_refused, id="connection-refused"),
    ],
)
def test_requests_that_got_a_definite_answer_are_not_possibly_charged(tmp_path: Path, answer: object) -> None:
    items = [{"id": f"i{n}", "instruction": "edit"} for n in range(30)]
    job = write_job(tmp_path, items)
    fake = FakeGemini({"edit": [answer]})  # type: ignore[list-item]
    settings = nanobatch.load_settings(overrides={"limits.concurrency": 8, "limits.breaker_max_down_s": 120})
    summary = run_virtual(lambda: nanobatch.run_job(job, transport=fake.transport, out_dir=tmp_path / "out",
                                                    settings=settings))  # fmt: skip
    assert summary.exit_code == 3 and fake.requests
    info = folder_status(tmp_path / "out")
    assert info["possibly_charged"] == 0 and info["possibly_charged_ids"] == []


def test_only_requests_sent_without_an_answer_are_possibly_charged(tmp_path: Path) -> None:
    # a: no answer (a timeout), then a 403 that stops the run. b: answered 200 and saved. Only a's first try is in doubt.
    job = write_job(tmp_path, [{"id": "a", "instruction": "slow"}, {"id": "b", "instruction": "fine"}])
    fake = FakeGemini({"slow": [_no_answer, google_error(403, "PERMISSION_DENIED", "no access")], "fine": [ok_body()]})
    settings = nanobatch.load_settings(overrides={"limits.concurrency": 1})
    summary = run_virtual(lambda: nanobatch.run_job(job, transport=fake.transport, out_dir=tmp_path / "out",
                                                    settings=settings))  # fmt: skip
    assert summary.exit_code == 3
    info = folder_status(tmp_path / "out")
    assert info["possibly_charged"] == 1 and info["possibly_charged_ids"] == ["a"]
