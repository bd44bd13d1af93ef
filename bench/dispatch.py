"""The small-answer dispatch of section 0 alone: nanobatch and the aiohttp script, taking turns.

``python bench/dispatch.py [--reps 3] [--against DIR] [--profile]``: 2,000 requests, 200 ms latency,
concurrency 100, against one simulator process; each client a fresh process (``_client.py``,
``peer_aiohttp.py``). Prints every run, then the medians: wall, CPU per request (nanobatch's event-loop
thread in brackets) and nanobatch's wall over the aiohttp script's. A quicker loop than
``run.py --only peers`` for changes to the per-request path.

``--against DIR``: also run the ``nanobatch`` package found in DIR (a copy of the code before a change,
e.g. ``git archive HEAD~1 nanobatch | tar -x -C DIR``) in the same turns, so both versions meet the same
busy moments of the machine. ``--profile``: then one nanobatch run under cProfile (event loop thread).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from _bench import HERE, Bench, say
from _peers import SMALL, run_peer
from _server import SimulatorProcess


def run_nanobatch(b: Bench, package_dir: str | None, **params: Any) -> dict[str, Any]:
    """One ``_client.py nanobatch`` run, with *package_dir* (a folder holding ``nanobatch/``) first on the path."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NANOBATCH_", "GEMINI_"))}
    env["NANOBATCH_API_KEY"] = "bench-not-a-key"  # the simulator takes any key
    if package_dir:
        env["PYTHONPATH"] = package_dir
    done = subprocess.run(
        [sys.executable, str(HERE / "_client.py"), "nanobatch", json.dumps(params)],
        cwd=b.tmp, env=env, capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"nanobatch failed ({done.returncode}):\n{done.stderr[-3000:]}")
    result = dict(json.loads(done.stdout.strip().splitlines()[-1]))
    if result["ok"] != params.get("n", SMALL[0]):
        raise RuntimeError(f"nanobatch: expected {SMALL[0]} ok, got {result}")
    return result


def line(name: str, runs: list[dict[str, Any]], n: int) -> str:
    wall = statistics.median(r["wall_s"] for r in runs)
    cpu = statistics.median(r["cpu_s"] for r in runs) / n * 1000
    main = f" ({statistics.median(r['main_cpu_s'] for r in runs) / n * 1000:.2f})" if "main_cpu_s" in runs[0] else ""
    return f"{name}: {wall:.2f} s, {cpu:.2f}{main} ms/req"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=3, help="runs of each client, alternating (default 3)")
    parser.add_argument("--against", help="a folder holding another version's nanobatch package, run in turn")
    parser.add_argument("--profile", action="store_true", help="then one nanobatch run under cProfile")
    args = parser.parse_args()
    n, concurrency = SMALL
    tmp = Path(tempfile.mkdtemp(prefix="nanobatch-dispatch-"))
    clients = ["nanobatch", *(["before"] if args.against else []), "aiohttp"]
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in clients}
    try:
        b = Bench(tmp=tmp, quick=True)
        manifest = str(b.catalog(n))
        with SimulatorProcess(latency_s=0.2, canned=str(b.tiny)) as sim:
            for rep in range(args.reps):
                for name in clients if rep % 2 == 0 else clients[::-1]:
                    out = b.out(f"{name}-{rep}")
                    if name == "aiohttp":
                        run = run_peer(b, "peer_aiohttp.py", base_url=sim.url, n=n, concurrency=concurrency,
                                       input_path=str(b.input), image_size="512", out_dir=out)  # fmt: skip
                    else:
                        package = args.against if name == "before" else None
                        run = run_nanobatch(b, package, manifest=manifest, out_dir=out, base_url=sim.url,
                                            concurrency=concurrency)  # fmt: skip
                    runs[name].append(run)
                    say(f"  run {rep} {line(name, [run], n)}")
            if args.profile:
                prof = run_nanobatch(b, None, manifest=manifest, out_dir=b.out("profile"), base_url=sim.url,
                                     concurrency=concurrency, profile=True)  # fmt: skip
        aiohttp = statistics.median(r["wall_s"] for r in runs["aiohttp"])
        say(f"median of {args.reps}:")
        for name in clients:
            ratio = statistics.median(r["wall_s"] for r in runs[name]) / aiohttp
            say(f"  {line(name, runs[name], n)}" + ("" if name == "aiohttp" else f"; {ratio:.2f}x aiohttp"))
        if args.profile:
            say(f"\nprofile ({prof['wall_s']:.2f} s under cProfile):\n{prof['profile']}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
