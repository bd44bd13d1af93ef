"""What every benchmark section shares: the work folder and its fixtures, the rows so far, and how a
client run is started. Below ``run.py``, ``_peers.py`` and ``dispatch.py``, which all use it."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import _fixtures as fixtures
from _server import SimulatorProcess

__all__ = ["HERE", "Bench", "Row", "compile_package", "process_env", "say", "user_python"]

HERE = Path(__file__).resolve().parent
PYCACHE = Path(tempfile.gettempdir()) / "nanobatch-bench-pycache"
# What ``pip install nanobatch`` and the peers' own packages make, nothing more (created on first use).
USER_VENV = HERE.parent / ".venv" / "bench-user"


def process_env(**extra: str) -> dict[str, str]:
    """The environment of a measured process, as a user's installed process has it (plus *extra*): none of the
    caller's NANOBATCH_, GEMINI_ or GOOGLE_ settings, and modules loaded from bytecode. pip compiles each module
    when it installs a package; with PYTHONDONTWRITEBYTECODE set (some CI and sandboxes do), each of
    nanobatch's ~100 modules would be compiled from source in every run (0.1-0.3 s), where a peer script
    compiles one file. The bytecode goes to a folder of the bench's own (PYTHONPYCACHEPREFIX), not into the
    measured trees: :func:`compile_package`, or a warm-up run, writes it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NANOBATCH_", "GEMINI_", "GOOGLE_"))}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = str(PYCACHE)
    env.update(extra)
    return env


def compile_package(package_dir: Path = HERE.parent) -> None:
    """Write the bytecode of nanobatch in *package_dir* where :func:`process_env`'s processes look for it, so
    no measured run compiles it (as pip does when it installs)."""
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(package_dir / "nanobatch")], env=process_env(),
                   check=True, stdout=subprocess.DEVNULL)  # fmt: skip


@functools.cache  # asked by every whole-process run: pyproject.toml is read, and the stamp checked, once
def user_python() -> str:
    """The Python of an environment as a user's install has it, for the whole-process runs: nanobatch's
    dependencies and the peers' (the ``bench`` extra), none of the ``dev`` extra's test tools. The dev
    environment has trio (the tests run on its virtual clock), and httpcore2 imports trio whenever it is
    installed: 50-70 ms more start-up than a user's ``nanobatch run`` pays. nanobatch itself comes from
    ``PYTHONPATH`` (the checkout, or ``--against DIR``), as the peers' scripts do. Made once, with pip (a
    package registry must be reachable); without it, this environment's Python, and a note saying so."""
    import tomllib

    with open(HERE.parent / "pyproject.toml", "rb") as f:
        project = tomllib.load(f)["project"]
    wanted = sorted({*project["dependencies"], *project["optional-dependencies"]["bench"]})
    python, stamp = USER_VENV / "bin" / "python", USER_VENV / ".installed"
    if stamp.is_file() and stamp.read_text().splitlines() == wanted:
        return str(python)
    say(f"creating {USER_VENV} (nanobatch's dependencies and the peers', as a user installs them) ...")
    try:
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(USER_VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *wanted],
                       check=True)  # fmt: skip
    except (OSError, subprocess.CalledProcessError) as exc:
        say(f"  could not ({exc}): whole processes run in this environment, trio's import included")
        return sys.executable
    stamp.write_text("\n".join(wanted) + "\n")
    return str(python)


def say(text: str) -> None:
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


@dataclass(slots=True)
class Row:
    section: str
    name: str
    value: str
    target: str = ""
    verdict: str = ""  # "met", "MISSED" or "" (no target)


@dataclass(slots=True)
class Bench:
    """Shared state: the work folder, the fixtures, the mode, the rows so far."""

    tmp: Path
    quick: bool
    batch_items: int = 10_000
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    catalogs: dict[tuple[int, str, bool, bool], Path] = field(default_factory=dict)
    long_run: tuple[Path, Path] | None = None  # (manifest, output folder) of the long manifest's run
    tiny: Path = field(init=False)
    input: Path = field(init=False)
    noise: Path = field(init=False)

    def __post_init__(self) -> None:
        self.tiny = fixtures.tiny_png(self.tmp / "tiny.png")
        self.input = fixtures.input_jpeg(self.tmp / "input.jpg")
        self.noise = fixtures.noise_png(self.tmp / "noise-2k.png")

    def catalog(self, n: int, image_size: str = "512", *, distinct: bool = False, photos: bool = False) -> Path:
        """A manifest of *n* edit items, made once per (n, size, inputs: distinct, photos, or links to one)."""
        key = (n, image_size, distinct, photos)
        if key not in self.catalogs:
            kind = "-photos" if photos else "-distinct" if distinct else ""
            self.catalogs[key] = fixtures.write_catalog(
                self.tmp / f"job-{n}-{image_size}{kind}",
                n,
                self.input,
                image_size=image_size,
                distinct=distinct,
                photos=photos,
            )
        return self.catalogs[key]

    def out(self, name: str) -> str:
        return str(self.tmp / "out" / name)

    def add(self, section: str, name: str, value: str, target: str = "", met: bool | None = None) -> None:
        verdict = "" if met is None else ("met" if met else "MISSED")
        self.rows.append(Row(section, name, value, target, verdict))
        say(f"  {name}: {value}" + (f"  [{verdict}]" if verdict else ""))

    def client(self, scenario: str, timeout: float = 1200, **params: Any) -> dict[str, Any]:
        """Run one scenario in a fresh process; returns its JSON result."""
        env = process_env(NANOBATCH_API_KEY="bench-not-a-key")  # the simulator takes any key
        done = subprocess.run(
            [sys.executable, str(HERE / "_client.py"), scenario, json.dumps(params)],
            cwd=self.tmp,  # no ./nanobatch.yaml from elsewhere
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if done.returncode != 0:
            raise RuntimeError(f"{scenario} failed ({done.returncode}):\n{done.stderr[-3000:]}")
        return dict(json.loads(done.stdout.strip().splitlines()[-1]))

    def nanobatch(
        self, manifest: Path, out_dir: str | Path, sim: SimulatorProcess, concurrency: int, n: int, **params: Any
    ) -> dict[str, Any]:
        """One ``nanobatch`` run of *manifest* against *sim*; RuntimeError unless all *n* items came back ok."""
        params.update(manifest=str(manifest), out_dir=str(out_dir), base_url=sim.url, concurrency=concurrency)
        run = self.client("nanobatch", **params)
        if run["ok"] != n:
            raise RuntimeError(f"nanobatch: expected {n} ok items, got {run}")
        return run
