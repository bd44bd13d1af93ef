"""What the README, the example job and the simulator's banner tell a user to type works as typed.

The only liberty taken: the simulator listens on a free port instead of 8000 (this machine's 8000 may be
taken), and the commands' ``http://127.0.0.1:8000`` follows it. ``MANIFEST`` in the banner is the example job.
"""

from __future__ import annotations

import json
import os
import re
import select
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest

from nanobatch.cli.main import main

REPO = Path(__file__).resolve().parent.parent
DOCUMENTED_URL = "http://127.0.0.1:8000"
# A command in a line of docs: at its start (after a comment's "#"), or after "...: " in prose; it ends at a
# comment, a ";" or a "(" remark.
_COMMAND = re.compile(r"(?:^#?\s*|:\s)(nanobatch\s[^#;()]*)")


def read_until(stream: IO[bytes], needle: bytes, timeout_s: float = 30.0) -> bytes:
    """What *stream* says up to and including *needle* (the test fails after *timeout_s*)."""
    seen = b""
    deadline = time.monotonic() + timeout_s
    while needle not in seen:
        ready, _, _ = select.select([stream], [], [], max(0.0, deadline - time.monotonic()))
        assert ready, f"no {needle!r} within {timeout_s} s; got {seen!r}"
        chunk = os.read(stream.fileno(), 4096)
        assert chunk, f"the stream ended before {needle!r}; got {seen!r}"
        seen += chunk
    return seen


def commands(lines: list[str]) -> list[str]:
    return [found.strip() for line in lines for found in _COMMAND.findall(line.strip())]


def readme_simulator_commands() -> list[str]:
    section = (REPO / "README.md").read_text().split("\n## The simulator\n", 1)[1].split("\n## ", 1)[0]
    block = section.split("```sh\n", 1)[1].split("```", 1)[0]
    return commands(block.splitlines())


def example_job_commands() -> list[str]:
    header = [line for line in (REPO / "jobs" / "example.yaml").read_text().splitlines() if line.startswith("#")]
    return commands(header)


@pytest.fixture
def checkout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The current folder, holding the repository's jobs/ as a user's checkout does."""
    shutil.copytree(REPO / "jobs", tmp_path / "checkout" / "jobs")
    monkeypatch.chdir(tmp_path / "checkout")
    return tmp_path / "checkout"


class Simulator:
    """``nanobatch simulate ...`` in its own process, as typed (on a free port); its banner's command."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None) -> None:
        argv = [a for a in args if a != "simulate"]
        if "--port" in argv:
            del argv[argv.index("--port") : argv.index("--port") + 2]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "nanobatch", "simulate", *argv, "--port", "0"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
        )
        assert self.proc.stdout is not None
        banner = read_until(self.proc.stdout, b"(Ctrl-C stops)").decode()
        found = re.search(r"listening on (\S+); run: (.*) \(Ctrl-C stops\)", banner)
        assert found, banner
        self.url, self.command = found.groups()

    def close(self) -> None:
        self.proc.terminate()
        self.proc.communicate(timeout=30)  # reads and closes its stdout


@pytest.fixture
def simulators() -> Iterator[list[Simulator]]:
    started: list[Simulator] = []
    yield started
    for simulator in started:
        simulator.close()


def run_as_typed(command: str, monkeypatch: pytest.MonkeyPatch, url: str | None = None) -> int:
    """Run a documented ``[VAR=value ...] nanobatch ...`` command line through the CLI's main()."""
    words = shlex.split(command.replace(DOCUMENTED_URL, url) if url else command)
    while "=" in words[0]:
        name, _, value = words.pop(0).partition("=")
        monkeypatch.setenv(name, value)
    assert words[0] == "nanobatch", command
    shutil.rmtree("out", ignore_errors=True)  # each command does the work itself
    return main(words[1:])


def sent_and_ok(out: Path) -> tuple[int, int, int]:
    """(requests, ok, rejected) of the run into *out*."""
    last_run = json.loads((out / "summary.json").read_text())["last_run"]
    return last_run["requests"], last_run["ok"], last_run["rejected"]


# The example job: 9 items, the hero item has two steps; two items end rejected on purpose (their markers make the
# simulator answer with bad images) after one new request each (qa retries: 1), so the run exits 1.
EXAMPLE = (12, 7, 2)
EXAMPLE_EXIT = 1


@pytest.mark.parametrize("source", [readme_simulator_commands, example_job_commands], ids=["README", "example.yaml"])
def test_the_documented_simulator_recipe_works_as_typed(
    source: object, checkout: Path, simulators: list[Simulator], monkeypatch: pytest.MonkeyPatch
) -> None:
    documented = source()  # type: ignore[operator]
    serve = [c for c in documented if shlex.split(c)[1] == "simulate"]
    runs = [c for c in documented if shlex.split(c)[1] == "run"]
    assert len(serve) == 1 and len(runs) == 2, documented  # one server, a run against it, a run with --simulate
    simulators.append(Simulator(shlex.split(serve[0])[1:]))
    for command in runs:
        assert run_as_typed(command, monkeypatch, simulators[0].url) == EXAMPLE_EXIT, command  # no key set anywhere
        assert sent_and_ok(checkout / "out" / "example") == EXAMPLE, command


@pytest.mark.parametrize("key_env", [None, "SIM_KEY"], ids=["no-key", "own-key"])
def test_the_command_the_simulator_banner_prints_works_as_typed(
    key_env: str | None, checkout: Path, simulators: list[Simulator], monkeypatch: pytest.MonkeyPatch
) -> None:
    if key_env is not None:
        monkeypatch.setenv(key_env, "the-simulator-key")  # exported in the user's shell, for both commands
    simulator = Simulator(["--api-key-env", key_env] if key_env else [], env=dict(os.environ))
    simulators.append(simulator)
    assert run_as_typed(simulator.command.replace("MANIFEST", "jobs/example.yaml"), monkeypatch) == EXAMPLE_EXIT
    assert sent_and_ok(checkout / "out" / "example") == EXAMPLE


def test_a_base_url_off_this_machine_still_needs_a_key(
    tmp_path: Path, checkout: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("NANOBATCH_API_KEY")
    assert main(["run", "jobs/example.yaml", "--base-url", "http://api.example.com"]) == 2
    assert "no API key" in capsys.readouterr().err


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1"])
def test_the_documented_run_works_with_the_simulator_named_either_way(
    host: str, checkout: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from nanobatch.simulator import SimulatorConfig, run_in_thread

    (command,) = [c for c in readme_simulator_commands() if DOCUMENTED_URL in c]
    with run_in_thread(SimulatorConfig()) as url:
        assert run_as_typed(command, monkeypatch, url.replace("127.0.0.1", host)) == EXAMPLE_EXIT  # no key anywhere
    assert sent_and_ok(checkout / "out" / "example") == EXAMPLE


_FENCED = re.compile(r"^```.*?^```", re.S | re.M)
_LINK = re.compile(r"\[(?:[^\]\[]|\[[^\]]*\])*\]\(([^)\s]+)\)")  # [text](target), text may hold [brackets]


def _anchors(page: Path) -> set[str]:
    """The #anchors GitHub gives *page*'s headings: lower case, punctuation dropped, spaces as hyphens, a
    heading's repeats numbered."""
    found: set[str] = set()
    seen: dict[str, int] = {}
    for line in _FENCED.sub("", page.read_text()).splitlines():
        if heading := re.match(r"#{1,6} (.*)", line):
            slug = re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower()).replace(" ", "-")
            found.add(f"{slug}-{seen[slug]}" if slug in seen else slug)
            seen[slug] = seen.get(slug, 0) + 1
    return found


def test_every_link_in_the_manual_leads_to_a_page_and_a_heading_that_exist() -> None:
    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "bench" / "RESULTS.md"]
    broken, checked = [], 0
    for page in pages:
        for target in _LINK.findall(_FENCED.sub("", page.read_text())):
            if re.match(r"[a-z]+:", target):  # https:, mailto:: not this machine's to check
                continue
            checked += 1
            file, _, anchor = target.partition("#")
            dest = (page.parent / file).resolve() if file else page
            if not dest.exists():
                broken.append(f"{page.relative_to(REPO)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                broken.append(f"{page.relative_to(REPO)}: {target} (no such heading)")
    assert checked >= 40  # the README alone links its reference pages and sections some forty times
    assert not broken, "\n".join(broken)
