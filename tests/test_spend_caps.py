"""Money, not speed: a spend cap, the spend-based rate limit or used-up credit stops the run at once (exit 3),
with a reason that names it; rate limits that waiting does fix are still retried."""

from __future__ import annotations

import json
from pathlib import Path

import httpx2
import pytest

from nanobatch.api.causes import classify_error
from nanobatch.cli.main import main
from nanobatch.errors import FatalApiError
from nanobatch.models import MONEY_ERRORS, ErrorShape
from nanobatch.simulator import SimulatorConfig, create_app, run_in_thread
from nanobatch.simulator._cli import parse_fault_rates
from nanobatch.simulator.config import FAULT_KINDS

from .fakes import image_bytes, inline, write_job

NO_HEADERS = httpx2.Headers()
# What the reason says for each kind, beside the API's own message: the cause, and what to do.
NAMED = {
    "spend_cap": "spend cap is reached",
    "spend_rate": "spend-based rate limit",
    "no_credit": "prepaid credit is used up",
}


def google_body(shape: ErrorShape) -> bytes:
    return json.dumps({"error": {"code": shape.status, "message": shape.message, "status": shape.status_word}}).encode()


def apiyi_body(status: int, message: str, code: str) -> bytes:
    """The {status_code, error: {message, type, code}} body of a one-api/new-api proxy (APIYI's shape)."""
    return json.dumps(
        {"status_code": status, "error": {"message": message, "type": "new_api_error", "code": code}}
    ).encode()


GOOGLE_SHAPES = [pytest.param(s, google_body(s), id=name) for name, s in MONEY_ERRORS.items() if s.status != 403]


@pytest.mark.parametrize(("shape", "raw"), GOOGLE_SHAPES)
def test_each_money_shape_google_sends_is_fatal_and_named(shape: ErrorShape, raw: bytes) -> None:
    error = classify_error(shape.status, NO_HEADERS, raw)
    assert isinstance(error, FatalApiError) and not error.retryable and error.retry_after is None
    assert error.kind == shape.kind and error.status_code == shape.status
    assert shape.message in error.message  # the API's own words, kept
    assert NAMED[shape.kind] in error.message  # and the cause, named


@pytest.mark.parametrize(
    ("status", "raw", "kind"),
    [
        pytest.param(403, apiyi_body(403, "user quota is not enough", "insufficient_user_quota"), "no_credit",
                     id="new-api-user-quota"),
        pytest.param(403, apiyi_body(403, "token quota is not enough", "pre_consume_token_quota_failed"),
                     "no_credit", id="new-api-token-quota"),
        pytest.param(403, apiyi_body(403, "用户额度不足, 剩余额度: $0.000000", "insufficient_user_quota"), "no_credit",
                     id="new-api-chinese"),
        pytest.param(402, apiyi_body(402, "insufficient balance", "billing_error"), "no_credit", id="402-balance"),
        # Google's words reach a proxy's body too: classified by what they say, whoever wraps them
        pytest.param(429, apiyi_body(429, MONEY_ERRORS["spend_cap"].message, "upstream_error"), "spend_cap",
                     id="spend-cap-through-a-proxy"),
        pytest.param(429, json.dumps({"error": {"code": 429, "message": MONEY_ERRORS["spend_rate"].message}}).encode(),
                     "spend_rate", id="spend-rate-without-status"),
    ],
)  # fmt: skip
def test_proxy_shapes_of_money_are_fatal_and_named(status: int, raw: bytes, kind: str) -> None:
    error = classify_error(status, NO_HEADERS, raw)
    assert isinstance(error, FatalApiError) and error.kind == kind
    assert NAMED[kind] in error.message


@pytest.mark.parametrize(
    "message",
    [
        "Resource has been exhausted (e.g. check quota).",
        "You exceeded your current quota, please check your plan and billing details. For more information on this "
        "error, head to: https://ai.google.dev/gemini-api/docs/rate-limits.",
    ],
    ids=["bare-429", "per-minute-quota-mentions-billing"],
)
def test_a_429_that_does_not_name_money_is_still_a_rate_to_wait_for(message: str) -> None:
    raw = json.dumps({"error": {"code": 429, "message": message, "status": "RESOURCE_EXHAUSTED"}}).encode()
    error = classify_error(429, NO_HEADERS, raw)
    assert not isinstance(error, FatalApiError) and error.retryable and error.kind == "rate_limited"


def test_each_simulated_money_fault_is_a_fault_kind_the_cli_takes() -> None:
    simulated = {kind for kind in FAULT_KINDS if kind in MONEY_ERRORS}
    assert simulated == {"spend_cap", "spend_rate", "no_credit", "no_credit_429"}
    assert parse_fault_rates(["spend_cap=0.5", "no-credit=0.5"]) == {"rate_spend_cap": 0.5, "rate_no_credit": 0.5}


@pytest.mark.parametrize("fault", ["spend_cap", "spend_rate", "no_credit", "no_credit_429"])
async def test_the_simulator_answers_each_money_fault_as_google_does(fault: str) -> None:
    shape = MONEY_ERRORS[fault]
    app = create_app(SimulatorConfig(**{FAULT_KINDS[fault]: 1.0}))
    body = {"contents": [{"parts": [{"text": "make it blue"}, inline(image_bytes())]}]}
    async with httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url="http://sim") as client:
        answer = await client.post("/v1beta/models/gemini-3.1-flash-image:generateContent", json=body)
    assert answer.status_code == shape.status
    assert answer.json() == {"error": {"code": shape.status, "message": shape.message, "status": shape.status_word}}


@pytest.mark.parametrize("fault", ["spend_cap", "spend_rate", "no_credit", "no_credit_429"])
def test_a_run_stops_at_once_with_exit_3_naming_the_cause(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], fault: str
) -> None:
    monkeypatch.setenv("NANOBATCH_API_KEY", "sim-key")
    job = write_job(tmp_path, [{"id": f"sku-{n}", "instruction": f"edit {n}"} for n in range(6)])
    app = create_app(SimulatorConfig(**{FAULT_KINDS[fault]: 1.0}))
    with run_in_thread(app=app) as url:
        argv = ["run", str(job), "--base-url", url, "--out", str(tmp_path / "out"), "--concurrency", "1", "--quiet"]
        assert main(argv) == 3
    err = capsys.readouterr().err
    shape = MONEY_ERRORS[fault]
    assert err.startswith(f"error: run aborted: HTTP {shape.status}: {shape.message}")
    assert NAMED[shape.kind] in err
    assert app.state.stats.received == 1  # not retried, and nothing more sent
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["last_run"]["outcome"] == "aborted" and NAMED[shape.kind] in summary["last_run"]["reason"]
