"""`make bench` runs the peers against the simulator: each peer script, run as bench/_peers.py runs it
(a fresh process, JSON params in, one JSON line out), saves every image on a small workload."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nanobatch.simulator import SimulatorConfig, run_in_thread

from .fakes import image_bytes

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.mark.parametrize(
    ("script", "needs"),
    [("peer_aiohttp.py", "aiohttp"), ("peer_genai.py", "google.genai"), ("peer_httpx2.py", "aiohttp")],
)
def test_each_peer_script_saves_every_image_against_the_simulator(tmp_path: Path, script: str, needs: str) -> None:
    pytest.importorskip(needs)
    (tmp_path / "in.png").write_bytes(image_bytes())
    with run_in_thread(SimulatorConfig()) as url:
        params = {"base_url": url, "n": 4, "concurrency": 2, "input_path": str(tmp_path / "in.png"),
                  "out_dir": str(tmp_path / "out"), "image_size": "1K"}  # fmt: skip
        done = subprocess.run([sys.executable, script, json.dumps(params)], cwd=BENCH, capture_output=True,
                              text=True, timeout=120, check=True)  # fmt: skip
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["requests"] == result["ok"] == 4 and result["failed"] == 0
    saved = sorted((tmp_path / "out").glob("*.png"))
    assert len(saved) == 4 and all(p.read_bytes().startswith(b"\x89PNG") for p in saved)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="VmHWM is Linux's")
def test_a_client_reports_its_own_peak_memory_not_the_bench_process_s() -> None:
    """The peak RSS in the bench's rows is each client's: a child of a big bench process reports its own small
    peak (the kernel's ru_maxrss for that child starts at the parent's, which hid every small client's)."""
    held = b"x" * (300 << 20)  # the bench process, bigger than any small client
    child = subprocess.Popen([sys.executable, "-c", "import _peer; print(_peer.peak_rss_mb())"], cwd=BENCH,
                             stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert child.stdout is not None
    with child.stdout:
        out = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    assert child.returncode == 0 and len(held) == 300 << 20
    assert float(out) < 150, out  # its own: an interpreter and a few modules
    assert usage.ru_maxrss / 1024 >= 300  # what the bench read before: the parent's peak


@pytest.mark.skipif(not Path("/proc/self/smaps_rollup").exists(), reason="Pss is Linux's")
def test_a_client_s_memory_counts_its_worker_processes_too(tmp_path: Path) -> None:
    """nanobatch's worker processes hold memory of their own: the whole-process rows add it to the run's
    (bench/dispatch.py's TreeMemory), so a run with workers is not shown as small as its own process."""
    sys.path.insert(0, str(BENCH))
    try:
        from dispatch import whole
    finally:
        sys.path.remove(str(BENCH))
    child = "import time; held = bytearray(200 << 20); held[::4096] = b'x' * len(held[::4096]); time.sleep(1.5)"
    parent = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {child!r}], check=True)"
    run = whole([sys.executable, "-c", parent], env=dict(os.environ), cwd=tmp_path)
    assert run["tree_mb"] >= 200  # the child's 200 MB, though the process started holds none of it
