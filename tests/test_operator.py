"""What operators are told: requests possibly charged, an unreachable API, status, lock waits, JSON logs."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import anyio
import httpx2
import pytest

import nanobatch
from nanobatch.cli.main import main
from nanobatch.cli.status import folder_status

from .conftest import run_virtual
from .fakes import FakeGemini, google_error, ok_body, quota_failure, retry_info, write_job
from .test_docs import read_until


def _refused(request: httpx2.Request) -> httpx2.Response:
    raise httpx2.ConnectError("[Errno 111] Connection refused", request=request)


def _no_answer(request: httpx2.Request) -> httpx2.Response:
    raise httpx2.ReadTimeout("timed out", request=request)


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
        pytest.param(google_error(401, "UNAUTHENTICATED", "API key not valid"), id="401"),
        pytest.param(google_error(500, "INTERNAL", "An internal error has occurred"), id="500-every-time"),
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
    # a: no answer (a timeout), then a 403 that stops the run. b: answered and saved. Only a's first try is in doubt.
    job = write_job(tmp_path, [{"id": "a", "instruction": "slow"}, {"id": "b", "instruction": "fine"}])
    fake = FakeGemini({"slow": [_no_answer, google_error(403, "PERMISSION_DENIED", "no access")], "fine": [ok_body()]})
    settings = nanobatch.load_settings(overrides={"limits.concurrency": 1})
    summary = run_virtual(lambda: nanobatch.run_job(job, transport=fake.transport, out_dir=tmp_path / "out",
                                                    settings=settings))  # fmt: skip
    assert summary.exit_code == 3
    info = folder_status(tmp_path / "out")
    assert info["possibly_charged"] == 1 and info["possibly_charged_ids"] == ["a"]


def _refused_at_the_socket(request: httpx2.Request) -> httpx2.Response:
    # As httpx raises it for a closed port: the OS error is the cause beneath a generic message.
    cause = ConnectionRefusedError(111, "Connect call failed ('127.0.0.1', 9)")
    raise httpx2.ConnectError("All connection attempts failed", request=request) from cause


def _host_not_found(request: httpx2.Request) -> httpx2.Response:
    cause = socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    raise httpx2.ConnectError("[Errno -2] Name or service not known", request=request) from cause


def _run_unreachable(
    tmp_path: Path, failure: object = _refused_at_the_socket, **overrides: object
) -> tuple[nanobatch.RunSummary, float, list[str]]:
    job = write_job(tmp_path, [{"id": f"i{n:03d}", "instruction": "edit"} for n in range(200)])
    fake = FakeGemini({"edit": [failure]})  # type: ignore[list-item]
    settings = nanobatch.load_settings(overrides={"api.base_url": "http://wrong.example:8080/", **overrides})
    warnings: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.levelno >= logging.WARNING:
                warnings.append(record.getMessage())

    handler = Collect()
    logging.getLogger("nanobatch").addHandler(handler)

    async def go() -> tuple[nanobatch.RunSummary, float]:
        summary = await nanobatch.run_job(job, transport=fake.transport, out_dir=tmp_path / "out", settings=settings)
        return summary, anyio.current_time()

    try:
        summary, ended_at = run_virtual(go)
    finally:
        logging.getLogger("nanobatch").removeHandler(handler)
    return summary, ended_at, warnings


@pytest.mark.parametrize(
    ("failure", "why"),
    [
        (_refused_at_the_socket, "connection refused"),
        (_host_not_found, "host name not found (Name or service not known)"),
    ],
    ids=["refused", "host-not-found"],
)
def test_an_unreachable_api_is_named_at_once_and_the_run_ends_long_before_the_outage_limit(
    tmp_path: Path, failure: object, why: str
) -> None:
    summary, ended_at, warnings = _run_unreachable(tmp_path, failure)
    where = f"cannot connect to http://wrong.example:8080: {why}"
    reason = summary.reason or ""
    assert summary.exit_code == 3 and where in reason and "retry.first_contact_s" in reason
    assert 60 <= ended_at < 70  # the default first-contact limit, not limits.breaker_max_down_s (600 s)
    assert where in warnings[0]  # the first failure, at warning level, before anything else
    assert len([w for w in warnings if "connection" in w]) <= 5  # repeats summarised, not one line per retry


def test_the_first_contact_limit_is_configurable(tmp_path: Path) -> None:
    summary, ended_at, _ = _run_unreachable(tmp_path, **{"retry.first_contact_s": 10})
    assert summary.exit_code == 3 and "retry.first_contact_s = 10" in (summary.reason or "") and 10 <= ended_at < 20


def test_an_api_that_answered_once_is_left_to_the_breaker() -> None:
    from nanobatch.errors import ApiError
    from nanobatch.run.meters import FirstContact

    async def go() -> object:
        contact = FirstContact(60)
        refused = ApiError("cannot connect", kind="connection", retryable=True, sent=False)
        assert contact.record(refused, 0.0) is None
        contact.record(None, 0.0)  # an answer: the API is there, later failures are an outage
        await anyio.sleep(1000)
        return contact.record(refused, 0.0)

    assert run_virtual(go) is None


def test_the_command_line_names_a_refused_url(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as probe:  # a loopback port with nobody listening
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    for name, value in [
        ("NANOBATCH_API_KEY", "k-123456"),
        ("NANOBATCH_RETRY_FIRST_CONTACT_S", "0.3"),
        ("NANOBATCH_RETRY_BACKOFF_INITIAL_S", "0.01"),
        ("NANOBATCH_LIMITS_BREAKER_COOLDOWN_S", "0.05"),
    ]:
        monkeypatch.setenv(name, value)  # fmt: skip
    job = write_job(tmp_path, [{"id": f"i{n}", "instruction": "edit"} for n in range(20)])
    code = main(["run", str(job), "--base-url", f"http://127.0.0.1:{port}", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 3
    assert f"cannot connect to http://127.0.0.1:{port}: connection refused" in err
    assert "retry.first_contact_s" in err


def test_repeated_failures_are_told_once_then_summarised(caplog: pytest.LogCaptureFixture) -> None:
    from nanobatch.errors import ApiError
    from nanobatch.run.failures import FailureLog

    refused = ApiError("cannot connect to http://x.test: connection refused", kind="connection", retryable=True)

    async def go() -> None:
        failures = FailureLog("http://x.test", interval_s=60)
        for _ in range(50):  # a burst: one warning
            failures.failed(refused)
            await anyio.sleep(1)
        failures.failed(ApiError("HTTP 429: slow down", kind="rate_limited", retryable=True))  # the throttle's
        await anyio.sleep(10)
        failures.failed(refused)  # a minute on: one line for all the repeats
        failures.failed(ApiError("HTTP 503: overloaded", kind="overloaded", retryable=True))  # another kind, where

    with caplog.at_level(logging.WARNING, logger="nanobatch"):
        run_virtual(go)
    assert [r.getMessage() for r in caplog.records] == [
        "a request failed: cannot connect to http://x.test: connection refused; retrying (more connection failures "
        "are summarised, at most once a minute)",
        "50 more connection failures in the last 60 s, retried (latest: cannot connect to http://x.test: "
        "connection refused)",
        "a request to http://x.test failed: HTTP 503: overloaded; retrying (more overloaded failures are summarised, "
        "at most once a minute)",
    ]


@pytest.mark.parametrize("where", ["empty", "/", "photos"])
@pytest.mark.parametrize("as_json", [False, True], ids=["text", "json"])
def test_status_of_a_folder_no_run_wrote_into_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], where: str, as_json: bool
) -> None:
    folder = tmp_path / where if where != "/" else Path(where)
    folder.mkdir(exist_ok=True)
    if where == "photos":  # the user's pictures, with a summary.json of their own: still not an output folder
        (folder / "a.png").write_bytes(b"\x89PNG")
        (folder / "summary.json").write_text('{"note": "mine"}')
    assert main(["status", str(folder), *(["--json"] if as_json else [])]) == 2
    captured = capsys.readouterr()
    assert "is not a nanobatch output folder" in captured.err and captured.out == ""


def test_status_of_the_folder_above_an_output_folder_points_at_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    job = write_job(tmp_path, [{"id": "a", "instruction": "x"}])
    assert main(["run", str(job), "--simulate", "--out", str(tmp_path / "out" / "job"), "--quiet"]) == 0
    assert main(["status", str(tmp_path / "out")]) == 2
    assert f"did you mean {tmp_path / 'out' / 'job'}?" in capsys.readouterr().err


def test_status_tells_why_the_last_run_stopped_and_how_many_items_are_left(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    write_job(tmp_path, [{"id": f"i{n}", "instruction": f"edit {n}"} for n in range(7)])
    monkeypatch.chdir(tmp_path)
    assert main(["run", "job.yaml", "--simulate", "--out", "out", "--max-requests", "3", "--quiet"]) == 3
    monkeypatch.chdir(tmp_path / "cwd")  # status from elsewhere still finds the manifest
    capsys.readouterr()
    assert main(["status", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "reason: request budget reached: 3 requests sent" in out
    assert f"left: 4 of 7 items in {tmp_path / 'job.yaml'} not done" in out
    assert main(["status", str(tmp_path / "out"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["left"] == 4 and info["manifest_items"] == 7
    (tmp_path / "out" / "i0.png").unlink()  # a deleted output is work left too
    assert folder_status(tmp_path / "out")["left"] == 5


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_waiting_for_the_lock_says_for_whom_once_and_sigterm_ends_it_with_130(
    tmp_path: Path, signum: signal.Signals
) -> None:
    from nanobatch.output.lock import RunLock

    job = write_job(tmp_path, [{"id": "a", "instruction": "x"}])
    out = tmp_path / "out"
    held, release = threading.Event(), threading.Event()

    async def hold() -> None:
        async with RunLock(out):
            held.set()
            await anyio.to_thread.run_sync(release.wait)

    holder = threading.Thread(target=anyio.run, args=(hold,))
    holder.start()
    try:
        assert held.wait(10)
        proc = subprocess.Popen(
            [sys.executable, "-m", "nanobatch", "run", str(job), "--simulate", "--out", str(out), "--wait-lock"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        assert proc.stderr is not None
        waiting = read_until(proc.stderr, b"waiting for it").decode()
        assert f"another nanobatch run holds {out} (pid {os.getpid()} on " in waiting and " since " in waiting
        time.sleep(1.2)  # a few more polls of the lock: still one line
        proc.send_signal(signum)
        rest = proc.communicate(timeout=30)[1].decode()
    finally:
        release.set()
        holder.join()
    assert proc.returncode == 130
    assert "waiting for it" not in rest  # said once
    assert f"error: interrupted by {signum.name} while waiting for the run holding" in rest
    assert not (out / "results.jsonl").exists()  # nothing was sent


@pytest.fixture
def quota_api(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A loopback simulator whose daily quota runs out after one answer: later requests in flight all get it."""
    from nanobatch.simulator import SimulatorConfig, run_in_thread

    monkeypatch.setenv("NANOBATCH_API_KEY", "k-0123456789")
    with run_in_thread(SimulatorConfig(daily_limit=1, latency_s=0.05)) as url:
        yield url


def test_quiet_says_a_fatal_error_once_not_once_per_request_in_flight(
    tmp_path: Path, quota_api: str, capsys: pytest.CaptureFixture[str]
) -> None:
    job = write_job(tmp_path, [{"id": f"i{n:02d}", "instruction": f"edit {n}"} for n in range(40)])
    argv = ["run", str(job), "--base-url", quota_api, "--out", str(tmp_path / "out"), "--concurrency", "8", "--quiet"]
    assert main(argv) == 3
    err = capsys.readouterr().err
    assert err.startswith("error: run aborted: HTTP 429: You exceeded your current quota")
    assert err.count("exceeded your current quota") == 1


def _stderr_events(err: str) -> list[dict[str, object]]:
    events = [json.loads(line) for line in err.splitlines() if line.strip()]  # every line of stderr is JSON
    assert all(isinstance(e, dict) and {"time", "level", "message"} <= set(e) for e in events)
    return events


BUCKET_WARNING = "Could not determine bucket type for bucket name photos: timed out, falling back to GCSFileSystem"


@pytest.mark.filterwarnings("always::FutureWarning")
@pytest.mark.parametrize("quiet", [False, True], ids=["default", "quiet"])
@pytest.mark.parametrize("log_format", ["text", "json"])
def test_other_libraries_lines_obey_quiet_and_json_and_never_show_the_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], quiet: bool, log_format: str
) -> None:
    # Libraries log through their own loggers while requests run: gcsfs warns for every file it opens.
    key = "k-0123456789"
    monkeypatch.setenv("NANOBATCH_API_KEY", key)
    chatty = logging.getLogger("tests.chatty_library")
    chatty.setLevel(logging.DEBUG)  # as uvicorn does with its own loggers: its INFO is still not shown

    async def answer(self: httpx2.AsyncHTTPTransport, request: httpx2.Request) -> httpx2.Response:
        logging.getLogger("gcsfs").warning(BUCKET_WARNING)
        chatty.info("connect_tcp.started host='api.test'")
        denied = PermissionError(f"no access with {key}")
        logging.getLogger("botocore.credentials").error("refreshing credentials with %s failed", key, exc_info=denied)
        warnings.warn("a default will change in the next release", FutureWarning, stacklevel=1)
        return httpx2.Response(200, json=ok_body())

    monkeypatch.setattr(httpx2.AsyncHTTPTransport, "handle_async_request", answer)
    job = write_job(tmp_path, [{"id": f"i{n}", "instruction": f"edit {n}"} for n in range(3)])
    argv = ["--log-format", log_format, "run", str(job), "--base-url", "http://api.test", "--out", str(tmp_path / "o")]
    assert main(argv + (["--quiet"] if quiet else [])) == 0
    err = capsys.readouterr().err
    assert key not in err and "connect_tcp" not in err
    if log_format == "json":
        events = _stderr_events(err)
        by_logger = [(e["logger"], e["level"]) for e in events if e["logger"] != "nanobatch"]
        warned = [] if quiet else [("gcsfs", "warning"), ("py.warnings", "warning")]
        assert sorted(set(by_logger)) == sorted([("botocore.credentials", "error"), *warned])
        assert by_logger.count(("gcsfs", "warning")) == (0 if quiet else 1)  # said for each request, shown once
        assert "refreshing credentials with [redacted] failed" in {e["message"] for e in events}
        assert any("PermissionError: no access with [redacted]" in str(e.get("exception")) for e in events)
    else:
        lines = err.splitlines()
        # The exception in the line, its traceback left for -vv
        assert ("nanobatch: ERROR: botocore.credentials: refreshing credentials with [redacted] failed "
                "(PermissionError: no access with [redacted])") in lines and "Traceback" not in err  # fmt: skip
        assert lines.count(f"nanobatch: WARNING: gcsfs: {BUCKET_WARNING}") == (0 if quiet else 1)
        assert all(line.startswith("nanobatch: ") for line in lines if "credentials" in line or "bucket" in line)
        assert ("FutureWarning" in err) is not quiet


@pytest.mark.parametrize("verbose", [[], ["-v"], ["-vv"]], ids=["default", "v", "vv"])
def test_a_bucket_library_s_tracebacks_stay_off_stderr_below_vv_beside_the_clean_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], verbose: list[str]
) -> None:
    import gcsfs
    import gcsfs.retry

    # gcsfs gives up on a bucket it cannot reach with logger.exception(): aiohttp's frames, for each request
    async def at_once(delay: float) -> None:
        return None

    monkeypatch.setattr(gcsfs.retry, "asyncio", type("NoWait", (), {"sleep": staticmethod(at_once)}))  # its retries
    with socket.socket() as closed:  # a loopback port no one listens on: refused at once, no network
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    monkeypatch.setenv("NANOBATCH_API_KEY", "k-0123456789")
    gcsfs.GCSFileSystem.clear_instance_cache()
    config = tmp_path / "c.yaml"
    config.write_text("output:\n  upload_to: gs://photos/edited/\n")
    job = write_job(tmp_path, [{"id": "a", "instruction": "edit"}])

    assert main([*verbose, "validate", str(job), "--config", str(config)]) == 2

    lines = capsys.readouterr().err.splitlines()
    assert lines[-1].startswith("error: output.upload_to: gs://photos/edited/: ") and "Cannot connect" in lines[-1]
    told = [line for line in lines if line.startswith("nanobatch: ERROR: gcsfs: ")]
    assert told and all("Cannot connect to host 127.0.0.1" in line for line in told)
    if verbose == ["-vv"]:
        assert "Traceback (most recent call last):" in lines
    else:  # a line each, nothing else
        assert all(line.startswith(("nanobatch: ", "error: ")) for line in lines), lines


@pytest.mark.parametrize("quiet", [False, True], ids=["summary", "quiet"])
def test_json_logs_stay_json_when_items_fail(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], quiet: bool
) -> None:
    monkeypatch.setenv("NANOBATCH_API_KEY", "k-0123456789")

    async def refuse(self: httpx2.AsyncHTTPTransport, request: httpx2.Request) -> httpx2.Response:
        return google_error(400, "INVALID_ARGUMENT", "Unable to process input image.")

    monkeypatch.setattr(httpx2.AsyncHTTPTransport, "handle_async_request", refuse)
    job = write_job(tmp_path, [{"id": "a", "instruction": "x"}, {"id": "b", "instruction": "y"}])
    argv = ["--log-format", "json", "run", str(job), "--base-url", "http://api.test", "--out", str(tmp_path / "out")]
    assert main(argv + (["--quiet"] if quiet else [])) == 1
    events = _stderr_events(capsys.readouterr().err)
    summaries = [e for e in events if e.get("event") == "summary"]
    # With --quiet too: the one event a log collector keeps of the night (the README's cron line is quiet)
    assert len(summaries) == 1 and summaries[0]["exit_code"] == 1 and summaries[0]["counts"] == {
        "ok": 0, "failed": 2, "blocked": 0, "rejected": 0, "skipped": 0
    }  # fmt: skip
    if quiet:  # and nothing else below errors
        assert [e for e in events if e.get("event") != "summary" and e["level"] in ("info", "warning")] == []


@pytest.mark.parametrize("quiet", [False, True], ids=["summary", "quiet"])
def test_json_logs_stay_json_when_the_run_is_aborted(
    tmp_path: Path, quota_api: str, capsys: pytest.CaptureFixture[str], quiet: bool
) -> None:
    job = write_job(tmp_path, [{"id": f"i{n:02d}", "instruction": f"edit {n}"} for n in range(20)])
    argv = ["--log-format", "json", "run", str(job), "--base-url", quota_api, "--out", str(tmp_path / "out")]
    assert main(argv + (["--quiet"] if quiet else [])) == 3
    events = _stderr_events(capsys.readouterr().err)
    errors = [e for e in events if e["level"] == "error"]
    if quiet:
        assert len(errors) == 1 and str(errors[0]["message"]).startswith("run aborted: HTTP 429")
    summary = [e for e in events if e.get("event") == "summary"]
    assert len(summary) == 1 and summary[0]["outcome"] == "aborted" and summary[0]["exit_code"] == 3


@pytest.mark.parametrize(
    ("args", "code"),
    [
        pytest.param(["validate", "{job}", "--concurrency", "0"], 2, id="usage-error"),
        pytest.param(["run", "{bad}", "--simulate"], 2, id="bad-manifest"),
        pytest.param(["run", "{job}", "--simulate", "--out", "{held}"], 4, id="lock-held"),
    ],
)
def test_json_logs_stay_json_when_nothing_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], code: int
) -> None:
    from nanobatch.output.lock import RunLock

    job = write_job(tmp_path, [{"id": "a", "instruction": "x"}])
    bad = tmp_path / "bad.yaml"
    bad.write_text("items:\n  - id: a\n    instrction: x\n")
    held = tmp_path / "held"
    argv = ["--log-format", "json", *(a.format(job=job, bad=bad, held=held) for a in args)]

    async def run_while_held() -> int:
        async with RunLock(held):
            return await anyio.to_thread.run_sync(lambda: main(argv))

    assert anyio.run(run_while_held) == code
    events = _stderr_events(capsys.readouterr().err)
    assert [e["level"] for e in events if e["level"] == "error"] == ["error"]


def test_quiet_says_a_refused_key_once_not_once_per_request_in_flight(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from nanobatch.simulator import SimulatorConfig, run_in_thread

    monkeypatch.setenv("NANOBATCH_API_KEY", "k-not-the-right-one")
    job = write_job(tmp_path, [{"id": f"i{n:02d}", "instruction": f"edit {n}"} for n in range(40)])
    with run_in_thread(SimulatorConfig(api_key="k-0123456789", latency_s=0.05)) as url:
        argv = ["run", str(job), "--base-url", url, "--out", str(tmp_path / "out"), "--concurrency", "8", "--quiet"]
        assert main(argv) == 3
    err = capsys.readouterr().err
    assert err.startswith("error: run aborted: HTTP 40") and err.count("error:") == 1
    assert "k-not-the-right-one" not in err


def test_json_logs_stay_json_when_a_budget_stops_the_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    job = write_job(tmp_path, [{"id": f"i{n}", "instruction": f"edit {n}"} for n in range(5)])
    argv = ["--log-format", "json", "run", str(job), "--simulate", "--out", str(tmp_path / "out")]
    argv += ["--max-requests", "2"]
    assert main(argv) == 3
    events = _stderr_events(capsys.readouterr().err)
    summary = [e for e in events if e.get("event") == "summary"]
    assert len(summary) == 1 and summary[0]["exit_code"] == 3 and summary[0]["counts"]["ok"] == 2
