"""nanobatch and its peers, each timed as a whole process, taking turns against one simulator.

``python bench/dispatch.py [--answers small|2K|4K] [--reps 3] [--peers aiohttp,genai] [--against DIR] [--profile]``

Each client is one fresh process, timed from outside, from its start to its exit, imports and start-up
included, as a user meets it: nanobatch is ``python -m nanobatch run MANIFEST ...`` (the command line, not
``run_job`` in a harness); a peer is its script (``peer_aiohttp.py``, ``peer_genai.py``). Wall is a monotonic
clock around the child, CPU the kernel's accounting of the reaped child (``wait4``), peak RSS the child's own
(``VmHWM``). Runs alternate, so a busy moment of the shared machine hits every client alike; the medians are
printed with the min-max range, and nanobatch's ratios to each peer.

* ``small`` (default): 2,000 answers of 150 bytes at concurrency 100, 200 ms latency: the cost of dispatch.
* ``2K`` / ``4K``: answers of 5.9 MB / 24 MB (a PNG of 3-bit noise, the size of a real 2K / 4K answer),
  concurrency 16: CPU per answer and peak RSS.

``--against DIR``: also run the ``nanobatch`` package found in DIR (``git archive HEAD~1 nanobatch | tar -x -C
DIR``, or a worktree) in the same turns. ``--workers 0,2``: nanobatch once with each ``--workers`` (each its
own client in the turns, the other version's too; the first is the one compared with the peers). ``--profile``: then one
nanobatch run under cProfile (``python -m cProfile``), the top of it printed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import _fixtures as fixtures
from _bench import HERE, Bench, process_env, say, user_python
from _server import SimulatorProcess

PEER_SCRIPTS = {"aiohttp": "peer_aiohttp.py", "genai": "peer_genai.py", "httpx2": "peer_httpx2.py"}
WORKLOADS = {"small": (2000, 100), "2K": (96, 16), "4K": (48, 16)}  # answers, concurrency


def whole(command: list[str], *, env: dict[str, str], cwd: Path) -> dict[str, Any]:
    """Run *command* to its end: wall (spawn to reaped), CPU (user + system) of the child, the peak of its
    processes' memory together (``tree_mb``, sampled: :class:`TreeMemory`), and what it printed (through files:
    ``communicate`` would reap the child before ``wait4`` reads its usage). Not its peak RSS: ``wait4``'s
    starts at this process's own on Linux; the caller takes the peak the child reports of itself."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started = time.perf_counter()
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=out, stderr=err)
        with TreeMemory(process.pid) as tree:
            _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - started
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if process.returncode:
            raise RuntimeError(f"{' '.join(command[:4])} exited {process.returncode}:\n{err.read().decode()[-3000:]}")
        return {
            "wall_s": wall,
            "cpu_s": usage.ru_utime + usage.ru_stime,
            "tree_mb": tree.peak_mb,
            "stdout": out.read().decode(),
            "stderr": err.read().decode(),
        }


class TreeMemory:
    """The largest memory a process and its descendants (nanobatch's worker processes) held together, sampled
    every 50 ms from a thread: the sum of their proportional set sizes (``Pss`` in ``smaps_rollup``), so the
    shared memory that the run and its workers both map (the answers' bodies) and the libraries counts once.
    Linux only; 0 elsewhere."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak_mb = 0.0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()

    def _sample(self) -> None:
        while not self._done.wait(0.05):
            self.peak_mb = max(self.peak_mb, sum(map(_pss_mb, _tree(self.pid))))


def _tree(pid: int) -> list[int]:
    """*pid* and its descendants now (what ``/proc/PID/task/*/children`` say)."""
    found, at = [pid], 0
    while at < len(found):
        try:
            for task in os.listdir(f"/proc/{found[at]}/task"):
                with open(f"/proc/{found[at]}/task/{task}/children") as f:
                    found += map(int, f.read().split())
        except OSError:
            pass  # it ended meanwhile
        at += 1
    return found


def _pss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            return next((int(line.split()[1]) for line in f if line.startswith("Pss:")), 0) / 1024
    except OSError:
        return 0.0


def _env(package_dir: str | None) -> dict[str, str]:
    return process_env(NANOBATCH_API_KEY="bench-not-a-key", PYTHONPATH=package_dir or str(HERE.parent))


def run_cli(
    b: Bench, package_dir: str | None, *, manifest: Path, out: str, url: str, concurrency: int, n: int,
    workers: int | None = None, profile: bool = False,
) -> dict[str, Any]:  # fmt: skip
    """One whole ``nanobatch run`` process; RuntimeError unless all *n* items are ok in results.jsonl."""
    command = [user_python(), *(["-m", "cProfile", "-s", "tottime"] if profile else []), str(HERE / "_cli.py")]
    command += ["run", str(manifest), "--out", out, "--base-url", url, "--concurrency", str(concurrency), "-q"]
    if workers is not None:
        command += ["--workers", str(workers)]
    run = whole(command, env=_env(package_dir), cwd=b.tmp)
    with open(Path(out) / "results.jsonl", "rb") as f:
        ok = sum(b'"status":"ok"' in line or b'"status": "ok"' in line for line in f)
    if ok != n:
        raise RuntimeError(f"nanobatch run: expected {n} ok, got {ok}")
    run["ok"] = ok
    run.update(json.loads(run["stderr"].strip().splitlines()[-1]))  # and its own peak RSS (see whole)
    return run


def run_script(b: Bench, script: str, **params: Any) -> dict[str, Any]:
    """One whole peer script process; RuntimeError unless all its items are ok."""
    run = whole([user_python(), str(HERE / script), json.dumps(params)], env=_env(None), cwd=b.tmp)
    inner = json.loads(run["stdout"].strip().splitlines()[-1])
    if inner["ok"] != params["n"]:
        raise RuntimeError(f"{script}: expected {params['n']} ok, got {inner}")
    run["client"] = inner.get("client", script)
    run["maxrss_mb"] = inner["maxrss_mb"]  # its own (see whole)
    return run


def line(name: str, runs: list[dict[str, Any]], n: int) -> str:
    walls = sorted(r["wall_s"] for r in runs)
    cpus = sorted(r["cpu_s"] / n * 1000 for r in runs)
    rss = sorted(r["maxrss_mb"] for r in runs)
    tree = sorted(r["tree_mb"] for r in runs)
    return (
        f"{name}: wall {statistics.median(walls):.2f} s ({walls[0]:.2f}-{walls[-1]:.2f}), "
        f"CPU {statistics.median(cpus):.2f} ms/answer ({cpus[0]:.2f}-{cpus[-1]:.2f}), "
        f"peak RSS {statistics.median(rss):.0f} MB ({rss[0]:.0f}-{rss[-1]:.0f}), all processes' peak PSS "
        f"{statistics.median(tree):.0f} MB ({tree[0]:.0f}-{tree[-1]:.0f})"
        + (
            f"; main process CPU {statistics.median(r['main_cpu_s'] for r in runs) / n * 1000:.2f} ms/answer"
            f" (event loop {statistics.median(r['loop_cpu_s'] for r in runs) / n * 1000:.2f})"
            if "main_cpu_s" in runs[0]
            else ""
        )
    )


def canned(b: Bench, answers: str) -> Path:
    if answers == "small":
        return b.tiny
    if answers == "2K":
        return b.noise
    return fixtures.noise_png(b.tmp / "noise-4k.png", edge=4096)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--answers", choices=tuple(WORKLOADS), default="small")
    parser.add_argument("--n", type=int, help="answers per run (default: 2,000 small, 96 2K, 48 4K)")
    parser.add_argument("--concurrency", type=int, help="default: 100 small, 16 big")
    parser.add_argument("--reps", type=int, default=3, help="runs of each client, alternating (default 3)")
    parser.add_argument("--peers", default="aiohttp", help="comma-separated: aiohttp, genai, httpx2 (or none)")
    parser.add_argument("--against", help="a folder holding another version's nanobatch package, run in turn")
    parser.add_argument("--workers", help="nanobatch's --workers, comma-separated values (default: its default)")
    parser.add_argument("--profile", action="store_true", help="then one nanobatch run under cProfile")
    parser.add_argument(
        "--photos", action="store_true", help="each item's input a ~1 MB photo of its own (peers: the first one)"
    )
    args = parser.parse_args()
    n, concurrency = WORKLOADS[args.answers]
    n, concurrency = args.n or n, args.concurrency or concurrency
    peers = [p for p in args.peers.split(",") if p and p != "none"]
    workers = {f"nanobatch --workers {w}": int(w) for w in args.workers.split(",")} if args.workers else {}
    ours = [*(workers or ["nanobatch"])]
    if args.against:  # the other version with each --workers too
        workers.update({f"before --workers {w}": w for w in list(workers.values())})
    before = [name for name in workers if name.startswith("before")] or ["before"]
    clients = [*ours, *(before if args.against else []), *peers]
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in clients}
    tmp = Path(tempfile.mkdtemp(prefix="nanobatch-dispatch-"))
    try:
        b = Bench(tmp=tmp, quick=True)
        size = {"small": "512"}.get(args.answers, args.answers)
        with SimulatorProcess(latency_s=0.2, canned=str(canned(b, args.answers))) as sim:

            def one(name: str, count: int, out: str) -> dict[str, Any]:
                manifest = b.catalog(count, size, photos=args.photos)
                if name in PEER_SCRIPTS:
                    picture = manifest.parent / "images" / "sku-000000.jpg" if args.photos else b.input
                    return run_script(b, PEER_SCRIPTS[name], base_url=sim.url, n=count, concurrency=concurrency,
                                      input_path=str(picture), image_size=size, out_dir=out)  # fmt: skip
                package = args.against if name.startswith("before") else None
                return run_cli(b, package, manifest=manifest, out=out, url=sim.url,
                               concurrency=concurrency, n=count, workers=workers.get(name))  # fmt: skip

            for name in clients:  # warm-up, not counted: the bytecode of everything each client imports
                one(name, 2, b.out(f"warm-{name}"))
            for rep in range(args.reps):
                for name in clients if rep % 2 == 0 else clients[::-1]:
                    out = b.out(f"{name}-{rep}")
                    run = one(name, n, out)
                    shutil.rmtree(out, ignore_errors=True)
                    runs[name].append(run)
                    say(f"  run {rep} {line(name, [run], n)}")
            if args.profile:
                prof = run_cli(b, None, manifest=b.catalog(n, size), out=b.out("profile"), url=sim.url,
                               concurrency=concurrency, n=n, workers=workers.get(ours[0]), profile=True)  # fmt: skip
        say(f"{n} {args.answers} answers, c={concurrency}, whole processes, median (min-max) of {args.reps}:")
        for name in clients:
            say(f"  {line(name, runs[name], n)}")
        for peer in peers:
            for key, what in (("wall_s", "wall"), ("cpu_s", "CPU"), ("maxrss_mb", "peak RSS"), ("tree_mb", "all PSS")):
                ratio = statistics.median(r[key] for r in runs[ours[0]]) / statistics.median(r[key] for r in runs[peer])
                say(f"  {ours[0]} / {peer}, median {what}: {ratio:.3f}x")
        if args.profile:
            say("\nprofile (main thread):\n" + "\n".join(prof["stdout"].splitlines()[:45]))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
