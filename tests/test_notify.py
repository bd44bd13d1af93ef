"""The end-of-run webhook: one JSON object POSTed when a run ends, however it ends, received here by a loopback
server; a failing webhook changes nothing about the run, and its URL is never shown or written."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest

import nanobatch
from nanobatch.cli.main import main
from nanobatch.config import Settings, load_settings, read_notify_url
from nanobatch.errors import ConfigError, ManifestError
from nanobatch.run.notify import duration_text, one_line

from .fakes import FakeGemini, google_error, run_now, write_job
from .receiver import Receiver, receiver

SECRET_PATH = "/services/T0001/B0002/s3cr3t-hook-token"


def _settings(**overrides: Any) -> Settings:
    return load_settings(env={}, overrides=overrides)


def _notices(server: Receiver) -> list[dict[str, Any]]:
    return [json.loads(body) for body in server.bodies(SECRET_PATH)]


def _items(n: int) -> list[dict[str, Any]]:
    return [{"id": f"sku-{i}", "instruction": f"edit {i}"} for i in range(n)]


def test_the_text_is_one_line_a_chat_shows() -> None:
    statuses = {"ok": 9812, "failed": 41, "blocked": 0, "rejected": 3, "skipped": 0}
    line = one_line("spring-catalog", "complete", None, statuses, 412.3, 2 * 3600 + 11 * 60 + 7)
    assert line == "spring-catalog: 9,812 ok, 41 failed, 3 rejected, $412.30, 2 h 11 min"
    aborted = one_line("spring-catalog", "aborted", "the budget\nwas reached", {"ok": 5, "skipped": 2}, 1.5, 65)
    assert aborted == "spring-catalog: 5 ok, 2 already done, $1.50, 1 min 5 s; aborted: the budget was reached"
    assert duration_text(12.4) == "12 s"


def test_a_finished_run_posts_its_counts_cost_and_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    job = write_job(tmp_path, _items(3))
    with receiver() as server:
        monkeypatch.setenv("NANOBATCH_NOTIFY_URL", server.url + SECRET_PATH)
        summary = run_now(job, FakeGemini())
    assert summary.exit_code == 0
    [notice] = _notices(server)
    assert notice["text"].startswith("job: 3 ok, $") and "\n" not in notice["text"]
    assert notice["outcome"] == "complete" and notice["exit_code"] == 0 and notice["reason"] is None
    assert notice["counts"]["items"] == 3 and notice["counts"]["ok"] == 3 and notice["counts"]["failed"] == 0
    assert notice["cost_usd"] == pytest.approx(summary.stats.cost_usd) and notice["cost_usd"] > 0
    assert notice["tier"] == "standard" and notice["out_dir"] == str(tmp_path / "out") and notice["job"] == "job"


def test_a_run_with_failed_items_says_how_many(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    job = write_job(tmp_path, _items(3))
    fake = FakeGemini({"edit 1": [google_error(400, "INVALID_ARGUMENT", "bad picture")]})
    with receiver() as server:
        monkeypatch.setenv("NANOBATCH_NOTIFY_URL", server.url + SECRET_PATH)
        summary = run_now(job, fake)
    assert summary.exit_code == 1
    [notice] = _notices(server)
    assert notice["text"].startswith("job: 2 ok, 1 failed, $")
    assert notice["exit_code"] == 1 and notice["counts"]["failed"] == 1


def test_an_aborted_run_posts_why_it_stopped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    job = write_job(tmp_path, _items(3))
    fake = FakeGemini({f"edit {i}": [google_error(401, "UNAUTHENTICATED", "API key not valid")] for i in range(3)})
    with receiver() as server:
        monkeypatch.setenv("NANOBATCH_NOTIFY_URL", server.url + SECRET_PATH)
        summary = run_now(job, fake)
    assert summary.exit_code == 3
    [notice] = _notices(server)
    assert notice["outcome"] == "aborted" and notice["exit_code"] == 3
    assert notice["reason"] == summary.reason and "; aborted: " in notice["text"]


def test_a_run_that_cannot_take_its_folder_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from nanobatch.output.lock import RunLock

    job = write_job(tmp_path, _items(1))
    out = tmp_path / "out"

    async def go() -> None:
        async with RunLock(out):
            await nanobatch.run_job(job, transport=FakeGemini().transport, out_dir=out)

    with receiver() as server:
        monkeypatch.setenv("NANOBATCH_NOTIFY_URL", server.url + SECRET_PATH)
        with pytest.raises(nanobatch.LockHeld):
            anyio.run(go)
    [notice] = _notices(server)
    assert (
        notice["outcome"] == "error" and notice["exit_code"] == 4 and "another nanobatch run holds" in notice["reason"]
    )


def test_a_failing_webhook_changes_nothing_and_never_shows_its_url(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    job = write_job(tmp_path, _items(2))
    out = tmp_path / "out"
    with receiver(500) as server:
        url = server.url + SECRET_PATH
        monkeypatch.setenv("NANOBATCH_NOTIFY_URL", url)
        monkeypatch.setenv("NANOBATCH_NOTIFY_TIMEOUT_S", "1")
        caplog.set_level(logging.DEBUG)  # every library's lines too: httpx2 logs each request's URL at INFO
        first = run_now(job, FakeGemini(), settings=_settings(**{"notify.timeout_s": 1}))
        logged = caplog.text
        code = main(["-vv", "run", str(job), "--simulate", "--out", str(out), "--report", "--force"])
    assert first.exit_code == 0 and code == 0  # the webhook's failure is no failure of the run
    assert len(server.posts) >= 2  # each run tried
    assert "the notify webhook was not told of the run's end: answered 500" in logged
    assert "HTTP Request: POST [the notify webhook]" in logged  # the library's line is there, without the URL
    err = capsys.readouterr().err
    assert "the notify webhook was not told of the run's end: answered 500" in err
    for shown in (err, logged):
        assert SECRET_PATH not in shown and "s3cr3t" not in shown
    for path in out.rglob("*"):
        if path.is_file():
            assert b"s3cr3t" not in path.read_bytes(), path


def test_a_client_error_is_not_retried_and_a_server_error_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    job = write_job(tmp_path, _items(1))
    with receiver(404) as server:
        monkeypatch.setenv("NANOBATCH_NOTIFY_URL", server.url + SECRET_PATH)
        run_now(job, FakeGemini())
    assert len(server.posts) == 1
    assert "answered 404" in caplog.text
    caplog.clear()
    with receiver(503, 200) as server:
        monkeypatch.setenv("NANOBATCH_NOTIFY_URL", server.url + SECRET_PATH)
        run_now(job, FakeGemini(), force=True)
    assert len(server.posts) == 2 and "notify webhook" not in caplog.text


def test_text_payload_carries_the_text_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    job = write_job(tmp_path, _items(1))
    with receiver() as server:
        monkeypatch.setenv("NANOBATCH_NOTIFY_URL", server.url + SECRET_PATH)
        run_now(job, FakeGemini(), settings=_settings(**{"notify.payload": "text"}))
    [notice] = _notices(server)
    assert list(notice) == ["text"] and notice["text"].startswith("job: 1 ok, $")


@pytest.mark.parametrize(
    "value",
    ["https://hooks.example:s3cr3t/x", "https://hooks.example/s3cr3t two", "https://[hooks.example/s3cr3t",
     "ftp://hooks.example/s3cr3t"],
    ids=["port-no-number", "space", "unclosed-bracket", "not-http"],
)  # fmt: skip
def test_a_webhook_url_no_request_could_be_sent_to_is_refused_unseen(value: str) -> None:
    """The same rule as api.base_url's (one function): what would fail only when the run ends is refused first."""
    with pytest.raises(ConfigError) as caught:
        read_notify_url(Settings(), {"NANOBATCH_NOTIFY_URL": value})
    assert "does not hold an http(s) URL" in str(caught.value) and "s3cr3t" not in str(caught.value)


def test_the_variable_named_by_url_env_is_read_and_a_bad_value_refused_unseen(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = write_job(tmp_path, _items(1))
    monkeypatch.setenv("CHAT_HOOK", "hooks.example.com/s3cr3t")
    fake = FakeGemini()
    with pytest.raises(ConfigError) as caught:
        run_now(job, fake, settings=_settings(**{"notify.url_env": "CHAT_HOOK"}))
    assert "CHAT_HOOK does not hold an http(s) URL" in str(caught.value) and "s3cr3t" not in str(caught.value)
    assert fake.requests == []  # refused before anything was sent
    with receiver() as server:
        monkeypatch.setenv("CHAT_HOOK", server.url + SECRET_PATH)
        run_now(job, fake, settings=_settings(**{"notify.url_env": "CHAT_HOOK"}))
    assert len(_notices(server)) == 1


def test_an_interrupted_run_posts_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import signal

    from .test_shutdown import run_and_signal

    job = write_job(tmp_path, _items(12))
    with receiver() as server:
        monkeypatch.setenv("NANOBATCH_NOTIFY_URL", server.url + SECRET_PATH)
        summary = run_and_signal(job, [(15.0, signal.SIGINT)], grace_s=30)
    assert summary.exit_code == 130
    [notice] = _notices(server)
    assert notice["outcome"] == "interrupted" and notice["exit_code"] == 130
    assert notice["counts"]["ok"] == 8 and notice["text"].endswith("; interrupted: interrupted by SIGINT")


def test_a_run_refused_before_anything_was_sent_says_why(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A nightly job whose manifest broke during the day: its owner hears of it that night, not a week later.
    job = write_job(tmp_path, [{"id": "a", "instruction": "a lemon", "aspect_ratio": "7:3"}])
    fake = FakeGemini({})
    with receiver() as server:
        monkeypatch.setenv("NANOBATCH_NOTIFY_URL", server.url + SECRET_PATH)
        with pytest.raises(ManifestError):
            run_now(job, fake)
    [notice] = _notices(server)
    assert notice["outcome"] == "refused" and notice["exit_code"] == 2 and notice["requests"] == 0
    assert notice["text"].startswith("job: refused, nothing was sent (exit 2): ") and "aspect_ratio" in notice["text"]
    assert fake.requests == []


@pytest.mark.parametrize(
    ("text", "said"),
    [
        ("name: job\nitems: [\n", "YAML"),  # edited during the day, left half-written
        ("name: job\nmodle: x\nitems:\n  - {id: a, instruction: x}\n", "modle"),  # a top-level key misspelt
    ],
    ids=["broken YAML", "unknown top-level key"],
)
def test_a_run_whose_manifest_cannot_be_read_at_all_is_heard_of_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str, said: str
) -> None:
    from nanobatch.cli.main import main

    job = tmp_path / "nightly.yaml"
    job.write_text(text)
    with receiver() as server:
        monkeypatch.setenv("NANOBATCH_NOTIFY_URL", server.url + SECRET_PATH)
        assert main(["run", str(job), "--simulate", "--out", str(tmp_path / "out"), "--quiet"]) == 2
        assert main(["run", str(job), "--dry-run", "--out", str(tmp_path / "out"), "--quiet"]) == 2  # no post
    [notice] = _notices(server)
    assert notice["outcome"] == "refused" and notice["job"] == "nightly" and said in notice["text"]


def test_a_run_whose_time_limit_comes_while_it_waits_for_the_folder_posts_aborted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The waiting run ends at its limit, exit 3: the webhook says so (it said "error", exit 1, "unhandled errors in
    # a TaskGroup", the signal watcher's wrapping around the time limit).
    from nanobatch.errors import TimeLimitReached
    from nanobatch.output.lock import RunLock

    from .conftest import run_virtual

    job = write_job(tmp_path, _items(1))
    out = tmp_path / "out"
    limited = load_settings(env={}, overrides={"limits.max_duration_s": 1})

    async def go() -> None:
        async with RunLock(out):
            await nanobatch.run_job(job, settings=limited, transport=FakeGemini().transport, out_dir=out,
                                    wait_lock=True, handle_signals=True)  # fmt: skip

    with receiver() as server:
        monkeypatch.setenv("NANOBATCH_NOTIFY_URL", server.url + SECRET_PATH)
        with pytest.raises(TimeLimitReached):
            run_virtual(go)
    [notice] = _notices(server)
    assert (notice["outcome"], notice["exit_code"]) == ("aborted", 3) and "while another run held" in notice["reason"]


@pytest.mark.parametrize("missing", ["api key", "vertex credentials"])
def test_a_run_refused_for_its_credentials_is_heard_of_and_leaves_no_started_summary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, missing: str
) -> None:
    # The key's variable gone from the cron's environment, or a broken service-account file: the night fails at
    # once (exit 2); its owner must hear of it, and status must not call it a crash ("started", never ended).
    job = write_job(tmp_path, [{"id": "a", "instruction": "a lemon"}])
    out = tmp_path / "out"
    config = tmp_path / "nanobatch.yaml"
    monkeypatch.delenv("NANOBATCH_API_KEY", raising=False)
    monkeypatch.delenv("GEMINI_API_KEY", raising=False)
    if missing == "api key":
        config.write_text("api: {base_url: 'https://proxy.example.test'}\n")
        said = "no API key"
    else:
        (tmp_path / "key.json").write_text("{}")
        config.write_text(f"api: {{backend: vertex, project: shop-123, credentials_file: '{tmp_path / 'key.json'}'}}\n")
        said = "not a readable service-account key"
    with receiver() as server:
        monkeypatch.setenv("NANOBATCH_NOTIFY_URL", server.url + SECRET_PATH)
        argv = ["run", str(job), "--config", str(config), "--model", "gemini-3-pro-image", "--out", str(out), "--quiet"]
        assert main(argv) == 2
    [notice] = _notices(server)
    assert notice["outcome"] == "refused" and notice["exit_code"] == 2 and said in notice["text"]
    assert not (out / "summary.json").exists()


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_a_signal_while_the_webhook_is_told_leaves_the_finished_run_as_it_ended(tmp_path: Path) -> None:
    # A systemd stop that lands while a slow hook is posted to: the run was complete, and must exit 0 with its
    # summary printed (it died by the signal, exit 143, printing nothing; the metrics already said 0).
    import signal
    import subprocess
    import threading
    import time

    job = write_job(tmp_path, _items(2))
    hung = threading.Event()
    with receiver(answer=hung) as server:
        env = {**os.environ, "NANOBATCH_NOTIFY_URL": server.url + SECRET_PATH, "NANOBATCH_NOTIFY_TIMEOUT_S": "120"}
        argv = [sys.executable, "-m", "nanobatch", "run", str(job), "--simulate", "--out", str(tmp_path / "out")]
        process = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            for _ in range(600):  # until the hook is being told (the run has ended)
                if server.posts or process.poll() is not None:
                    break
                time.sleep(0.1)
            process.send_signal(signal.SIGTERM)
            out, err = process.communicate(timeout=60)
        finally:
            process.kill()
    assert process.returncode == 0, err[-2000:]
    assert "complete: 2 ok" in out and "the end-of-run notices were cut short" in err
