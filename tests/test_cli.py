"""The command line as users run it: exit codes, messages, files, help."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import anyio
import httpx2
import pytest

from nanobatch.cli.main import main
from nanobatch.output.lock import RunLock

from .fakes import google_error, ok_body, write_job

API = "http://api.test"
ROUTE = re.compile(r"http://api\.test/v1beta/models/[^/]+:generateContent")

Handler = Callable[[httpx2.Request], httpx2.Response]


class Api:
    """The API at ``API`` as the CLI's own HTTP transports see it: every request recorded, answered by *handler*."""

    def __init__(self) -> None:
        self.requests: list[httpx2.Request] = []
        self.handler: Handler = lambda request: httpx2.Response(200, json=ok_body())

    async def handle(self, request: httpx2.Request) -> httpx2.Response:
        assert ROUTE.fullmatch(str(request.url)), request.url
        await request.aread()
        self.requests.append(request)
        return self.handler(request)


@pytest.fixture
def api(monkeypatch: pytest.MonkeyPatch) -> Api:
    """Patch the transport class the CLI builds (respx cannot patch httpx2, so this takes its place)."""
    fake = Api()

    async def handle_async_request(self: httpx2.AsyncHTTPTransport, request: httpx2.Request) -> httpx2.Response:
        return await fake.handle(request)

    monkeypatch.setattr(httpx2.AsyncHTTPTransport, "handle_async_request", handle_async_request)
    return fake


@pytest.fixture
def key(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("NANOBATCH_API_KEY", "test-key-0123")
    return "test-key-0123"


def test_help_lists_every_command_and_run_option(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("run", "validate", "status", "report", "simulate"):
        assert command in out
    assert main(["run", "--help"]) == 0
    out = capsys.readouterr().out
    for option in (
        "--config",
        "--out",
        "--concurrency",
        "--rpm",
        "--model",
        "--base-url",
        "--simulate",
        "--retry-failed",
        "--force",
        "--max-cost",
        "--max-requests",
        "--dry-run",
        "--grace",
        "--wait-lock",
        "--report",
        "--quiet",
    ):
        assert option in out, option


def test_python_dash_m_runs_the_same_cli() -> None:
    done = subprocess.run([sys.executable, "-m", "nanobatch", "--help"], capture_output=True, text=True, check=False)
    assert done.returncode == 0 and "validate" in done.stdout


def test_run_against_the_simulator_exits_0_and_writes_everything(tmp_path: Path) -> None:
    job = write_job(tmp_path, [{"id": "a", "image": "images/a.png"}, {"id": "b", "instruction": "a lemon"}])
    out = tmp_path / "out"
    assert main(["run", str(job), "--simulate", "--out", str(out)]) == 0
    assert (out / "a.png").is_file() and (out / "b.png").is_file()
    assert json.loads((out / "summary.json").read_text())["counts"]["ok"] == 2
    # A second run has nothing left to do, and says so with exit 0.
    assert main(["run", str(job), "--simulate", "--out", str(out)]) == 0


def test_bad_manifest_exits_2_naming_file_item_and_field(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    job = write_job(tmp_path, [{"id": "a", "instruction": "x", "aspect_ratio": "7:3"}, {"id": "b", "instrction": "y"}])
    out = tmp_path / "out"
    assert main(["run", str(job), "--simulate", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert str(job) in err
    assert "item 'a', field 'aspect_ratio'" in err and "item 'b', field 'instrction'" in err
    assert 'did you mean "instruction"' in err
    assert not out.exists()


@pytest.mark.parametrize(
    "option", [["--progress-interval", "nan"], ["--max-cost", "nan"], ["--rpm", "inf"], ["--grace", "nan"]]
)
def test_a_number_option_that_is_not_finite_exits_2_before_anything_is_sent(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], option: list[str]
) -> None:
    # NaN passes any range check (it compares false both ways): --progress-interval nan once crashed the run
    # after its first request had gone out.
    job = write_job(tmp_path, [{"id": "a", "instruction": "x"}])
    out = tmp_path / "out"
    assert main(["run", str(job), "--simulate", "--out", str(out), *option]) == 2
    assert "is not a finite number" in capsys.readouterr().err and not out.exists()


def test_a_model_written_as_the_apis_resource_name_is_refused_before_anything_is_sent(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    job = write_job(tmp_path, [{"id": "a", "instruction": "x"}], model="models/gemini-3-pro-image")
    out = tmp_path / "out"
    assert main(["run", str(job), "--simulate", "--out", str(out)]) == 2
    assert "write 'gemini-3-pro-image', without 'models/'" in capsys.readouterr().err and not out.exists()


def test_config_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    job = write_job(tmp_path, [{"id": "a", "instruction": "x"}])
    config = tmp_path / "nanobatch.yaml"
    config.write_text("limits:\n  concurency: 4\n")
    assert main(["run", str(job), "--config", str(config), "--simulate"]) == 2
    assert 'did you mean "concurrency"' in capsys.readouterr().err


def test_missing_key_exits_2_and_suggests_the_simulator(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("NANOBATCH_API_KEY")
    job = write_job(tmp_path, [{"id": "a", "instruction": "x"}])
    assert main(["run", str(job), "--base-url", API]) == 2
    assert "NANOBATCH_API_KEY" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("value", "told"),
    [
        pytest.param("sk-live-AAAA1111\n# old key: sk-old-BBBB2222", "a line break", id="a second key below"),
        pytest.param("sk-live-AAAA1111\u2026", "U+2026", id="a pasted ellipsis"),
        pytest.param("sk-live-AAAA 1111", "a space", id="a space inside"),
        pytest.param("sk-live-AAAA\x1b1111", "U+001B", id="a control character"),
    ],
)
def test_a_key_no_header_can_carry_is_refused_before_anything_is_sent_and_never_shown(
    tmp_path: Path,
    api: Api,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    value: str,
    told: str,
) -> None:
    monkeypatch.setenv("NANOBATCH_API_KEY", value)
    job = write_job(tmp_path, [{"id": "a", "instruction": "x"}])
    out = tmp_path / "out"
    code = main(["run", str(job), "--base-url", API, "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    assert api.requests == []
    assert "NANOBATCH_API_KEY" in err and told in err
    assert "AAAA" not in err and "BBBB" not in err and "Traceback" not in err
    assert not (out / "summary.json").exists() or "AAAA" not in (out / "summary.json").read_text()


def test_bad_key_exits_3(tmp_path: Path, key: str, api: Api, capsys: pytest.CaptureFixture[str]) -> None:
    api.handler = lambda request: google_error(401, "UNAUTHENTICATED", "bad key")
    job = write_job(tmp_path, [{"id": f"i{n}", "instruction": "x"} for n in range(30)])
    assert main(["run", str(job), "--base-url", API, "--out", str(tmp_path / "out"), "--concurrency", "2"]) == 3
    assert 1 <= len(api.requests) <= 2
    assert api.requests[0].headers["authorization"] == f"Bearer {key}"
    assert "hint" in capsys.readouterr().err


def test_failed_items_exit_1_and_google_auth_style(
    tmp_path: Path, key: str, api: Api, capsys: pytest.CaptureFixture[str]
) -> None:
    def answer(request: httpx2.Request) -> httpx2.Response:
        if b"bad" in request.content:
            return google_error(400, "INVALID_ARGUMENT", "Unable to process input image")
        return httpx2.Response(200, json=ok_body())

    api.handler = answer
    job = write_job(tmp_path, [{"id": "good", "instruction": "fine"}, {"id": "bad", "instruction": "bad"}])
    config = tmp_path / "google.yaml"
    config.write_text(f"api:\n  base_url: {API}\n  auth: x-goog-api-key\n")
    assert main(["run", str(job), "--config", str(config), "--out", str(tmp_path / "out")]) == 1
    assert len(api.requests) >= 2
    assert all(request.headers["x-goog-api-key"] == key for request in api.requests)
    assert all("authorization" not in request.headers for request in api.requests)
    assert "bad_request: 1 (e.g. bad)" in capsys.readouterr().err


def test_validate_and_dry_run_send_nothing(
    tmp_path: Path, key: str, api: Api, capsys: pytest.CaptureFixture[str]
) -> None:
    job = write_job(tmp_path, [{"id": "a", "instruction": "x"}, {"id": "b", "steps": ["one", "two"]}])
    assert main(["validate", str(job)]) == 0
    out = capsys.readouterr().out
    assert "items:     2" in out and "requests:  3" in out and "$" in out
    assert main(["run", str(job), "--dry-run", "--base-url", API]) == 0
    assert api.requests == []


def test_validate_warns_when_the_budget_or_the_time_limit_will_cut_the_run_short(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    job = write_job(tmp_path, [{"id": f"i{n}", "instruction": "x"} for n in range(100)])
    assert main(["validate", str(job), "--max-cost", "0.5", "--max-duration", "1m"]) == 0
    out = capsys.readouterr().out
    assert "budget:    $0.50: the run may stop before every item is done" in out
    assert "time:      limit 60 s: the run will likely stop" in out
    assert main(["validate", str(job), "--max-cost", "1000", "--max-duration", "24h"]) == 0
    out = capsys.readouterr().out
    assert "budget:" not in out and "time:" not in out


def test_validate_lists_every_problem(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    job = write_job(
        tmp_path,
        [{"id": "a b", "instruction": "x"}, {"id": "c", "image": "images/none.png"}, {"id": "d", "image_size": "8K"}],
    )
    (tmp_path / "images" / "none.png").unlink()
    assert main(["validate", str(job)]) == 2
    err = capsys.readouterr().err
    assert "item 'a b'" in err and "item 'c'" in err and "item 'd'" in err


def test_status_reports_counts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    job = write_job(tmp_path, [{"id": "a", "instruction": "x"}])
    out = tmp_path / "out"
    assert main(["run", str(job), "--simulate", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["status", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["counts"] == {"ok": 1, "failed": 0, "blocked": 0, "rejected": 0} and info["possibly_charged"] == 0


def test_cancel_finds_the_endpoint_in_the_config_file(
    tmp_path: Path, key: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from nanobatch.simulator import SimulatorConfig, create_app, run_in_thread

    job = write_job(tmp_path, [{"id": "a", "instruction": "x"}], model="gemini-3.1-flash-image")
    app = create_app(SimulatorConfig(api_key=key, batch_latency_s=30.0))
    with run_in_thread(app=app) as url:
        config = tmp_path / "nanobatch.yaml"
        config.write_text(f"api: {{base_url: '{url}'}}\nbatch: {{linger_s: 0.1, poll_initial_s: 0.05}}\n")
        out = tmp_path / "out"
        argv = ["run", str(job), "--config", str(config), "--out", str(out), "--tier", "batch", "--no-wait", "-q"]
        assert main(argv) == 0
        capsys.readouterr()
        assert main(["cancel", str(out), "--config", str(config)]) == 0  # no --base-url: the config's
    assert capsys.readouterr().out.startswith("cancelled 1 batch jobs: batches/")
    assert [job.state for job in app.state.batches._jobs.values()] == ["cancelled"]


def test_a_held_output_folder_exits_4(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    job = write_job(tmp_path, [{"id": "a", "instruction": "x"}])
    out = tmp_path / "out"

    async def hold_and_run() -> int:
        async with RunLock(out):
            return await anyio.to_thread.run_sync(lambda: main(["run", str(job), "--simulate", "--out", str(out)]))

    assert anyio.run(hold_and_run) == 4
    assert "another nanobatch run holds" in capsys.readouterr().err


def test_json_logs_are_one_object_per_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    job = write_job(tmp_path, [{"id": "a", "instruction": "x"}, {"id": "b", "instruction": "y"}])
    assert main(["--log-format", "json", "run", str(job), "--simulate", "--out", str(tmp_path / "out")]) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    events = [json.loads(line) for line in lines]  # every stderr line is JSON
    assert events and all({"time", "level", "message"} <= set(e) for e in events)
    assert any("running" in e["message"] for e in events)


def test_run_with_report_writes_the_gallery(tmp_path: Path) -> None:
    job = write_job(tmp_path, [{"id": "a", "image": "images/a.png"}])
    out = tmp_path / "out"
    assert main(["run", str(job), "--simulate", "--out", str(out), "--report"]) == 0
    html = (out / "report.html").read_text()
    assert 'data-id="a"' in html


def test_make_demo_says_once_where_the_results_and_the_report_are(tmp_path: Path) -> None:
    # `make demo` in a copy of the project, its venv a stand-in whose nanobatch is this checkout's (nothing installed).
    repo = Path(__file__).resolve().parents[1]
    for name in ("Makefile", "pyproject.toml"):
        (tmp_path / name).write_bytes((repo / name).read_bytes())
    (tmp_path / "jobs").mkdir()
    for path in (repo / "jobs").rglob("*"):
        if path.is_file():
            (tmp_path / "jobs" / path.relative_to(repo / "jobs")).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / "jobs" / path.relative_to(repo / "jobs")).write_bytes(path.read_bytes())
    (tmp_path / "venv" / "bin").mkdir(parents=True)
    script = tmp_path / "venv" / "bin" / "nanobatch"
    script.write_text(f'#!/bin/sh\nPYTHONPATH={repo} exec {sys.executable} -m nanobatch "$@"\n')
    script.chmod(0o755)
    (tmp_path / "venv" / ".installed").touch()  # newer than pyproject.toml: make installs nothing
    done = subprocess.run(["make", "-s", "demo", "VENV=venv"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300, check=False)  # fmt: skip
    told = (done.stdout + done.stderr).lower().splitlines()
    assert done.returncode == 0, told
    assert [line for line in told if "images" in line and "out/example" in line] == [
        "images and results.jsonl in out/example/, summary in out/example/summary.json"
    ]
    assert "report: out/example/report.html" in told and (tmp_path / "out" / "example" / "report.html").is_file()
    # The checks at work: two items rejected by design, listed again by `nanobatch qa`; the demo still succeeds.
    assert sorted(os.listdir(tmp_path / "out" / "example" / "rejected")) == ["bottle-small.png", "sneaker-grey.png"]
    assert "9 checked: 7 pass, 2 fail" in told


@pytest.mark.parametrize(
    ("flag", "value", "section", "name", "expected"),
    [
        pytest.param("--concurrency", "3", "limits", "concurrency", 3, id="concurrency"),
        pytest.param("--rpm", "90", "limits", "requests_per_minute", 90.0, id="rpm"),
        pytest.param("--base-url", "http://x.test", "api", "base_url", "http://x.test", id="base-url"),
        pytest.param("--max-cost", "12.5", "budget", "max_cost_usd", 12.5, id="max-cost"),
        pytest.param("--max-requests", "40", "budget", "max_requests", 40, id="max-requests"),
        pytest.param("--max-duration", "1h30m", "limits", "max_duration_s", 5400.0, id="max-duration-h-m"),
        pytest.param("--max-duration", "90m", "limits", "max_duration_s", 5400.0, id="max-duration-m"),
        pytest.param("--max-duration", "2.5h", "limits", "max_duration_s", 9000.0, id="max-duration-fraction"),
        pytest.param("--max-duration", "600", "limits", "max_duration_s", 600.0, id="max-duration-seconds"),
    ],
)
def test_flags_beat_environment_and_config_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flag: str, value: str, section: str, name: str, expected: object
) -> None:
    import nanobatch.cli.main
    import nanobatch.run.preflight

    job = write_job(tmp_path, [{"id": "a", "instruction": "x"}])
    config = tmp_path / "nanobatch.yaml"
    config.write_text("limits: {concurrency: 7, requests_per_minute: 10}\napi: {base_url: http://file.test}\n"
                      "budget: {max_cost_usd: 1, max_requests: 2}\n")  # fmt: skip
    monkeypatch.setenv(f"NANOBATCH_{section}_{name}".upper(), "http://env.test" if name == "base_url" else "5")
    seen = []
    checks = nanobatch.run.preflight
    real = checks.check_job  # the CLI imports it when the command runs
    monkeypatch.setattr(checks, "check_job", lambda *a, **kw: seen.append(kw["settings"]) or real(*a, **kw))
    assert main(["validate", str(job), "--config", str(config), flag, value]) == 0
    assert getattr(getattr(seen[0], section), name) == expected


def test_a_full_disk_aborts_with_exit_3_and_one_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def disk_full(path: str, data: bytes, **options: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("nanobatch.output.outdir.write_image", disk_full)
    job = write_job(tmp_path, [{"id": "a", "image": "images/a.png"}])
    out = tmp_path / "out"
    assert main(["run", str(job), "--simulate", "--out", str(out), "--quiet"]) == 3
    err = capsys.readouterr().err
    assert f"error: run aborted: cannot write results into {out}: [Errno 28] No space left on device" in err
    assert "Traceback" not in err and "ExceptionGroup" not in err
    # The summary says how the run ended (it said "started": status called the run killed or crashed).
    last = json.loads((out / "summary.json").read_text())["last_run"]
    assert last["outcome"] == "aborted" and "No space left on device" in last["reason"]


@pytest.mark.skipif(sys.platform == "win32", reason="no file size limit to set")
def test_results_jsonl_refused_by_the_disk_mid_run_aborts_with_exit_3_and_json_lines_only(tmp_path: Path) -> None:
    # A real refusal by the kernel (a file size limit: EFBIG, as ENOSPC would), met by results.jsonl once its
    # records outgrow the images: the run must abort (exit 3) with one error, not end "failed" in a traceback.
    import resource

    items = [{"id": f"i{n:02d}", "image": "images/a.png", "instruction": "make it white"} for n in range(40)]
    job = write_job(tmp_path, items, model="gemini-3.1-flash-lite-image")
    limit = 24_000  # an image (about 20 KB) fits; results.jsonl (about 1 KB a record) does not, past ~23 items

    def small_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    metrics = tmp_path / "metrics" / "job.prom"
    metrics.parent.mkdir()
    argv = [sys.executable, "-m", "nanobatch", "--log-format", "json", "run", str(job), "--simulate", "--out",
            str(tmp_path / "out"), "--concurrency", "2", "--metrics-file", str(metrics)]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, preexec_fn=small_files)  # noqa: PLW1509
    events = [json.loads(line) for line in done.stderr.splitlines()]  # JSON lines only: no traceback
    assert done.returncode == 3, done.stderr[-2000:]
    assert any("cannot write results" in e["message"] and "File too large" in e["message"] for e in events)
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["last_run"]["outcome"] == "aborted"
    assert re.search(r"nanobatch_last_run_exit_code\{[^}]*\} 3\b", metrics.read_text())  # what alerts read


@pytest.mark.parametrize("value", ["soon", "0", "-5m", "1d", "inf", "h"])
def test_a_bad_duration_is_a_usage_error_naming_the_flag(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], value: str
) -> None:
    job = write_job(tmp_path, [{"id": "a", "instruction": "x"}])
    assert main(["run", str(job), "--simulate", "--out", str(tmp_path / "out"), "--max-duration", value]) == 2
    assert "--max-duration" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_quiet_still_says_why_a_run_stopped_early(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    job = write_job(tmp_path, [{"id": f"i{n}", "instruction": "x"} for n in range(20)])
    code = main(["run", str(job), "--simulate", "--out", str(tmp_path / "out"), "--quiet", "--max-requests", "3"])
    captured = capsys.readouterr()
    assert code == 3 and captured.out == ""
    assert captured.err.startswith("error: run aborted: ") and "budget" in captured.err


def test_report_on_a_folder_without_results_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert "no results.jsonl here" in err and "Traceback" not in err


def test_validate_estimates_at_least_one_request_time(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    job = write_job(tmp_path, [{"id": "a", "instruction": "x"}])
    assert main(["validate", str(job), "--concurrency", "100"]) == 0
    assert "duration:  about 30 s at concurrency 100" in capsys.readouterr().out
    job = write_job(tmp_path, [{"id": "a", "steps": ["one", "two", "three"]}])
    assert main(["validate", str(job), "--concurrency", "100"]) == 0
    assert "duration:  about 90 s at concurrency 100" in capsys.readouterr().out  # steps go one after another


@pytest.mark.parametrize("command", ["run", "validate"])
def test_an_output_folder_under_a_file_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    job = write_job(tmp_path, [{"id": "a", "instruction": "x"}])
    (tmp_path / "afile").write_text("not a folder")
    extra = ["--simulate"] if command == "run" else []
    assert main([command, str(job), "--out", str(tmp_path / "afile" / "sub"), *extra]) == 2
    err = capsys.readouterr().err
    assert f"cannot be made: {tmp_path / 'afile'} is a file" in err and "Traceback" not in err


def test_an_output_folder_name_too_long_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    job = write_job(tmp_path, [{"id": "a", "instruction": "x"}])
    assert main(["validate", str(job), "--out", str(tmp_path / ("n" * 300))]) == 2
    err = capsys.readouterr().err
    assert "cannot be used: File name too long" in err and "Traceback" not in err


@pytest.mark.parametrize("command", ["run", "validate"])
@pytest.mark.parametrize("where", ["manifest", "config"])
def test_an_output_folder_with_a_nul_in_its_name_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str, where: str
) -> None:
    in_manifest = {"output_dir": "out\0put"} if where == "manifest" else {}
    job = write_job(tmp_path, [{"id": "a", "instruction": "x"}], **in_manifest)
    (tmp_path / "c.yaml").write_text('output:\n  dir: "out\\0put"\n' if where == "config" else "")
    extra = ["--simulate"] if command == "run" else []
    assert main([command, str(job), "--config", str(tmp_path / "c.yaml"), *extra]) == 2
    err = capsys.readouterr().err
    assert "cannot be used: embedded null byte" in err and "Traceback" not in err


def test_an_output_folder_behind_a_dangling_link_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    job = write_job(tmp_path, [{"id": "a", "instruction": "x"}])
    (tmp_path / "outlink").symlink_to(tmp_path / "not-mounted" / "photos")
    assert main(["run", str(job), "--simulate", "--out", str(tmp_path / "outlink")]) == 2
    err = capsys.readouterr().err
    assert "is a symbolic link to" in err and "which does not exist" in err and "Traceback" not in err


def test_an_output_folder_that_cannot_be_created_is_a_usage_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    job = write_job(tmp_path, [{"id": "a", "instruction": "x"}])

    def refused(self: Path, *args: object, **kwargs: object) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(Path, "mkdir", refused)
    assert main(["run", str(job), "--simulate", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "cannot use the output folder" in err and "Operation not permitted" in err and "Traceback" not in err


def test_an_output_folder_this_user_cannot_write_is_a_usage_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import os

    job = write_job(tmp_path, [{"id": "a", "instruction": "x"}])
    shared = tmp_path / "shared"
    shared.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != shared and real_access(path, mode))
    assert main(["validate", str(job), "--out", str(shared / "out")]) == 2
    assert f"cannot be made: {shared} is not writable by this user" in capsys.readouterr().err


def _modules_after(code: str) -> set[str]:
    """Top-level packages loaded by a fresh interpreter that runs *code*."""
    probe = f"{code}\nimport sys\nprint(' '.join(sorted({{m.split('.')[0] for m in sys.modules}})))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return set(done.stdout.split())


HEAVY = {"uvicorn", "starlette", "PIL", "pydantic", "httpx2", "rich"}


@pytest.mark.parametrize("argv", [["--help"], ["run", "--help"], ["simulate", "--help"], ["models", "--help"]])
def test_the_cli_starts_without_the_simulator_pillow_pydantic_or_httpx(argv: list[str]) -> None:
    assert _modules_after("import nanobatch.cli.main") & HEAVY == set()
    loaded = _modules_after(f"from nanobatch.cli.main import main; main({argv!r})")
    assert "click" in loaded and loaded & HEAVY == set()  # the probe ran to its end, and loaded none of them


def test_status_and_validate_load_only_what_they_need(tmp_path: Path) -> None:
    job = write_job(tmp_path, [{"id": "a", "instruction": "a poster of a lemon"}])
    out = tmp_path / "out"
    assert main(["run", str(job), "--simulate", "--out", str(out), "--quiet"]) == 0
    status = _modules_after(f"from nanobatch.cli.main import main; main({['status', str(out)]!r})")
    # Nothing heavy: the last run's summary holds the counts and the items left (the manifest is not read).
    assert status & HEAVY == set()
    (out / "summary.json").write_text((out / "summary.json").read_text().replace(str(job), str(tmp_path / "gone.yaml")))
    status = _modules_after(f"from nanobatch.cli.main import main; main({['status', str(out)]!r})")
    assert status & HEAVY == set()
    args = ["validate", str(job), "--out", str(out)]
    validate = _modules_after(f"from nanobatch.cli.main import main; main({args!r})")
    # No URL or bucket in the manifest: no HTTP client, no cloud library, no engine.
    assert validate & {"uvicorn", "starlette", "PIL", "httpx2", "fsspec", "rich"} == set()


def test_a_plain_run_loads_nothing_it_does_not_use(tmp_path: Path) -> None:
    """A run with no output checks, metrics or telemetry, whose requests all succeed at once, loads no retry
    library, image or array library, progress display, metrics client or simulator: each import is start-up
    time every run would pay (the whole-process dispatch row of docs/performance.md)."""
    from nanobatch.simulator import SimulatorConfig, run_in_thread

    job = write_job(tmp_path, [{"id": "a", "image": "images/a.png"}, {"id": "b", "instruction": "a lemon"}])
    with run_in_thread(SimulatorConfig()) as url:  # in this process: the run's must not load the simulator
        args = ["run", str(job), "--base-url", url, "--out", str(tmp_path / "out"), "--quiet"]
        probe = (
            f"from nanobatch.cli.main import main\nassert main({args!r}) == 0\nimport sys\n"
            "print(' '.join(sorted(m for m in sys.modules if '.' not in m or m.startswith('nanobatch.simulator'))))"
        )
        done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    loaded = set(done.stdout.split())
    unused = {"tenacity", "numpy", "PIL", "rich", "prometheus_client", "opentelemetry", "uvicorn", "starlette"}
    assert "httpx2" in loaded and loaded & unused == set()
    assert not any(name.startswith("nanobatch.simulator") for name in loaded)


def test_a_summary_that_cannot_be_written_aborts_with_exit_3_not_a_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import nanobatch.output.outdir as outdir

    real = outdir.atomic_write

    def full_at_the_end(path: Path, data: bytes) -> None:
        if path.name == "summary.json" and b'"started"' not in data:  # the disk fills up before the run's end
            raise OSError(28, "No space left on device")
        real(path, data)

    monkeypatch.setattr(outdir, "atomic_write", full_at_the_end)
    job = write_job(tmp_path, [{"id": "a", "instruction": "x"}])
    out = tmp_path / "out"

    assert main(["run", str(job), "--simulate", "--out", str(out), "--quiet"]) == 3

    err = capsys.readouterr().err
    assert f"cannot write summary.json into {out}" in err and "Traceback" not in err
