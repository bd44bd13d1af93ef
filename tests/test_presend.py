"""The settings a run refuses before it sends anything, `validate` and `run --dry-run` refuse too, in the same
words: one list of checks (nanobatch.run.presend), which every command that checks a job goes through."""

from __future__ import annotations

from pathlib import Path

import pytest

from nanobatch.cli.main import main

from .fakes import write_job

NOWHERE = "http://127.0.0.1:9"  # loopback, where nothing listens: a request sent by mistake fails at once
GOOGLE = "https://generativelanguage.googleapis.com"  # never reached: every case is refused before sending
COMMANDS = [["validate"], ["run", "--dry-run"], ["run"]]


def _vertex(credentials_file: str) -> str:
    return ("api:\n  backend: vertex\n  model: gemini-3-pro-image\n  project: shop-123\n"
            f"  base_url: {NOWHERE}\n  credentials_file: {credentials_file}\n")  # fmt: skip


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
@pytest.mark.parametrize(
    ("config", "key", "said"),  # key: whether the environment holds one
    [
        pytest.param(
            _vertex("missing.json"), True,
            "error: api.credentials_file: missing.json: not a readable service-account key ([Errno 2] No such file",
            id="vertex-key-file-missing",
        ),
        pytest.param(
            _vertex("garbled.json"), True,
            "error: api.credentials_file: garbled.json: not a readable service-account key (Expecting ",
            id="vertex-key-file-garbled",
        ),
        pytest.param(
            f"api:\n  backend: vertex\n  model: gemini-3-pro-image\n  base_url: {NOWHERE}\n", False,
            "error: api.backend: vertex needs api.project (with Google credentials), or an API key for express mode",
            id="vertex-express-without-key",
        ),
        pytest.param(
            f"api:\n  base_url: {GOOGLE}\n", False,
            "error: no API key: set the environment variable NANOBATCH_API_KEY (or GEMINI_API_KEY)",
            id="no-key-for-a-remote-api",
        ),
        pytest.param(  # httpx would send them as "Authorization: Basic", the key's Bearer header dropped
            "api:\n  base_url: https://shop:s3cret-pass@proxy.example/v1\n", True,
            "error: api.base_url holds a user name and password, which would be sent in place of the key",
            id="basic-auth-in-the-url-with-a-bearer-key",
        ),
    ],
)  # fmt: skip
def test_validate_and_dry_run_refuse_the_settings_a_run_refuses_in_the_same_words(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    command: list[str],
    config: str,
    key: bool,
    said: str,
) -> None:
    monkeypatch.chdir(tmp_path)  # the key file's name is relative, as a user writes it
    (tmp_path / "garbled.json").write_text('{"type": "service_account", "private_key": "-----BEGIN, "client_email"}')
    if not key:
        monkeypatch.delenv("NANOBATCH_API_KEY")
    (tmp_path / "c.yaml").write_text(config)
    job = write_job(tmp_path, [{"id": "a", "image": "images/a.png"}])

    code = main([command[0], str(job), "--config", "c.yaml", "--out", str(tmp_path / "out"), *command[1:]])

    err = capsys.readouterr().err
    assert code == 2 and said in err and err.count("error: ") == 1, err
    assert not (tmp_path / "out").exists()  # nothing taken, nothing sent


def test_the_simulator_needs_no_key_in_a_dry_run_either(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("NANOBATCH_API_KEY")
    (tmp_path / "c.yaml").write_text(f"api:\n  base_url: {GOOGLE}\n")
    job = write_job(tmp_path, [{"id": "a", "image": "images/a.png"}])

    argv = ["run", str(job), "--config", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "out"), "--dry-run"]
    assert main([*argv, "--simulate"]) == 0
    assert main(argv) == 2 and "error: no API key" in capsys.readouterr().err
